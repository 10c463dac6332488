"""One HTTP request's generation: its engine requests, what each choice has produced, the metrics
they feed, and the abort when the client leaves.

A Run is registered with the server from admission to the end of the reply (that is what
--max-pending counts and what a shutdown drains). However the reply ends (complete, client gone,
error, shutdown), Run.close() aborts what is unfinished, so the engine frees its KV blocks within
one step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from corral import _core
from corral.sampling_params import SamplingParams
from corral.server import protocol
from corral.server.errors import error_body
from corral.server.state import ServerState

T = TypeVar("T")


class Choice:
    """What one choice (one sample of one prompt) has produced so far."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.text: list[str] = []
        self.num_tokens = 0
        self.logprobs: list = []  # TokenLogprobs, when asked for
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    def add(self, delta) -> None:
        if delta.text:
            self.text.append(delta.text)
        self.num_tokens += len(delta.token_ids)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason

    @property
    def full_text(self) -> str:
        return "".join(self.text)


class Run:
    """The engine requests of one HTTP request: one per prompt, each with n samples."""

    def __init__(self, server: ServerState) -> None:
        server.admit()
        self.server = server
        self.arrival = time.monotonic()
        self.handles: list = []  # corral.async_llm.RequestHandle, one per prompt
        self.n = 1  # samples per prompt
        self.prompt_tokens = 0
        server.runs.add(self)

    async def start(self, prompts: Sequence[list[int]], params: SamplingParams, images: Sequence[list] | None = None) -> None:
        """Adds the prompts (with their images' pixel arrays, if any) to the engine. A refused
        one raises (InvalidInputError, OutOfKVCacheError: a 400) and the ones added before it are
        aborted by close()."""
        for i, ids in enumerate(prompts):
            self.handles.append(await self.server.engine.add_request(ids, params, images=images[i] if images else None))
        self.n = params.n
        self.prompt_tokens = sum(len(ids) for ids in prompts)
        self.server.metrics.prompt_tokens.inc(self.prompt_tokens)

    async def deltas(self) -> AsyncIterator[tuple[int, object]]:
        """(choice index, SampleDelta) as the engine steps, until every sample has finished; the
        choice index is prompt index * n + sample index (vLLM's numbering)."""
        metrics = self.server.metrics
        first_token_seen = [False] * len(self.handles)
        last_token_at: dict[int, float] = {}  # by choice index
        finished = [0] * len(self.handles)
        async for p, step in _merge(self.handles):
            now = time.monotonic()
            for d in step:
                index = p * self.n + d.index
                if d.token_ids:
                    if not first_token_seen[p]:
                        first_token_seen[p] = True
                        metrics.time_to_first_token.observe(now - self.arrival)
                    if index in last_token_at:
                        metrics.inter_token_latency.observe(now - last_token_at[index])
                    last_token_at[index] = now
                    metrics.generation_tokens.inc(len(d.token_ids))
                if d.finish_reason is not None:
                    metrics.request_finished(d.finish_reason)
                    finished[p] += 1
                    if finished[p] == self.n:
                        metrics.e2e_request_latency.observe(now - self.arrival)
                yield index, d

    async def _until_disconnected(self, request: Request, work: Awaitable[T]) -> T | None:
        """Awaits `work` (a whole reply), or, if the client disconnects first, cancels it and
        returns None (close() then aborts the engine requests)."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
        if task.cancelled():
            self.server.metrics.client_disconnected.inc()
            return None
        return task.result()

    async def respond(self, http: Request, reply, stream: bool, include_usage: bool) -> Response:
        """The HTTP response of a started run: an event stream, which closes the run when it ends,
        or the whole body once generated (499 if the client left first)."""
        if stream:
            return EventStream(self, reply.chunks(), reply.usage_chunk if include_usage else None)
        try:
            body = await self._until_disconnected(http, reply.body())
        finally:
            self.close()
        return Response(status_code=499) if body is None else JSONResponse(body)

    def abort(self) -> None:
        """Ends the run's unfinished samples now (finish_reason "abort"); the reply still ends
        normally. Idempotent."""
        for handle in self.handles:
            handle.abort()

    def close(self) -> None:
        """Aborts what has not finished and leaves the requests in flight (idempotent)."""
        self.abort()
        self.server.runs.discard(self)


class EventStream(StreamingResponse):
    """A text/event-stream reply: the chunks, the usage chunk (when asked for), then [DONE]. It
    closes its run when it ends, however it ends: the chunks' generator may never even start if
    the client leaves at once."""

    def __init__(self, run: Run, chunks: AsyncIterator[bytes], usage_chunk: Callable[[], bytes] | None) -> None:
        super().__init__(self._events(chunks, usage_chunk), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self.run = run
        self.complete = False

    async def _events(self, chunks: AsyncIterator[bytes], usage_chunk: Callable[[], bytes] | None):
        try:
            async for chunk in chunks:
                yield chunk
        except _core.CorralError as e:  # a failed engine step: the openai client raises on an error event
            yield protocol.sse(error_body(500, f"generation failed: {e}"))
        else:
            if usage_chunk is not None:
                yield usage_chunk()
        yield protocol.SSE_DONE
        self.complete = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            if not self.complete:
                self.run.server.metrics.client_disconnected.inc()
            self.run.close()


async def _disconnected(request: Request) -> None:
    # The body has been read: the next message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _merge(handles: list) -> AsyncIterator[tuple[int, list]]:
    """(handle index, step's deltas) from several engine requests as they come."""
    if len(handles) == 1:
        async for step in handles[0]:
            yield 0, step
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, handle) -> None:
        try:
            async for step in handle:
                queue.put_nowait((i, step))
            queue.put_nowait((i, done))
        except Exception as e:  # a failed engine step: raised to the reader
            queue.put_nowait((i, e))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
