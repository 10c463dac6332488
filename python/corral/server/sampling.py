"""From the sampling fields of a chat or completions request to corral.SamplingParams.

Fields the request leaves out take the model's generation_config.json values, then OpenAI's
defaults (vLLM's rule). The prompt's length decides the output budget: chat may use the rest of the
context by default, completions 16 tokens; a prompt or max_tokens that cannot fit is refused with
vLLM's wording.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from corral.sampling_params import SamplingParams
from corral.server.errors import bad_request, max_tokens_too_large, prompt_too_long
from corral.server.protocol import GenerationRequest

# Request fields copied into SamplingParams as they are when sent.
_SAMPLING_FIELDS = (
    "n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "stop", "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens",
)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What bounds a request's sampling, fixed when the server starts."""

    defaults: SamplingParams  # generation_config.json's values, OpenAI's otherwise
    max_model_len: int
    max_new_tokens: int | None  # generation_config.json's max_new_tokens: a cap on the default
    max_logprobs: int
    max_num_seqs: int  # the engine's batch: the most samples (n) one request may ask for


def server_defaults(llm) -> SamplingParams:
    """generation_config.json's sampling values; a temperature it does not set is OpenAI's 1.0
    (SamplingParams' own default, 0, is greedy)."""
    defaults = llm.get_default_sampling_params()
    if "temperature" not in llm.generation_config:
        defaults = dataclasses.replace(defaults, temperature=1.0)
    return defaults


def check_prompt_length(prompt_len: int, limits: Limits) -> None:
    if prompt_len >= limits.max_model_len:
        raise prompt_too_long(limits.max_model_len, prompt_len)


def sampling_params(
    request: GenerationRequest,
    prompt_len: int,
    limits: Limits,
    *,
    default_max_tokens: int | None,
    constraint: dict[str, Any] | None = None,
    skip_special_tokens: bool | None = None,
) -> SamplingParams:
    """SamplingParams for a request whose (longest) prompt has prompt_len tokens.

    default_max_tokens is the budget when the request sets none (None: the rest of the context);
    constraint holds SamplingParams' structured-output fields (json_schema=..., grammar=...);
    skip_special_tokens overrides the request's (tool calls need their special tokens)."""
    check_prompt_length(prompt_len, limits)
    room = limits.max_model_len - prompt_len
    max_tokens = request.requested_max_tokens
    if max_tokens is not None and max_tokens > room:
        raise max_tokens_too_large(max_tokens, limits.max_model_len, prompt_len)
    if max_tokens is None:
        caps = (room, default_max_tokens, limits.max_new_tokens)
        max_tokens = min(c for c in caps if c is not None)

    if not 1 <= request.n <= limits.max_num_seqs:
        # Checked before anything is allocated per sample.
        raise bad_request(f"n must be in [1, max_num_seqs = {limits.max_num_seqs}], got {request.n}", "n")
    logprobs = request.logprobs_count
    if logprobs is not None and not 0 <= logprobs <= limits.max_logprobs:
        raise bad_request(f"logprobs must be between 0 and {limits.max_logprobs}, got {logprobs}", "logprobs")
    if request.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias")

    fields = {name: getattr(request, name) for name in _SAMPLING_FIELDS if getattr(request, name) is not None}
    if request.seed is not None:
        fields["seed"] = request.seed % 2**63  # OpenAI takes any int64; the sampler a non-negative seed
    if skip_special_tokens is not None:
        fields["skip_special_tokens"] = skip_special_tokens
    return dataclasses.replace(
        limits.defaults, **fields, max_tokens=max_tokens, logprobs=logprobs, **(constraint or {})
    )


def output_constraint(request: GenerationRequest) -> dict[str, Any]:
    """SamplingParams' structured-output fields for response_format or vLLM's structured_outputs."""
    fmt, so = request.response_format, request.structured_outputs
    if fmt is not None and fmt.type == "json_object":
        return {"json_object": True}
    if fmt is not None and fmt.type == "json_schema":
        schema = (fmt.json_schema or {}).get("schema")
        if not isinstance(schema, dict):
            raise bad_request("response_format json_schema needs json_schema.schema, a JSON schema object",
                              "response_format")
        return {"json_schema": schema}
    if so is not None:
        if isinstance(so.json_, str):
            try:
                so = so.model_copy(update={"json_": json.loads(so.json_)})
            except ValueError as e:
                raise bad_request(f"structured_outputs.json is not JSON: {e}", "structured_outputs") from None
        given = {k: v for k, v in (("json_schema", so.json_), ("regex", so.regex), ("choice", so.choice),
                                   ("grammar", so.grammar)) if v is not None}
        if len(given) != 1:
            raise bad_request("structured_outputs takes exactly one of json, regex, choice, grammar",
                              "structured_outputs")
        return given
    return {}
