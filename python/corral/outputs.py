"""Results of LLM.generate (shaped like vLLM's RequestOutput)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    """Which of the request's n samples this is."""
    text: str = ""
    """Decoded text (empty without a tokenizer or with detokenize=False); ends before a stop
    string or stop token unless include_stop_str_in_output."""
    token_ids: list[int] = field(default_factory=list)
    """Generated token ids, the eos or stop token that ended the sample included."""
    finish_reason: str | None = None
    """'stop' (an end-of-sequence token, a stop token or a stop string), 'length' (max_tokens or
    the context), 'abort', or None while running."""
    stop_reason: int | str | None = None
    """The stop string or the stop_token_ids entry that ended the sample; None when it ended
    otherwise (an end-of-sequence token, the length)."""
    logprobs: list[dict[int, float]] | None = None
    """With SamplingParams.logprobs: per output token, {token id: log-probability} of the chosen
    token and the most likely ones."""

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    """The prompt text (None for token-id prompts)."""
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    """One per sample (SamplingParams.n), in index order."""
    finished: bool = False
