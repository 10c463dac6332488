"""The LLM class: load a Llama 4 checkpoint, get logits, generate text or tokens, chat, stream."""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from corral import _core
from corral.chat_template import is_conversation_list
from corral.detokenize import IncrementalDetokenizer
from corral.devices import cuda_index
from corral.json_file import read_json_object
from corral.multimodal import ImagePrompts, chat_images, images_of, pixel_arrays
from corral.outputs import CompletionOutput, RequestOutput
from corral.sampling_params import SamplingParams
from corral.structured_output import StructuredOutputCompiler, compiler_for
from corral.tokenizer import NoTokenizerError, Tokenizer, has_tokenizer

_KV_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8")
# The sampling defaults the engine reads from generation_config.json.
_GENERATION_DEFAULTS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_tokens")
# How long a wait for tokens lasts before Python gets to handle signals (Ctrl-C), in seconds.
_WAIT_S = 0.1
logger = logging.getLogger("corral")

# The small trained Llama 4-architecture model shipped in the package (tools/train_demo_model.py).
DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"


def demo_model_path() -> Path:
    """The folder of the bundled demo model, the default model of LLM() and the CLI."""
    if not (DEMO_MODEL / "config.json").is_file():
        raise _core.ModelFileNotFoundError(
            f"the bundled demo model is missing ({DEMO_MODEL / 'config.json'}); "
            "train it with tools/train_demo_model.py, or pass a model folder"
        )
    return DEMO_MODEL

# Weight quantization at load (LLM's `quantization`).
QUANTIZATIONS = (None, "int8", "int4")

# A prompt: text, token ids, or vLLM's dicts {"prompt": text} / {"prompt_token_ids": ids}.
Prompt = str | Sequence[int] | Mapping[str, Any]


class LLM:
    """A Llama 4 model loaded from a Hugging Face checkpoint folder (default: the bundled demo
    model, demo_model_path()).

    Options:
        tokenizer: folder of the tokenizer (default: the model folder). Without a tokenizer.json
            there, the model takes and returns token ids only.
        skip_tokenizer_init: do not load a tokenizer (token ids only).
        block_size: tokens per KV-cache block (default 16).
        kv_cache_bytes: memory for the KV cache (default: half of the memory available at load;
            pages are only committed as they are used).
        kv_cache_dtype: "auto" (the weights' dtype), "float32", "bfloat16", "float16" or "fp8"
            (float8 e4m3 with a scale per block and KV head).
        dtype: what the matrix products multiply bfloat16 weights with: "auto" (activations
            rounded to bfloat16, as llama.cpp and vLLM compute bf16 models: twice the float32
            rate where the CPU has AVX-512 BF16) or "float32" (exact products, slower prefill).
            Float32 and float16 weights always take float32 activations; sums are float32, and
            the residual stream, norms, attention and router stay float32 either way.
        quantization: weights quantized at load for 16/32-bit checkpoints: None (as stored),
            "int8" (every linear int8, one scale per output row) or "int4" (MLPs and experts
            int4 in groups of 32 with searched scales, attention and lm_head int8); the router,
            norms and embedding stay as stored. Integer weights multiply activations quantized
            to 8 bits per token and block of 32 (as llama.cpp's Q8_0). Quantized
            checkpoints (compressed-tensors FP8/int4/int8, fbgemm_fp8) load as published, from
            their config's quantization_config, with quantization=None.
        enable_prefix_caching: reuse the KV cache of earlier prompts' full blocks (default True).
        max_model_len: longest sequence, prompt plus output (default: the config's
            max_position_embeddings).
        max_num_seqs: sequences batched in one step (default 256).
        max_num_batched_tokens: tokens in one step; longer prompts are prefilled in pieces
            (default 8192).
        num_threads: CPU threads (default: all cores).
        seed: seed of the samplers of requests that bring none (default 0).
        device: "cpu" (default), "cuda" or "cuda:N": where the weights, the KV cache and the
            forward passes live. On a GPU: bfloat16 / float16 / float32 checkpoints (quantized
            ones are NotSupportedError so far), the vision encoder there too; DeviceError
            naming the reason when the GPU cannot be used.
        max_images_per_prompt: images one prompt may carry (default: any number; 0: the vision
            encoder of a multimodal checkpoint is not loaded, and images are refused).
        enforce_eager: on a GPU, run decode steps kernel by kernel rather than replaying a CUDA
            graph captured for their batch size (default False: graphs; vLLM's name). The CPU
            ignores it.

    Any number of threads may call one LLM at once: the engine steps on a thread of its own
    (corral::AsyncEngine), and every call's requests join it and advance together in its steps,
    as do those of calls made while a stream is open.
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        *,
        tokenizer: str | os.PathLike | None = None,
        skip_tokenizer_init: bool = False,
        block_size: int = 16,
        kv_cache_bytes: int | None = None,
        kv_cache_dtype: str = "auto",
        dtype: str = "auto",
        quantization: str | None = None,
        enable_prefix_caching: bool = True,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        num_threads: int | None = None,
        seed: int = 0,
        device: str = "cpu",
        max_images_per_prompt: int | None = None,
        enforce_eager: bool = False,
    ) -> None:
        _check_device(device)
        if kv_cache_dtype not in _KV_DTYPES:
            raise _core.InvalidInputError(f"kv_cache_dtype={kv_cache_dtype!r} is not one of {_KV_DTYPES}")
        if dtype not in ("auto", "float32"):
            raise _core.InvalidInputError(f"dtype={dtype!r} is not one of ('auto', 'float32')")
        if quantization not in QUANTIZATIONS:
            raise _core.InvalidInputError(f"quantization={quantization!r} is not one of {QUANTIZATIONS}")
        for name, value, low in (
            ("block_size", block_size, 1),
            ("max_num_seqs", max_num_seqs, 1),
            ("max_num_batched_tokens", max_num_batched_tokens, 1),
            ("kv_cache_bytes", kv_cache_bytes, 1),
            ("max_model_len", max_model_len, 1),
            ("num_threads", num_threads, 1),
            ("seed", seed, 0),
            ("max_images_per_prompt", max_images_per_prompt, 0),
        ):
            if value is not None and (not isinstance(value, int) or value < low):
                raise _core.InvalidInputError(f"{name} must be an integer >= {low}, got {value!r}")
        options = _core.EngineOptions()
        options.block_size = block_size
        options.kv_cache_bytes = kv_cache_bytes or 0
        options.kv_cache_dtype = kv_cache_dtype
        options.dtype = dtype
        options.quantization = quantization or ""
        options.enable_prefix_caching = bool(enable_prefix_caching)
        options.enforce_eager = bool(enforce_eager)
        options.max_model_len = max_model_len or 0
        options.max_num_seqs = max_num_seqs
        options.max_num_batched_tokens = max_num_batched_tokens
        options.num_threads = num_threads or 0
        options.seed = seed
        options.max_images_per_prompt = -1 if max_images_per_prompt is None else max_images_per_prompt
        options.tokenizer_dir = "" if tokenizer is None else os.fspath(tokenizer)
        options.device = device
        self.model_path = os.fspath(demo_model_path() if model_path is None else model_path)
        # The engine reads the stop tokens and sampling defaults (generation_config.json, the
        # tokenizer's special tokens) itself, as a C++ service gets them.
        self._options = options
        self._async = _core.AsyncEngine(self.model_path, options)
        self._engine = self._async.engine
        self._tokenizer = self._load_tokenizer(tokenizer, skip_tokenizer_init)
        self._images = ImagePrompts(self.model_path, self._engine.vision, self._tokenizer)
        self.generation_config = _read_generation_config(Path(self.model_path))  # as read, for reference
        stats = self._engine.stats()
        # Say which code paths run: the CPU ISA level picked at run time, and CUDA's state.
        logger.info(
            "loaded %s on %s (weights: %s, %.2f GB): CPU kernels %s (available: %s), %d threads; KV cache %d blocks of %d tokens; CUDA: %s; %s",
            self.model_path,
            device,
            stats["weight_format"],
            stats["weight_bytes"] / 1e9,
            _core.ops.cpu_isa(),
            ", ".join(_core.ops.cpu_isas()),
            _core.num_threads(),
            stats["kv_blocks_total"],
            stats["kv_block_size"],
            (f"{_core.cuda_status()}, {_core.cuda_blas_status()}" if device != "cpu" else _core.cuda_status())
            if _core.cuda_backend_built()
            else "not built",
            self._tokenizer or "no tokenizer (token ids only)",
        )

    def _load_tokenizer(self, path: str | os.PathLike | None, skip: bool) -> Tokenizer | None:
        if skip:
            return None
        if path is None:
            if not has_tokenizer(self.model_path):
                return None
            path = self.model_path
        tok = Tokenizer(path)
        vocab = self.config["vocab_size"]
        if len(tok) > vocab:
            logger.warning(
                "the tokenizer has %d tokens, the model %d: ids from %d up cannot be fed", len(tok), vocab, vocab
            )
        return tok

    @property
    def config(self) -> dict:
        """The model's configuration as Corral read it (sizes and the per-layer schedule)."""
        return self._engine.config

    @property
    def max_model_len(self) -> int:
        return self._engine.max_model_len

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self._tokenizer

    def get_tokenizer(self) -> Tokenizer | None:
        """The model's tokenizer; None when the folder has none (token ids only)."""
        return self._tokenizer

    @property
    def stop_token_ids(self) -> list[int]:
        """Every token id that ends generation unless ignore_eos: the config's eos ids, the
        tokenizer's eos and end-of-turn tokens and generation_config.json's eos ids."""
        return list(self._engine.stop_token_ids)

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the defaults of the model's generation_config.json (temperature,
        top_k, top_p, min_p, repetition_penalty, max_new_tokens), as vLLM uses them."""
        core = self._engine.default_sampling_params
        # float32 in the engine: its shortest decimal is the value as written in the file.
        values = {name: getattr(core, name) for name in _GENERATION_DEFAULTS}
        return SamplingParams(**{k: float(np.format_float_positional(np.float32(v))) if isinstance(v, float) else v
                                 for k, v in values.items()})

    def logits(self, prompts: Prompt | Sequence[Prompt]) -> np.ndarray | list[np.ndarray]:
        """Logits at every position of a prompt (token ids, or a prompt as generate() takes it,
        images included): a float32 array of shape (prompt tokens, vocab_size).

        Given a list of prompts, runs them as one ragged batch and returns one array per prompt."""
        single = isinstance(prompts, (str, Mapping)) or len(prompts) == 0 or isinstance(prompts[0], (int, np.integer))
        prompt_list = [prompts] if single else list(prompts)
        prepared = [self._prepare(p, "token_ids" if single else f"token_ids[{i}]") for i, p in enumerate(prompt_list)]
        images = [px for _, _, px in prepared]
        out = self._engine.prompt_logits([ids for _, ids, _ in prepared], images if any(images) else [])
        return out[0] if single else out

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generates for each prompt, all batched together.

        A prompt is a string (encoded with the tokenizer: a leading BOS is added unless the text
        starts with it), a list of token ids, or a dict {"prompt": text} or {"prompt_token_ids":
        ids}, with images as {"multi_modal_data": {"image": image or list of images}} (PIL images,
        encoded bytes, data: or file:// URLs, paths, uint8 arrays): one <|image|> in the text (or
        its token id) per image, in order; a single prompt may be passed alone. sampling_params
        is one SamplingParams for all prompts or a list with one per prompt (default:
        get_default_sampling_params()). Returns one RequestOutput per prompt, in order, each with
        SamplingParams.n outputs."""
        prompt_list = _prompt_list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = (
            [sampling_params] * len(prompt_list)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params) != len(prompt_list):
            raise _core.InvalidInputError(f"{len(params)} sampling params for {len(prompt_list)} prompts")
        prepared = [self._prepare(p, f"prompts[{i}]") for i, p in enumerate(prompt_list)]
        cores = [self._core_params(p) for p in params]

        # All in one go: they share the first step, and a refused one leaves none queued.
        images = [px for _, _, px in prepared]
        streams = self._async.add_requests([ids for _, ids, _ in prepared], cores, images if any(images) else [])
        requests = [
            self._request(s, text, ids, p) for s, (text, ids, _), p in zip(streams, prepared, params, strict=True)
        ]
        try:
            for r in requests:
                while not r.stream.finished:
                    self._receive(r)
        except BaseException:
            for r in requests:  # leave the engine as it was: no request of this call stays queued
                self._abort(r)
            raise
        return [r.output() for r in requests]

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Generates the next turn of a conversation (a list of {"role", "content"} messages) or
        of each of a list of conversations, rendered with the model's chat template (or
        `chat_template`: a template or the name of one of the model's). tools are JSON schemas
        the template offers the model; chat_template_kwargs are further template variables."""
        prompts = self._chat_prompts(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            chat_template=chat_template,
            tools=tools,
            chat_template_kwargs=chat_template_kwargs,
        )
        return self.generate(prompts, sampling_params)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Generates for one prompt (n = 1), yielding text deltas as they are decoded. Their
        concatenation is the final text; the generator returns the RequestOutput (the value of
        its StopIteration). Closing the generator early aborts the request."""
        self._require_tokenizer("streaming text")
        params = self.get_default_sampling_params() if sampling_params is None else sampling_params
        if params.n != 1:
            raise ValueError(f"stream() generates one sample, got n={params.n}")
        if not params.detokenize:
            raise ValueError("stream() yields text: detokenize must be True")
        text, ids, images = self._prepare(prompt, "prompt")
        return self._stream(text, ids, images, params, self._core_params(params))

    def stream_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        sampling_params: SamplingParams | None = None,
        **chat_options: Any,
    ) -> Iterator[str]:
        """stream() for the next turn of one conversation; chat_options as for chat()."""
        (prompt,) = self._chat_prompts([list(messages)], **chat_options)
        return self.stream(prompt, sampling_params)

    def stats(self) -> dict:
        """KV-cache and request counters."""
        return self._engine.stats()

    # Requests.

    def _require_tokenizer(self, what: str) -> Tokenizer:
        if self._tokenizer is None:
            raise NoTokenizerError(
                f"{what} needs a tokenizer, and {os.path.join(self.model_path, 'tokenizer.json')} was not "
                "loaded; pass token ids"
            )
        return self._tokenizer

    def _chat_prompts(
        self,
        messages,
        *,
        add_generation_prompt=True,
        continue_final_message=False,
        chat_template=None,
        tools=None,
        chat_template_kwargs=None,
    ) -> list[dict]:
        tokenizer = self._require_tokenizer("chat")
        conversations = messages if is_conversation_list(messages) else [messages]
        # Image parts become {"type": "image"} (rendered <|image|>), their images kept in order.
        conversations, images = zip(*(chat_images(c) for c in conversations)) if conversations else ((), ())
        texts = tokenizer.apply_chat_template(
            list(conversations),
            tools=tools,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **(chat_template_kwargs or {}),
        )
        # The template writes the BOS itself: encode without adding one.
        return [
            {"prompt": t, "prompt_token_ids": tokenizer.encode(t, add_special_tokens=False),
             **({"multi_modal_data": {"image": im}} if im else {})}
            for t, im in zip(texts, images, strict=True)
        ]

    def _prepare(self, prompt: Prompt, what: str) -> tuple[str | None, list[int], list[np.ndarray]]:
        """(prompt text or None, token ids, its images' pixel arrays) of one prompt."""
        if isinstance(prompt, Mapping):
            images = self._images.process(images_of(prompt, what), what)
            if "prompt_token_ids" in prompt:
                ids = _token_list(prompt["prompt_token_ids"], f"{what}['prompt_token_ids']")
                return prompt.get("prompt"), self._fits(self._images.expand_ids(ids, images, what), images, what), \
                    pixel_arrays(images)
            if "prompt" not in prompt:
                raise _core.InvalidInputError(f"{what} is a dict without 'prompt' or 'prompt_token_ids'")
            text = prompt["prompt"]
            if images:
                if not isinstance(text, str):
                    raise _core.InvalidInputError(f"{what}['prompt'] must be text with one <|image|> per image")
                _, ids, _ = self._prepare(self._images.expand_text(text, images, what), what)
                return text, self._fits(ids, images, what), pixel_arrays(images)
            prompt = text
        if isinstance(prompt, str):
            tokenizer = self._require_tokenizer("a text prompt")
            bos = tokenizer.bos_token
            return prompt, tokenizer.encode(prompt, add_special_tokens=not (bos and prompt.startswith(bos))), []
        return None, _token_list(prompt, what), []

    def _fits(self, ids: list[int], images: list, what: str) -> list[int]:
        """ids, unless with its images' tokens the prompt leaves no room to generate."""
        if images and len(ids) >= self.max_model_len:
            raise _core.InvalidInputError(
                f"{what} has {len(ids)} tokens with its {len(images)} images' tokens "
                f"({sum(i.num_tiles for i in images)} tiles), leaving no room to generate within max_model_len "
                f"{self.max_model_len}"
            )
        return ids

    @cached_property
    def _structured_output(self) -> StructuredOutputCompiler:
        """Compiles the grammars of structured output (built at the first request that has one)."""
        return compiler_for(self._tokenizer, self._engine.vocab_size, self.stop_token_ids)

    def _core_params(self, params: SamplingParams) -> _core.SamplingParams:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be corral.SamplingParams, got {type(params).__name__}")
        if params.stop and self._tokenizer is None:
            self._require_tokenizer("stop strings")
        core = params._to_core()
        if params.structured_output:
            ((field, value),) = params.structured_output.items()
            self._require_tokenizer(f"structured output ({field})")
            # The grammar may end where a stop token may come: the ones that end this request.
            stops = [*([] if params.ignore_eos else self.stop_token_ids), *params.stop_token_ids]
            core.constraint = self._structured_output.constraint(field, value, stops)
        return core

    def _request(self, stream, text: str | None, ids: list[int], params: SamplingParams) -> _Request:
        return _Request(stream.request_id, text, ids, params, self._tokenizer if params.detokenize else None, stream)

    def _receive(self, request: _Request) -> None:
        """Applies the updates the engine thread has for the request, waiting up to _WAIT_S."""
        for update in request.stream.next(_WAIT_S):
            sample = request.samples[update.index]
            if sample.finish_reason is not None:
                continue  # ended on our side (a stop string): the engine's last word on it
            if request.apply(sample, update):  # a stop string ended a sample the engine still runs
                self._async.finish_sample(request.request_id, update.index)

    def _abort(self, request: _Request) -> None:
        """Ends the request in the engine and waits until it has let go of it."""
        if request.stream.finished:
            return
        self._async.abort(request.request_id)
        try:
            while not request.stream.finished:
                request.stream.next(_WAIT_S)
        except _core.CorralError:
            pass  # a step failed: the request has ended all the same

    def _stream(self, text, ids, images, params, core) -> Iterator[str]:
        request = self._request(self._async.add_request(ids, core, images), text, ids, params)
        sample = request.samples[0]
        try:
            while True:
                while sample.deltas:
                    yield sample.deltas.popleft()
                if request.stream.finished:
                    return request.output()
                self._receive(request)
        finally:
            self._abort(request)


class _Sample:
    """One of a request's n samples as it is generated."""

    def __init__(self, index: int, params: SamplingParams, tokenizer: Tokenizer | None) -> None:
        self.index = index
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.deltas: deque[str] = deque()  # text not yet taken by a stream
        self.detokenizer = (
            None
            if tokenizer is None
            else IncrementalDetokenizer(
                tokenizer,
                skip_special_tokens=params.skip_special_tokens,
                stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
                min_tokens=params.min_tokens,
            )
        )

    def add_text(self, delta: str) -> None:
        if delta:
            self.deltas.append(delta)


class _Request:
    def __init__(
        self, request_id, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams, tokenizer, stream=None
    ) -> None:
        self.request_id = request_id
        self.stream = stream  # the engine thread's updates of this request (LLM's; AsyncLLM uses an inbox)
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.samples = [_Sample(i, params, tokenizer) for i in range(params.n)]

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)

    def apply(self, sample: _Sample, update) -> bool:
        """Takes one engine update of one sample. Returns True when a stop string ended the sample
        here, before the engine did."""
        new = list(update.new_token_ids)
        detok = sample.detokenizer
        # The engine ended the sample on its last token (an eos or stop token): its text is not
        # output unless include_stop_str_in_output, as in vLLM.
        on_stop_token = update.finished and update.finish_reason == "stop"
        for k, token in enumerate(new):
            sample.token_ids.append(token)
            if sample.logprobs is not None and k < len(update.logprobs):
                sample.logprobs.append(dict(update.logprobs[k]))
            if detok is None or (on_stop_token and k == len(new) - 1 and not self.params.include_stop_str_in_output):
                continue
            sample.add_text(detok.add(token))
            if detok.stopped:
                sample.finish_reason, sample.stop_reason = "stop", detok.stop_reason
                return not update.finished
        if update.finished:
            if detok is not None:
                sample.add_text(detok.finish())
            sample.finish_reason = update.finish_reason
            if on_stop_token and new and new[-1] in self.params.stop_token_ids:
                sample.stop_reason = new[-1]
        return False

    def output(self) -> RequestOutput:
        outputs = [
            CompletionOutput(
                index=s.index,
                text=s.detokenizer.text if s.detokenizer is not None else "",
                token_ids=list(s.token_ids),
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
                logprobs=s.logprobs,
            )
            for s in self.samples
        ]
        return RequestOutput(self.request_id, self.prompt, list(self.prompt_token_ids), outputs, self.finished)


def _prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, (str, Mapping)):
        return [prompts]
    if isinstance(prompts, np.ndarray):
        return [prompts] if prompts.ndim == 1 else list(prompts)
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], (int, np.integer)):
        return [prompts]
    return prompts


def _check_device(device: str) -> None:
    """DeviceError, before anything loads, when `device` names a GPU this process cannot use (the
    reason: no CUDA backend in this build, the driver's message, no such device)."""
    if device == "cpu":
        return
    index = cuda_index(device)
    if index is None:
        raise _core.InvalidInputError(f"device={device!r} is not 'cpu', 'cuda' or 'cuda:N'")
    count = _core.cuda_device_count()
    if index >= count:
        reason = _core.cuda_status() if count == 0 else f"this machine has {count} CUDA devices"
        raise _core.DeviceError(f"device={device!r}: no such CUDA device ({reason})")


def _read_generation_config(folder: Path) -> dict:
    path = folder / "generation_config.json"
    return read_json_object(path) if path.is_file() else {}


def _token_list(tokens: Sequence[int], what: str) -> list[int]:
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1:
            raise _core.ShapeError(f"{what} must be a 1-D sequence of token ids, got shape {tokens.shape}")
        tokens = tokens.tolist()
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
        raise _core.InvalidInputError(f"{what} is {type(tokens).__name__}, not a list of token ids")
    out = []
    for i, t in enumerate(tokens):
        if not isinstance(t, (int, np.integer)) or isinstance(t, bool):
            raise _core.InvalidInputError(f"{what}[{i}] is {t!r}, not a token id")
        if not -(2**31) <= int(t) < 2**31:
            raise _core.InvalidInputError(f"{what}[{i}] = {t} is outside the vocabulary")
        out.append(int(t))
    return out
