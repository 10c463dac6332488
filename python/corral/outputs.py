"""Results of LLM.generate (shaped like vLLM's RequestOutput)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    """'stop' (an end-of-sequence or stop token), 'length' (max_tokens or the context), or None."""
    text: str = ""
    """Decoded text; empty until a tokenizer is attached."""
    logprobs: list[dict[int, float]] | None = None
    """With SamplingParams.logprobs: per output token, {token id: log-probability} of the chosen
    token and the most likely ones."""


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt: str | None = None
