"""Errors in OpenAI's JSON shape, as vLLM sends them: {"error": {"message", "type", "param", "code"}}.

Every client mistake is a 400 (never FastAPI's 422: the openai client and LangChain treat 422 as
unknown), with the exact context-length wording vLLM uses, which LiteLLM and agents match on.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from corral import _core

logger = logging.getLogger("corral.server")

# The `type` of the error body, by status (vLLM's names, which follow the openai client's classes).
_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """An error answered to the client with `status`; headers (Retry-After, ...) go with it."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = _TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "") + "Error"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error.status, error.message, error.param), error.status, headers=error.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def prompt_too_long(max_model_len: int, prompt_len: int) -> APIError:
    return bad_request(
        f"This model's maximum context length is {max_model_len} tokens. However, your request has "
        f"{prompt_len} input tokens. Please reduce the length of the input messages.",
        "messages",
    )


def max_tokens_too_large(max_tokens: int, max_model_len: int, prompt_len: int) -> APIError:
    return bad_request(
        f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum context "
        f"length is {max_model_len} tokens and your request has {prompt_len} input tokens "
        f"({max_tokens} > {max_model_len} - {prompt_len}).",
        "max_tokens",
    )


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for e in error.errors():
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        if e.get("type") == "json_invalid":
            parts.append(f"invalid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
        else:
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(bad_request(_validation_message(e)))

    async def corral_error(_: Request, e: Exception) -> JSONResponse:
        # The engine and SamplingParams refuse bad values with a message naming the field.
        return error_response(bad_request(str(e)))

    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        return error_response(APIError(e.status_code, str(e.detail), headers=e.headers))

    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        logger.exception("internal error")
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}"))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(_core.InvalidInputError, corral_error)
    app.add_exception_handler(_core.OutOfKVCacheError, corral_error)
    app.add_exception_handler(jinja2.TemplateError, corral_error)  # e.g. the template's raise_exception
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
