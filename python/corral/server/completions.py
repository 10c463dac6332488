"""POST /v1/completions: text completion of one prompt or several (text or token ids)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from corral.server import protocol
from corral.server.errors import bad_request
from corral.server.generation import Choice, Run
from corral.server.protocol import CompletionRequest
from corral.server.sampling import output_constraint, sampling_params
from corral.server.state import ServerState

# OpenAI's default budget of a completion.
DEFAULT_MAX_TOKENS = 16


def _prompt_list(request: CompletionRequest) -> list[str | list[int]]:
    prompt = request.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    if isinstance(prompt[0], int):
        return [prompt]
    if any(isinstance(p, list) and not p for p in prompt):
        raise bad_request("a prompt of token ids must not be empty", "prompt")
    return list(prompt)


def _encode(state: ServerState, prompts: list[str | list[int]]) -> list[list[int]]:
    tokenizer, vocab = state.tokenizer, state.llm.config["vocab_size"]
    bos = tokenizer.bos_token
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            # A leading BOS unless the text brings its own (as corral.LLM encodes prompts).
            out.append(tokenizer.encode(p, add_special_tokens=not (bos and p.startswith(bos))))
        elif all(0 <= t < vocab for t in p):
            out.append(p)
        else:
            raise bad_request(f"prompt {i} has a token id outside the vocabulary [0, {vocab})", "prompt")
    return out


async def create_completion(state: ServerState, request: CompletionRequest, http: Request) -> Response:
    model = state.model_name(request.model)
    if request.suffix is not None:
        raise bad_request("suffix is not supported", "suffix")
    if request.echo and request.logprobs is not None:
        raise bad_request("echo with logprobs is not supported (prompt log-probabilities)", "echo")
    run = Run(state)
    try:
        texts = _prompt_list(request)
        size = sum(len(t) for t in texts if isinstance(t, str))
        prompts = await state.prepare(size, _encode, state, texts)
        params = sampling_params(
            request,
            max(len(p) for p in prompts),
            state.limits,
            default_max_tokens=DEFAULT_MAX_TOKENS,
            constraint=output_constraint(request),
        )
        await run.start(prompts, params)
    except BaseException:
        run.close()
        raise
    # echo: each prompt's text before its completions.
    echoes = [(t if isinstance(t, str) else state.tokenizer.decode(t)) if request.echo else "" for t in texts]
    reply = _CompletionReply(state, request, model, run, echoes)
    return await run.respond(http, reply, request.stream, request.include_usage)


class _CompletionReply:
    """The reply to one completions request, whole or streamed; choice i * n + k is sample k of
    prompt i."""

    def __init__(self, state: ServerState, request: CompletionRequest, model: str, run: Run, echoes: list[str]):
        self.state, self.request, self.model, self.run = state, request, model, run
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        n = request.n
        self.choices = [Choice(i) for i in range(len(echoes) * n)]
        self.echoes = [echoes[i // n] for i in range(len(self.choices))]
        # Where each choice's next logprobs entry starts in its text (legacy text_offset).
        self.offsets = [len(e) for e in self.echoes]

    def _usage(self) -> dict:
        return protocol.usage(self.run.prompt_tokens, sum(c.num_tokens for c in self.choices))

    def _logprobs(self, index: int, entries) -> dict | None:
        if self.request.logprobs is None:
            return None
        out = protocol.completion_logprobs(entries, self.state.token_text, self.offsets[index])
        self.offsets[index] += sum(len(t) for t in out["tokens"])
        return out

    async def body(self) -> dict:
        async for index, delta in self.run.deltas():
            self.choices[index].add(delta)
        out = [
            protocol.completion_choice(
                c.index, self.echoes[c.index] + c.full_text, self._logprobs(c.index, c.logprobs), c.finish_reason,
                c.stop_reason,
            )
            for c in self.choices
        ]
        return protocol.completion(self.id, self.created, self.model, out, self._usage())

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> bytes:
        if usage is None and self.request.continuous_usage:
            usage = self._usage()
        return protocol.sse(protocol.completion(self.id, self.created, self.model, choices, usage))

    def usage_chunk(self) -> bytes:
        return self._chunk([], self._usage())

    async def chunks(self) -> AsyncIterator[bytes]:
        """Text deltas per choice (the echoed prompt first), and exactly one chunk with a
        finish_reason per choice."""
        for c in self.choices:
            if self.echoes[c.index]:
                yield self._chunk([protocol.completion_choice(c.index, self.echoes[c.index], None, None, None)])
        async for index, delta in self.run.deltas():
            self.choices[index].add(delta)
            logprobs = self._logprobs(index, delta.logprobs) if delta.logprobs else None
            if delta.text or logprobs or delta.finish_reason is not None:
                yield self._chunk([protocol.completion_choice(
                    index, delta.text, logprobs, delta.finish_reason, delta.stop_reason
                )])
