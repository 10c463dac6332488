"""What the routes share: the engine, the server's settings, its metrics, and the requests in flight."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from corral.server.errors import APIError
from corral.server.metrics import Metrics
from corral.server.sampling import Limits, server_defaults

if TYPE_CHECKING:
    from corral.async_llm import AsyncLLM
    from corral.server.generation import Run

# Prompts longer than this (characters of text to template or encode) are prepared on a worker
# thread, so that a huge prompt does not stall every stream on the event loop.
OFFLOAD_CHARS = 20_000


@dataclasses.dataclass
class ServerConfig:
    served_model_names: list[str]
    api_keys: list[str] = dataclasses.field(default_factory=list)
    max_pending: int = 1024  # requests in flight (generating or queued) before 429
    max_logprobs: int = 20
    max_num_seqs: int = 256  # the engine's (LLM's max_num_seqs): the largest n
    max_body_bytes: int = 32 << 20
    chat_template: str | None = None  # overrides the model's (template text)
    retry_after_s: int = 1  # the Retry-After of a 429 or 503
    allowed_local_media_path: str | None = None  # file:// image URLs may name files below it


class ServerState:
    def __init__(self, engine: AsyncLLM, config: ServerConfig) -> None:
        self.engine = engine
        self.llm = engine.llm
        self.tokenizer = self.llm.tokenizer
        self.config = config
        self.limits = Limits(
            defaults=server_defaults(self.llm),
            max_model_len=self.llm.max_model_len,
            max_new_tokens=self.llm.generation_config.get("max_new_tokens"),
            max_logprobs=config.max_logprobs,
            max_num_seqs=config.max_num_seqs,
        )
        self.metrics = Metrics(config.served_model_names[0])
        self.created = int(time.time())
        self.runs: set[Run] = set()  # requests in flight
        self.draining = False  # set on SIGTERM: no new requests
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="corral-prompt")
        self._token_texts: dict[int, str] = {}

    def model_name(self, requested: str | None) -> str:
        """The served name a request asks for (the first one if it names none); 404 if unknown."""
        if requested is None:
            return self.config.served_model_names[0]
        if requested not in self.config.served_model_names:
            raise APIError(404, f"The model `{requested}` does not exist.", "model")
        return requested

    def admit(self) -> None:
        """Refuses a new request while draining (503) or beyond --max-pending (429); the openai
        client retries both after Retry-After."""
        retry = {"Retry-After": str(self.config.retry_after_s)}
        if self.draining:
            raise APIError(503, "The server is shutting down.", headers=retry)
        if len(self.runs) >= self.config.max_pending:
            raise APIError(
                429, f"The server is busy: {len(self.runs)} requests in flight (--max-pending). Retry later.",
                headers=retry,
            )

    async def prepare(self, size: int, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) (templating, tokenizing), on a worker thread when the input is long."""
        if size < OFFLOAD_CHARS:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def token_text(self, token_id: int) -> str:
        """A token's text, for log-probabilities (cached: the vocabulary bounds the cache)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
