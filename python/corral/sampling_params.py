"""How to pick tokens for one request (shaped like vLLM's SamplingParams)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from corral import _core


@dataclass
class SamplingParams:
    n: int = 1
    """Samples to generate from the prompt (they share its KV cache)."""
    temperature: float = 0.0
    """0 picks the most likely token (greedy); above 0 samples from softmax(logits / temperature)."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 or -1: all."""
    top_p: float = 1.0
    """Keep the fewest most likely tokens whose probabilities add up to top_p; 1: all."""
    min_p: float = 0.0
    """Keep tokens at least min_p times as likely as the most likely one; 0: all."""
    repetition_penalty: float = 1.0
    """Tokens of the prompt or the output so far: logit / penalty if positive, * penalty if not."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token the output already has."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time the output already has it."""
    max_tokens: int = 16
    """Tokens to generate at most."""
    min_tokens: int = 0
    """Tokens to generate before end-of-sequence tokens, stop tokens and stop strings may end a
    sample."""
    ignore_eos: bool = False
    """Keep generating past the model's end-of-sequence tokens."""
    stop: list[str] | str | None = None
    """Strings that end a sample: its text stops before the first occurrence of any of them (needs
    the tokenizer)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Further token ids that end generation (the stop token is kept in token_ids, not in text)."""
    include_stop_str_in_output: bool = False
    """Keep the stop string (or the stop token's text) at the end of the text."""
    seed: int | None = None
    """Seed of this request's sampler; None draws one from the engine."""
    logprobs: int | None = None
    """With n >= 0, each output token comes with the log-probabilities of itself and of the n most
    likely tokens (CompletionOutput.logprobs)."""
    skip_special_tokens: bool = True
    """Leave special tokens (<|eot|>, ...) out of the text."""
    detokenize: bool = True
    """Decode the output tokens to text (needs the tokenizer; stop strings need it too)."""
    json_schema: dict | str | None = None
    """Structured output: the text is compact JSON (no whitespace between tokens) that this JSON
    schema (a dict or its JSON text) accepts; an object schema that lists properties and says
    nothing of others (additionalProperties) takes no others, as in vLLM. At most one of
    json_schema, json_object, regex, choice and grammar may be set; each needs the tokenizer."""
    json_object: bool = False
    """Structured output: the text is a compact JSON object, any object."""
    regex: str | None = None
    """Structured output: the text matches this regular expression (Rust regex syntax)."""
    choice: list[str] | None = None
    """Structured output: the text is one of these strings."""
    grammar: str | None = None
    """Structured output: the text follows this grammar, in llguidance's Lark syntax (GBNF is
    converted); corral.structured_output.tool_call_grammar writes one for tool calls."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0  # vLLM's spelling of "all"
        if isinstance(self.choice, (list, tuple)):
            self.choice = list(self.choice)
        # Each check runs only when the ones before it held (a type before a comparison).
        checks = (
            ("n", lambda: _integer(self.n) and 1 <= self.n < 2**31, "an integer >= 1"),
            ("temperature", lambda: _real(self.temperature) and self.temperature >= 0, ">= 0"),
            ("top_k", lambda: _integer(self.top_k) and 0 <= self.top_k < 2**62, "an integer >= 1, or 0 or -1 (all)"),
            ("top_p", lambda: _real(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", lambda: _real(self.min_p) and 0 <= self.min_p <= 1, "in [0, 1]"),
            ("repetition_penalty", lambda: _real(self.repetition_penalty) and self.repetition_penalty > 0, "> 0"),
            ("presence_penalty", lambda: _real(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            ("frequency_penalty", lambda: _real(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            ("max_tokens", lambda: _integer(self.max_tokens) and 1 <= self.max_tokens < 2**62, "an integer >= 1"),
            ("min_tokens", lambda: _integer(self.min_tokens) and 0 <= self.min_tokens, "an integer >= 0"),
            ("min_tokens", lambda: self.min_tokens <= self.max_tokens, f"<= max_tokens ({self.max_tokens})"),
            ("seed", lambda: self.seed is None or (_integer(self.seed) and 0 <= self.seed < 2**63), "an integer >= 0"),
            ("logprobs", lambda: self.logprobs is None or (_integer(self.logprobs) and 0 <= self.logprobs < 2**31), ">= 0"),
            ("stop", lambda: all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
            ("stop", lambda: not self.stop or self.detokenize, "empty when detokenize=False (stop strings match text)"),
            ("stop_token_ids", lambda: all(_integer(t) and 0 <= t < 2**31 for t in self.stop_token_ids), "token ids"),
            ("json_schema", lambda: self.json_schema is None or isinstance(self.json_schema, (dict, str)), "a dict or its JSON text"),
            ("json_object", lambda: isinstance(self.json_object, bool), "True or False"),
            ("regex", lambda: self.regex is None or isinstance(self.regex, str), "a string"),
            ("choice", lambda: self.choice is None or (isinstance(self.choice, list) and _strings(self.choice)), "a non-empty list of strings"),
            ("grammar", lambda: self.grammar is None or (isinstance(self.grammar, str) and self.grammar.strip()), "a non-empty grammar"),
            ("structured_output", lambda: len(self.structured_output) <= 1, "one of json_schema, json_object, regex, choice, grammar or none"),
        )
        for name, ok, requirement in checks:
            if not ok():
                raise _core.InvalidInputError(f"{name} must be {requirement}, got {str(getattr(self, name))[:80]}")

    @property
    def structured_output(self) -> dict:
        """{field: value} of the structured-output fields set (at most one)."""
        fields = {"json_schema": self.json_schema, "json_object": self.json_object or None, "regex": self.regex,
                  "choice": self.choice, "grammar": self.grammar}
        return {k: v for k, v in fields.items() if v is not None}

    def _to_core(self) -> _core.SamplingParams:
        """The engine's SamplingParams (the engine adds the model's eos and end-of-turn tokens
        unless ignore_eos)."""
        p = _core.SamplingParams()
        p.n = int(self.n)
        p.temperature = float(self.temperature)
        p.top_k = int(self.top_k)
        p.top_p = float(self.top_p)
        p.min_p = float(self.min_p)
        p.repetition_penalty = float(self.repetition_penalty)
        p.presence_penalty = float(self.presence_penalty)
        p.frequency_penalty = float(self.frequency_penalty)
        p.max_tokens = int(self.max_tokens)
        p.min_tokens = int(self.min_tokens)
        p.ignore_eos = bool(self.ignore_eos)
        p.stop_token_ids = [int(t) for t in self.stop_token_ids]
        p.seed = -1 if self.seed is None else int(self.seed)
        p.logprobs = -1 if self.logprobs is None else int(self.logprobs)
        return p


def _strings(values: list) -> bool:
    return bool(values) and all(isinstance(v, str) for v in values)


def _integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(value)
