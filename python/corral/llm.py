"""The LLM class: load a Llama 4 checkpoint, get logits, generate."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

from corral import _core
from corral.outputs import CompletionOutput, RequestOutput
from corral.sampling_params import SamplingParams

_KV_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8")
logger = logging.getLogger("corral")


class LLM:
    """A Llama 4 model loaded from a Hugging Face checkpoint folder.

    Options:
        block_size: tokens per KV-cache block (default 16).
        kv_cache_bytes: memory for the KV cache (default: half of the memory available at load;
            pages are only committed as they are used).
        kv_cache_dtype: "auto" (the weights' dtype), "float32", "bfloat16", "float16" or "fp8"
            (float8 e4m3 with a scale per block and KV head).
        enable_prefix_caching: reuse the KV cache of earlier prompts' full blocks (default True).
        max_model_len: longest sequence, prompt plus output (default: the config's
            max_position_embeddings).
        max_num_seqs: sequences batched in one step (default 256).
        max_num_batched_tokens: tokens in one step; longer prompts are prefilled in pieces
            (default 8192).
        num_threads: CPU threads (default: all cores).
        seed: seed of the samplers of requests that bring none (default 0).
        device: "cpu" (the only device that runs whole models so far).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        block_size: int = 16,
        kv_cache_bytes: int | None = None,
        kv_cache_dtype: str = "auto",
        enable_prefix_caching: bool = True,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        num_threads: int | None = None,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        if device != "cpu":
            raise _core.NotSupportedError(
                f"device={device!r}: whole models run on the CPU so far; the CUDA backend has kernels only"
            )
        if kv_cache_dtype not in _KV_DTYPES:
            raise _core.InvalidInputError(f"kv_cache_dtype={kv_cache_dtype!r} is not one of {_KV_DTYPES}")
        for name, value, low in (
            ("block_size", block_size, 1),
            ("max_num_seqs", max_num_seqs, 1),
            ("max_num_batched_tokens", max_num_batched_tokens, 1),
            ("kv_cache_bytes", kv_cache_bytes, 1),
            ("max_model_len", max_model_len, 1),
            ("num_threads", num_threads, 1),
            ("seed", seed, 0),
        ):
            if value is not None and (not isinstance(value, int) or value < low):
                raise _core.InvalidInputError(f"{name} must be an integer >= {low}, got {value!r}")
        options = _core.EngineOptions()
        options.block_size = block_size
        options.kv_cache_bytes = kv_cache_bytes or 0
        options.kv_cache_dtype = kv_cache_dtype
        options.enable_prefix_caching = bool(enable_prefix_caching)
        options.max_model_len = max_model_len or 0
        options.max_num_seqs = max_num_seqs
        options.max_num_batched_tokens = max_num_batched_tokens
        options.num_threads = num_threads or 0
        options.seed = seed
        self.model_path = os.fspath(model_path)
        self._engine = _core.Engine(self.model_path, options)
        stats = self._engine.stats()
        # Say which code paths run: the CPU ISA level picked at run time, and CUDA's state.
        logger.info(
            "loaded %s: CPU kernels %s (available: %s), %d threads; KV cache %d blocks of %d tokens; CUDA: %s",
            self.model_path,
            _core.ops.cpu_isa(),
            ", ".join(_core.ops.cpu_isas()),
            _core.num_threads(),
            stats["kv_blocks_total"],
            stats["kv_block_size"],
            _core.cuda_status() if _core.cuda_backend_built() else "not built",
        )

    @property
    def config(self) -> dict:
        """The model's configuration as Corral read it (sizes and the per-layer schedule)."""
        return self._engine.config

    @property
    def max_model_len(self) -> int:
        return self._engine.max_model_len

    def logits(self, token_ids: Sequence[int] | Sequence[Sequence[int]]) -> np.ndarray | list[np.ndarray]:
        """Logits at every position of a prompt: a float32 array of shape (len(token_ids), vocab_size).

        Given a list of prompts, runs them as one ragged batch and returns one array per prompt."""
        if token_ids and not isinstance(token_ids[0], (int, np.integer)):
            prompts = [_token_list(p, f"token_ids[{i}]") for i, p in enumerate(token_ids)]
            return self._engine.prompt_logits(prompts)
        return self._engine.prompt_logits([_token_list(token_ids, "token_ids")])[0]

    def generate(
        self,
        prompts: Sequence[Sequence[int]] | Sequence[int],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generates for each prompt (a list of token ids; a single list of ints is one prompt),
        all batched together. sampling_params is one SamplingParams for all prompts or a list with
        one per prompt. Returns one RequestOutput per prompt, in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], str)):
            raise NotImplementedError("text prompts need the tokenizer layer, which is not built yet; pass token ids")
        if prompts and isinstance(prompts[0], (int, np.integer)):
            prompts = [prompts]
        token_lists = [_token_list(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (
            [sampling_params] * len(token_lists) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        )
        if len(params) != len(token_lists):
            raise _core.InvalidInputError(f"{len(params)} sampling params for {len(token_lists)} prompts")

        engine = self._engine
        ids: list[int] = []
        try:
            for tokens, p in zip(token_lists, params):
                ids.append(engine.add_request(tokens, p._to_core()))
            outputs = {
                rid: RequestOutput(rid, tokens, [CompletionOutput(index=0)]) for rid, tokens in zip(ids, token_lists)
            }
            while not all(o.finished for o in outputs.values()):
                for update in engine.step():
                    out = outputs[update.request_id]
                    out.outputs[0].token_ids.extend(update.new_token_ids)
                    if update.logprobs:
                        completion = out.outputs[0]
                        if completion.logprobs is None:
                            completion.logprobs = []
                        completion.logprobs.extend(dict(e) for e in update.logprobs)
                    if update.finished:
                        out.finished = True
                        out.outputs[0].finish_reason = update.finish_reason
        except BaseException:
            for rid in ids:  # leave the engine as it was: no request of this call stays queued
                engine.abort(rid)
            raise
        return [outputs[rid] for rid in ids]

    def stats(self) -> dict:
        """KV-cache and request counters."""
        return self._engine.stats()


def _token_list(tokens: Sequence[int], what: str) -> list[int]:
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1:
            raise _core.ShapeError(f"{what} must be a 1-D sequence of token ids, got shape {tokens.shape}")
        tokens = tokens.tolist()
    out = []
    for i, t in enumerate(tokens):
        if not isinstance(t, (int, np.integer)) or isinstance(t, bool):
            raise _core.InvalidInputError(f"{what}[{i}] is {t!r}, not a token id")
        if not -(2**31) <= int(t) < 2**31:
            raise _core.InvalidInputError(f"{what}[{i}] = {t} is outside the vocabulary")
        out.append(int(t))
    return out
