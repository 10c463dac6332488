"""ASGI middleware run before the routes: API keys, the request body cap, HTTP metrics.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, which would wrap `receive` and hide the
client's disconnect from the routes that abort on it.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corral.server.errors import APIError, error_response
from corral.server.metrics import Metrics

# Routes open without an API key: load balancers probe health without credentials.
OPEN_PATHS = frozenset({"/health"})


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class RequestGate:
    """401 without a valid API key (`Authorization: Bearer KEY` or `X-Api-Key: KEY`; OPTIONS and
    /health pass), 413 for a body over max_body_bytes. The body is read here, whole, and replayed
    to the route."""

    def __init__(self, app: ASGIApp, api_keys: list[str], max_body_bytes: int) -> None:
        self.app = app
        self.key_digests = [_digest(k) for k in api_keys]
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.key_digests and scope["method"] != "OPTIONS" and scope["path"] not in OPEN_PATHS:
            if not self._authorized(headers):
                await _reply(scope, receive, send, APIError(401, "Invalid or missing API key."))
                return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body = await self._read_body(headers, receive)
            if body is None:
                too_big = APIError(413, f"The request body is larger than {self.max_body_bytes} bytes.")
                await _reply(scope, receive, send, too_big)
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        offered = [token.strip()] if scheme.lower() == "bearer" else []
        if "x-api-key" in headers:
            offered.append(headers["x-api-key"].strip())
        # Compare digests in constant time, every key every time: no timing tells a key's prefix.
        ok = False
        for key in offered:
            digest = _digest(key)
            for known in self.key_digests:
                ok |= hmac.compare_digest(digest, known)
        return ok

    async def _read_body(self, headers: dict[str, str], receive: Receive) -> bytes | None:
        """The whole body, or None when it is over the cap."""
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: the route sees an empty body
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the buffered body, then the client's later messages (its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _reply(scope: Scope, receive: Receive, send: Send, error: APIError) -> None:
    await error_response(error)(scope, receive, send)


class HTTPMetrics:
    """http_requests_total{handler,method,status} and http_request_duration_seconds, as
    prometheus-fastapi-instrumentator names them; unknown paths count under handler "none"."""

    def __init__(self, app: ASGIApp, metrics: Metrics, paths: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # unless the app starts a response

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            handler = scope["path"] if scope["path"] in self.paths else "none"
            self.metrics.http_request(handler, scope["method"], status, time.perf_counter() - start)
