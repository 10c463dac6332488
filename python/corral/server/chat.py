"""POST /v1/chat/completions, and the chat prompt it shares with /tokenize."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import jinja2
import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from corral import _core
from corral.multimodal import chat_images, pixel_arrays
from corral.server import protocol
from corral.server.errors import bad_request
from corral.server.generation import Choice, Run
from corral.server.media import open_image_url
from corral.server.protocol import ChatCompletionRequest
from corral.server.sampling import output_constraint, sampling_params
from corral.server.state import OFFLOAD_CHARS, ServerState
from corral.server.tools import ToolUse, stream_deltas
from corral.tool_calls import prepare_messages


def _message(i: int, message: dict[str, Any]) -> dict[str, Any]:
    """A message as the template takes it: content as a string (text parts joined, as vLLM does
    for string-content templates), or, when it has images, as its text and {"type": "image"}
    parts (Llama 4's template renders each image as <|image|> in place)."""
    role = message.get("role")
    if not isinstance(role, str):
        raise bad_request(f"messages[{i}].role must be a string", "messages")
    content = message.get("content")
    if isinstance(content, list):
        texts, has_image = [], False
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":  # an image part, its image taken out (multimodal.chat_images)
                has_image = True
                continue
            if kind != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"messages[{i}].content: not a text or image_url part", "messages")
            texts.append(part["text"])
        if not has_image:
            content = "\n".join(texts)
    elif content is not None and not isinstance(content, str):
        raise bad_request(f"messages[{i}].content must be a string or a list of parts", "messages")
    return {**message, "content": content}


async def chat_prompt(
    state: ServerState,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict] | None,
    add_generation_prompt: bool,
    continue_final_message: bool,
    chat_template_kwargs: dict[str, Any] | None,
) -> tuple[list[int], list[np.ndarray]]:
    """The token ids of the rendered conversation (the template writes the BOS itself), each
    image laid out in them, and the images' pixel arrays."""
    if not messages:
        raise bad_request("messages must not be empty", "messages")
    try:
        messages, images = chat_images(messages)
    except _core.InvalidInputError as e:
        raise bad_request(str(e), "messages") from None
    conversation = prepare_messages([_message(i, m) for i, m in enumerate(messages)])
    tokenizer = state.tokenizer

    def render() -> tuple[list[int], list[np.ndarray]]:
        try:
            text = tokenizer.apply_chat_template(
                conversation,
                tools=tools,
                chat_template=state.config.chat_template,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message,
                **(chat_template_kwargs or {}),
            )
        except (jinja2.TemplateError, ValueError, TypeError) as e:
            raise bad_request(f"the chat template cannot render these messages: {e}", "messages") from None
        ids = tokenizer.encode(text, add_special_tokens=False)
        if not images:
            return ids, []
        # Decoding and resizing images is slow work: it runs here, on the worker thread.
        prompts = state.llm._images
        prompts.check_count(len(images), "messages")  # before any download
        opened = [open_image_url(url, state.config.allowed_local_media_path) for url in images]
        processed = prompts.process(opened, "messages")
        return prompts.expand_ids(ids, processed, "messages"), pixel_arrays(processed)

    size = sum(len(str(m.get("content") or "")) for m in conversation) + (OFFLOAD_CHARS if images else 0)
    return await state.prepare(size, render)


def _template_text(state: ServerState, request: ChatCompletionRequest) -> str:
    try:
        return state.tokenizer.get_chat_template(state.config.chat_template, request.tools)
    except ValueError:
        return ""  # no usable template: rendering the prompt says so


async def create_chat_completion(state: ServerState, request: ChatCompletionRequest, http: Request) -> Response:
    model = state.model_name(request.model)
    run = Run(state)
    try:
        tools = ToolUse(request, _template_text(state, request))
        prompt, images = await chat_prompt(
            state,
            request.messages,
            tools=tools.template_tools,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            chat_template_kwargs=request.chat_template_kwargs,
        )
        params = sampling_params(
            request,
            len(prompt),
            state.limits,
            default_max_tokens=None,
            constraint=tools.constraint or output_constraint(request),
            skip_special_tokens=tools.skip_special_tokens,
        )
        await run.start([prompt], params, [images])
    except BaseException:
        run.close()
        raise
    return await run.respond(http, _ChatReply(state, request, model, tools, run), request.stream, request.include_usage)


class _ChatReply:
    """The reply to one chat request, whole or as a stream of chunks."""

    def __init__(self, state: ServerState, request: ChatCompletionRequest, model: str, tools: ToolUse, run: Run):
        self.state, self.request, self.model, self.tools, self.run = state, request, model, tools, run
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.choices = [Choice(i) for i in range(request.n)]
        self.want_logprobs = request.logprobs_count is not None

    def _usage(self) -> dict:
        return protocol.usage(self.run.prompt_tokens, sum(c.num_tokens for c in self.choices))

    def _logprobs(self, entries) -> dict | None:
        return protocol.chat_logprobs(entries, self.state.token_text) if self.want_logprobs else None

    async def body(self) -> dict:
        async for index, delta in self.run.deltas():
            self.choices[index].add(delta)
        out = []
        for c in self.choices:
            message, has_calls = self.tools.message(c.full_text)
            reason = "tool_calls" if has_calls else c.finish_reason
            out.append(protocol.chat_choice(c.index, message, self._logprobs(c.logprobs), reason, c.stop_reason))
        return protocol.chat_completion(self.id, self.created, self.model, out, self._usage())

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> bytes:
        if usage is None and self.request.continuous_usage:
            usage = self._usage()
        return protocol.sse(protocol.chat_chunk(self.id, self.created, self.model, choices, usage))

    def usage_chunk(self) -> bytes:
        return self._chunk([], self._usage())

    async def chunks(self) -> AsyncIterator[bytes]:
        """Role first for each choice, then content or tool-call deltas, and exactly one chunk
        with a finish_reason per choice (its last)."""
        parsers = [self.tools.stream_parser() for _ in self.choices]
        for c in self.choices:
            yield self._chunk([protocol.chat_chunk_choice(c.index, {"role": "assistant", "content": ""})])
        async for index, delta in self.run.deltas():
            choice, parser = self.choices[index], parsers[index]
            choice.add(delta)
            finished = delta.finish_reason is not None
            if parser is None:
                deltas = [{"content": delta.text}] if delta.text else []
            else:
                deltas = stream_deltas(parser.feed(delta.text) + (parser.finish() if finished else []))
            logprobs = self._logprobs(delta.logprobs or [])
            if not deltas and (finished or (logprobs and logprobs["content"])):
                deltas = [{}] if finished else [{"content": ""}]  # a finish, or tokens whose text is held back
            reason = "tool_calls" if parser is not None and parser.calls else delta.finish_reason
            for i, d in enumerate(deltas):
                last = finished and i == len(deltas) - 1
                yield self._chunk([protocol.chat_chunk_choice(
                    index, d, logprobs if i == 0 else None, reason if last else None, delta.stop_reason
                )])
