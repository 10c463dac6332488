"""Perplexity of a text under a model: exp of the mean negative log-likelihood of its tokens.

The tokens (with the tokenizer's BOS) are cut into windows of at most `window` tokens that overlap
by one, so every token after the first is predicted exactly once, from the tokens before it in
its window; windows run through the engine as batches of prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    tokens: int  # tokens predicted
    mean_nll: float  # nats per token


def windows(token_ids: Sequence[int], window: int) -> list[list[int]]:
    """Consecutive windows of at most `window` tokens, each starting at the previous one's last."""
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    ids = list(token_ids)
    return [ids[start : start + window] for start in range(0, max(len(ids) - 1, 1), window - 1)]


def perplexity(llm, text: str, window: int | None = None, windows_per_batch: int = 8) -> Perplexity:
    """The perplexity of `text` under `llm` (a corral.LLM with a tokenizer); window defaults to
    the model's max_model_len."""
    tokenizer = llm._require_tokenizer("perplexity")
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise ValueError("the text has fewer than 2 tokens: nothing to predict")
    pieces = windows(ids, window or llm.max_model_len)
    total, count = 0.0, 0
    for b in range(0, len(pieces), windows_per_batch):
        batch = pieces[b : b + windows_per_batch]
        # The engine keeps only each position's log-probability of the next token: one pass of
        # logits at a time, however long the windows.
        for piece, logprobs in zip(batch, llm._engine.prompt_logprobs(batch), strict=True):
            total -= float(logprobs[:-1].sum())
            count += len(piece) - 1
    mean = total / count
    return Perplexity(float(np.exp(mean)), count, mean)
