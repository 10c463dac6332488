"""corral.async_llm.AsyncLLM (what corral serve runs on): concurrent asyncio requests get what
LLM.generate gives each alone; leaving a request's loop or cancelling its task aborts it and frees
its KV blocks; a refused request leaves nothing behind; a failing structured-output matcher ends
its own request only; the engine's token-mask hook (SamplingParams.constraint) is obeyed."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import corral
from corral import _core
from corral.async_llm import AsyncLLM

PROMPTS = ["Once upon a time", "The file object", "Hello there", "import numpy as np\n", "A B C"]


@pytest.fixture(scope="module")
def llm():
    return corral.LLM(num_threads=2)


def run(coro):
    return asyncio.run(coro)


async def collect(engine: AsyncLLM, prompt: str, params: corral.SamplingParams):
    """Per sample: text, token ids, logprobs, finish and stop reason, from the deltas."""
    handle = await engine.add_request(engine.llm.tokenizer.encode(prompt), params, prompt)
    out = {i: {"text": "", "ids": [], "logprobs": [], "finish": None, "stop": None} for i in range(params.n)}
    async for deltas in handle:
        for d in deltas:
            s = out[d.index]
            assert s["finish"] is None, "a delta after the sample's last"
            s["text"] += d.text
            s["ids"] += d.token_ids
            if d.logprobs is not None:
                s["logprobs"] += [{t.token_id: t.logprob, **dict(t.top)} for t in d.logprobs]
            s["finish"], s["stop"] = d.finish_reason, d.stop_reason
    return out


def assert_idle(llm) -> None:
    s = llm.stats()
    assert s["requests_running"] == s["requests_waiting"] == 0
    assert s["kv_blocks_free"] == s["kv_blocks_total"], "a KV block leaked"


@pytest.mark.parametrize(
    "params",
    [
        corral.SamplingParams(max_tokens=24),
        corral.SamplingParams(max_tokens=24, temperature=0.9, seed=7, n=2, logprobs=3),
        corral.SamplingParams(max_tokens=40, stop=["the", "\n"], include_stop_str_in_output=True, min_tokens=2),
    ],
    ids=["greedy", "seeded-n2-logprobs", "stop-strings"],
)
def test_concurrent_requests_equal_generate(llm, params):
    async def main():
        engine = AsyncLLM(llm)
        try:
            return await asyncio.gather(*[collect(engine, p, params) for p in PROMPTS * 2])
        finally:
            engine.close()

    results = run(main())
    reference = llm.generate(PROMPTS * 2, params)
    for got, ref in zip(results, reference, strict=True):
        for o in ref.outputs:
            s = got[o.index]
            assert (s["text"], s["ids"], s["finish"], s["stop"]) == (o.text, o.token_ids, o.finish_reason, o.stop_reason)
            if o.logprobs is not None:
                assert s["logprobs"] == o.logprobs
    assert_idle(llm)


def test_leaving_the_loop_or_cancelling_aborts(llm):
    long = corral.SamplingParams(max_tokens=3000, ignore_eos=True)

    async def main():
        engine = AsyncLLM(llm)
        ids = llm.tokenizer.encode("A long story")
        # Leave the loop after a few steps.
        handle = await engine.add_request(ids, long)
        steps = 0
        async for _ in handle:
            steps += 1
            if steps == 3:
                break
        # Cancel a task that waits on a request.
        handle2 = await engine.add_request(ids, long)

        async def consume():
            async for _ in handle2:
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):  # the engine ends both before its next step
            await asyncio.sleep(0.02)
            if engine.num_unfinished == 0:
                break
        assert engine.num_unfinished == 0
        stats = await engine.stats()
        engine.close()
        return stats

    stats = run(main())
    assert stats["requests_running"] == stats["requests_waiting"] == 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_refused_request_leaves_nothing(llm):
    async def main():
        engine = AsyncLLM(llm)
        try:
            with pytest.raises(_core.InvalidInputError, match="outside the vocabulary"):
                await engine.add_request([1, 10**6], corral.SamplingParams())
            with pytest.raises(_core.InvalidInputError, match="max_model_len"):
                await engine.add_request([1] * llm.max_model_len, corral.SamplingParams())
            with pytest.raises(_core.InvalidInputError, match="max_num_seqs"):
                await engine.add_request([1, 2], corral.SamplingParams(n=2**31 - 1))
            assert engine.num_unfinished == 0
            # The engine still serves.
            return await collect(engine, "Hello", corral.SamplingParams(max_tokens=5))
        finally:
            engine.close()

    out = run(main())
    assert out[0]["ids"] == llm.generate("Hello", corral.SamplingParams(max_tokens=5))[0].outputs[0].token_ids
    assert_idle(llm)


class AllowOnly:
    """A matcher for SamplingParams.constraint allowing one scripted token per step, then only the
    stop tokens (the engine ends the sample 'stop')."""

    def __init__(self, tokens):
        self.tokens, self.at = list(tokens), 0

    def fill_bitmask(self, mask):
        mask[:] = 0
        if self.at < len(self.tokens):
            t = self.tokens[self.at]
            mask.view(np.uint32)[t // 32] = np.uint32(1) << np.uint32(t % 32)

    def accept_token(self, token):
        assert token == self.tokens[self.at]
        self.at += 1


class Failing(AllowOnly):
    def fill_bitmask(self, mask):
        raise ValueError("matcher broke")


def test_constraint_masks_every_path_and_a_failure_stays_local(llm):
    script = [500, 7, 4000, 123]

    async def main():
        engine = AsyncLLM(llm)
        try:
            constrained = [
                corral.SamplingParams(max_tokens=20),
                corral.SamplingParams(max_tokens=20, temperature=1.5, top_k=50, seed=3, n=3, min_tokens=10),
                corral.SamplingParams(max_tokens=20, repetition_penalty=1.3, presence_penalty=1.0),
            ]
            handles = []
            for p in constrained:
                core = llm._core_params(p)
                core.constraint = lambda: AllowOnly(script)
                # Added to the engine directly: SamplingParams takes grammars, not raw matchers.
                handles.append(llm._async.add_requests([llm.tokenizer.encode("Hi")], [core])[0])
            plain = asyncio.create_task(collect(engine, "Hello there", corral.SamplingParams(max_tokens=12)))
            failing_core = llm._core_params(corral.SamplingParams(max_tokens=5))
            failing_core.constraint = lambda: Failing([])
            failing = llm._async.add_requests([llm.tokenizer.encode("Hi")], [failing_core])[0]
            return handles, await plain, failing
        finally:
            engine.close()

    handles, plain, failing = run(main())
    for stream in handles:
        tokens, finish = {}, {}
        while not stream.finished:
            for u in stream.next(1.0):
                tokens.setdefault(u.index, []).extend(u.new_token_ids)
                if u.finished:
                    finish[u.index] = u.finish_reason
        for index, ids in tokens.items():
            # The script, then a stop token (even under min_tokens: the grammar is complete).
            assert ids[:-1] == script and ids[-1] in llm.stop_token_ids
            assert finish[index] == "stop"
    updates = []
    while not failing.finished:
        updates += failing.next(1.0)
    assert [u.finish_reason for u in updates] == ["error"]
    assert "matcher broke" in updates[0].error
    assert plain[0]["ids"] == llm.generate("Hello there", corral.SamplingParams(max_tokens=12))[0].outputs[0].token_ids
    assert_idle(llm)


def test_a_request_that_fails_to_decode_ends_alone(llm):
    async def main():
        engine = AsyncLLM(llm)
        try:
            long = corral.SamplingParams(max_tokens=200, ignore_eos=True)
            bad = await engine.add_request(llm.tokenizer.encode("Hi"), long)

            def broken(sample, update):
                raise ValueError("cannot decode")

            bad.request.apply = broken
            good = asyncio.create_task(collect(engine, "Hello there", corral.SamplingParams(max_tokens=12)))
            with pytest.raises(ValueError, match="cannot decode"):
                async for _ in bad:
                    pass
            return await good
        finally:
            engine.close()

    out = run(main())
    assert out[0]["ids"] == llm.generate("Hello there", corral.SamplingParams(max_tokens=12))[0].outputs[0].token_ids
    assert_idle(llm)
