"""How to pick tokens for one request (shaped like vLLM's SamplingParams)."""

from __future__ import annotations

from dataclasses import dataclass, field

from corral import _core


@dataclass
class SamplingParams:
    temperature: float = 0.0
    """0 picks the most likely token (greedy); above 0 samples from softmax(logits / temperature)."""
    max_tokens: int = 16
    """Tokens to generate at most."""
    ignore_eos: bool = False
    """Keep generating past the model's end-of-sequence tokens."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Further token ids that end generation (the stop token is kept in the output)."""
    seed: int | None = None
    """Seed of this request's sampler; None draws one from the engine."""
    logprobs: int | None = None
    """With n >= 0, each output token comes with the log-probabilities of itself and of the n most
    likely tokens (CompletionOutput.logprobs)."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")

    def _to_core(self) -> _core.SamplingParams:
        p = _core.SamplingParams()
        p.temperature = float(self.temperature)
        p.max_tokens = int(self.max_tokens)
        p.ignore_eos = bool(self.ignore_eos)
        p.stop_token_ids = [int(t) for t in self.stop_token_ids]
        p.seed = -1 if self.seed is None else int(self.seed)
        p.logprobs = -1 if self.logprobs is None else int(self.logprobs)
        return p
