"""The OpenAI wire format: request models (pydantic) and builders of the replies and stream chunks.

Request models ignore fields they do not know, as vLLM does: clients send fields of newer API
versions (LangChain's max_completion_tokens broke servers that refused unknown fields). Replies
are plain dicts shaped as vLLM sends them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The lowest log-probability written: -inf is not JSON (vLLM writes -9999.0 too).
_MIN_LOGPROB = -9999.0


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


# Requests.


class StreamOptions(_Model):
    include_usage: bool = True  # vLLM's default when stream_options is sent at all
    continuous_usage_stats: bool = False


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None  # {"name", "schema", "strict"}


class StructuredOutputs(_Model):
    """vLLM's extension (vLLM 0.12 and later): one constraint of the output."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")  # `json` would shadow BaseModel.json
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class FunctionDefinition(_Model):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Model):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"] = "function"
    function: NamedFunction


class GenerationRequest(_Model):
    """The fields /v1/chat/completions and /v1/completions share: sampling, stopping, streaming."""

    model: str | None = None
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options needs stream=true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        """Whether every chunk of a stream carries the usage so far."""
        return self.stream_options is not None and self.stream_options.continuous_usage_stats


class ChatCompletionRequest(GenerationRequest):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        # LangChain >= 0.3 sends only max_completion_tokens, which replaced max_tokens.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def logprobs_count(self) -> int | None:
        """How many alternatives each token's log-probability comes with (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    @property
    def logprobs_count(self) -> int | None:
        return self.logprobs


class TokenizeRequest(_Model):
    """{prompt} or {messages, add_generation_prompt, tools}: the second is templated exactly as the
    chat endpoint templates its messages."""

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True  # for prompt (the chat template writes its own BOS)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Model):
    model: str | None = None
    tokens: list[int]


# Replies.


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_completion(request_id: str, created: int, model: str, choices: list[dict], usage_: dict) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_,
    }


def chat_choice(index: int, message: dict, logprobs: dict | None, finish_reason: str | None, stop_reason) -> dict:
    return {
        "index": index,
        "message": message,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
    }


def chat_chunk(request_id: str, created: int, model: str, choices: list[dict], usage_: dict | None = None) -> dict:
    chunk = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def chat_chunk_choice(index: int, delta: dict, logprobs: dict | None = None, finish_reason: str | None = None,
                      stop_reason=None) -> dict:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    if finish_reason is not None:
        choice["stop_reason"] = stop_reason
    return choice


def completion(request_id: str, created: int, model: str, choices: list[dict], usage_: dict | None = None) -> dict:
    """A completion, or (without usage) one chunk of a streamed completion."""
    body = {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def completion_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None, stop_reason) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason, "stop_reason": stop_reason}


def tool_call(call) -> dict:
    """A parsed ToolCall (corral.tool_calls) as OpenAI's message.tool_calls entry."""
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def tool_call_delta(delta) -> dict:
    """A ToolCallDelta as a stream's delta.tool_calls entry: id, type and name on the call's first
    delta, then argument fragments."""
    out: dict[str, Any] = {"index": delta.index}
    if delta.id is not None:
        out["id"] = delta.id
        out["type"] = "function"
    function = {}
    if delta.name is not None:
        function["name"] = delta.name
    if delta.arguments or delta.id is not None:
        function["arguments"] = delta.arguments
    out["function"] = function
    return out


# Log-probabilities. `token_text` gives a token id's text (tokenizer.decode of the one token).


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else _MIN_LOGPROB


def chat_logprobs(entries: Sequence, token_text: Callable[[int], str]) -> dict:
    """OpenAI's chat form: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}; entries are
    corral TokenLogprobs (token_id, logprob, top)."""

    def item(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": _logprob(logprob), "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries
        ]
    }


def completion_logprobs(entries: Sequence, token_text: Callable[[int], str], text_offset: int) -> dict:
    """The legacy completions form {tokens, token_logprobs, top_logprobs: [{token: logprob}],
    text_offset}; the chosen token is among each top_logprobs dict, as in vLLM. text_offset is where
    the first entry's text starts in the choice's text."""
    tokens, offsets = [], []
    for e in entries:
        tokens.append(token_text(e.token_id))
        offsets.append(text_offset)
        text_offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [_logprob(e.logprob) for e in entries],
        "top_logprobs": [
            {token_text(t): _logprob(lp) for t, lp in [(e.token_id, e.logprob), *e.top]} for e in entries
        ],
        "text_offset": offsets,
    }


# Server-sent events.


def sse(data: dict) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
