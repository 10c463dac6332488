"""AsyncLLM: an LLM for asyncio services (corral serve).

The engine steps on its C++ thread with the GIL released. Every request's updates go to one
UpdateInbox; one pump thread takes them in batches and hands each batch to the event loop,
which detokenizes and feeds each request's asyncio queue. So the event loop never waits for a
step, and Python runs once per batch of updates, not once per token of each request.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from corral import _core
from corral.llm import LLM, _Request
from corral.sampling_params import SamplingParams

# How long the pump waits for updates before it checks whether it should stop, in seconds.
_PUMP_WAIT_S = 0.1


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    """The most likely tokens (SamplingParams.logprobs of them), most likely first."""


@dataclass
class SampleDelta:
    """What one engine step added to one sample of a request."""

    index: int
    text: str
    """New text: stop strings cut, a possible stop string's start held back until it is decided."""
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None
    """None while running, else 'stop', 'length', 'abort' or 'error'."""
    stop_reason: int | str | None


class RequestHandle:
    """One request's progress: `async for deltas in handle` yields the list of SampleDelta each
    step produced, and ends when every sample has finished. Leaving the loop early (break, an
    exception, a cancelled task) aborts the request."""

    def __init__(self, owner: AsyncLLM, key: int, request: _Request) -> None:
        self._owner = owner
        self._key = key
        self.request = request  # the samples' tokens and text so far (corral.llm._Request)
        self.request_id: int | None = None  # the engine's id, once added
        self._queue: asyncio.Queue = asyncio.Queue()  # lists of SampleDelta, then None or an exception
        self._aborted = False

    @property
    def finished(self) -> bool:
        return self.request.finished

    def __aiter__(self) -> AsyncIterator[list[SampleDelta]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[list[SampleDelta]]:
        try:
            while True:
                item = await self._queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not self.finished:
                self.abort()

    def abort(self) -> None:
        """Ends the request: the engine frees its KV blocks before its next step. Idempotent."""
        if self._aborted or self.finished:
            return
        self._aborted = True
        if self.request_id is not None:
            self._owner.llm._async.abort(self.request_id)


class AsyncLLM:
    """Serves requests of an LLM to asyncio code. Create it on the event loop it will serve."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self._loop = asyncio.get_running_loop()
        self._inbox = _core.UpdateInbox()
        self._handles: dict[int, RequestHandle] = {}  # by key; only the event loop touches it
        self._keys = itertools.count()
        self._closed = False
        self._pump_thread = threading.Thread(target=self._pump, name="corral-update-pump", daemon=True)
        self._pump_thread.start()

    @property
    def num_unfinished(self) -> int:
        """Requests added and not finished yet."""
        return len(self._handles)

    async def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        images: list[np.ndarray] | None = None,
    ) -> RequestHandle:
        """Queues a request (images: the pixel arrays of its image tokens, as LLM prepares them);
        raises corral's InvalidInputError or OutOfKVCacheError when the engine refuses it. The
        engine call runs on a worker thread: it waits for the current step to end, which the
        event loop must not."""
        if self._closed:
            raise _core.CorralError("the engine is shut down")
        core = self.llm._core_params(params)
        max_num_seqs = self.llm._options.max_num_seqs
        if params.n > max_num_seqs:  # the engine's check, made before n samples are set up here
            raise _core.InvalidInputError(f"n must be in [1, max_num_seqs = {max_num_seqs}], got {params.n}")
        key = next(self._keys)
        tokenizer = self.llm.tokenizer if params.detokenize else None
        handle = RequestHandle(self, key, _Request(None, prompt, list(prompt_token_ids), params, tokenizer))
        self._handles[key] = handle  # before the engine has it: its first updates find it
        try:
            handle.request_id = await asyncio.to_thread(
                self.llm._async.add_request_to, self._inbox, key, handle.request.prompt_token_ids, core, images or []
            )
        except BaseException:
            self._handles.pop(key, None)
            raise
        handle.request.request_id = handle.request_id
        if handle._aborted:  # aborted while being added
            self.llm._async.abort(handle.request_id)
        return handle

    async def stats(self) -> dict:
        """The engine's counters (LLM.stats), read on a worker thread: they wait for a step."""
        return await asyncio.to_thread(self.llm.stats)

    def close(self) -> None:
        """Aborts every request and stops the pump thread."""
        if self._closed:
            return
        self._closed = True
        for handle in list(self._handles.values()):
            handle.abort()
        self._inbox.close()
        self._pump_thread.join()

    def _pump(self) -> None:
        while not self._closed:
            batch = self._inbox.wait(_PUMP_WAIT_S)
            if batch:
                try:
                    self._loop.call_soon_threadsafe(self._deliver, batch)
                except RuntimeError:  # the loop is closed: nobody is left to serve
                    return

    def _deliver(self, batch: list) -> None:
        """On the event loop: applies a batch of updates and feeds each request's queue. A
        request whose update fails (an engine error, or decoding its tokens) ends alone."""
        deltas: dict[int, list[SampleDelta]] = {}
        failed: dict[int, Exception] = {}
        for key, update in batch:
            handle = self._handles.get(key)
            if handle is None or key in failed:
                continue  # ended already (a stop string, an abort, a failure)
            sample = handle.request.samples[update.index]
            if sample.finish_reason is not None:
                continue  # ended on our side (a stop string): the engine's last word on it
            try:
                before = len(sample.token_ids)
                if handle.request.apply(sample, update):  # a stop string ended a sample the engine still runs
                    self.llm._async.finish_sample(handle.request_id, update.index)
                delta = _delta(sample, update, before)
            except Exception as e:
                failed[key] = e
                continue
            deltas.setdefault(key, []).append(delta)
            if delta.finish_reason == "error":
                failed[key] = _core.CorralError(update.error or "the engine failed")
        for key in deltas.keys() | failed.keys():
            handle = self._handles[key]
            if key in deltas:
                handle._queue.put_nowait(deltas[key])
            if key in failed or handle.request.finished:
                del self._handles[key]
                handle.abort()  # the samples still running, after a failure
                handle._queue.put_nowait(failed.get(key))


def _delta(sample, update, before: int) -> SampleDelta:
    text = "".join(sample.deltas)
    sample.deltas.clear()
    logprobs = None
    if sample.logprobs is not None:
        logprobs = [
            TokenLogprobs(int(entry[0][0]), float(entry[0][1]), [(int(t), float(lp)) for t, lp in entry[1:]])
            for entry in update.logprobs[: len(sample.token_ids) - before]
        ]
    return SampleDelta(
        index=sample.index,
        text=text,
        token_ids=sample.token_ids[before:],
        logprobs=logprobs,
        finish_reason=sample.finish_reason,
        stop_reason=sample.stop_reason,
    )
