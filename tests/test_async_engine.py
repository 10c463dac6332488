"""corral::AsyncEngine (through corral._core): its thread steps while other threads add and abort
requests; streams, finish_sample, destruction with requests in flight; and the generation
defaults the engine reads in C++ against transformers' reading of the same files."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
from transformers import AutoTokenizer, GenerationConfig

import corral
from corral import _core

DEMO = corral.demo_model_path()
END_TOKENS = ("<|eot|>", "<|eom|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")


def options(**kw) -> _core.EngineOptions:
    o = _core.EngineOptions()
    o.num_threads = 2
    for k, v in kw.items():
        setattr(o, k, v)
    return o


def params(**kw) -> _core.SamplingParams:
    return corral.SamplingParams(**kw)._to_core()


def read(stream, first=()) -> tuple[dict[int, list[int]], dict[int, str]]:
    """Every update of a stream until it ends (after `first`, updates taken already): tokens and
    finish reason per sample."""
    tokens: dict[int, list[int]] = {}
    finish: dict[int, str] = {}

    def take(updates):
        for u in updates:
            assert u.index not in finish, "an update after the sample's last"
            tokens.setdefault(u.index, []).extend(u.new_token_ids)
            if u.finished:
                finish[u.index] = u.finish_reason

    take(first)
    while not stream.finished:
        take(stream.next(1.0))
    return tokens, finish


def assert_idle(engine) -> None:
    s = engine.stats()
    assert s["requests_running"] == s["requests_waiting"] == 0
    assert s["kv_blocks_free"] == s["kv_blocks_total"], "a KV block leaked"


@pytest.fixture(scope="module")
def async_engine():
    return _core.AsyncEngine(str(DEMO), options(max_num_seqs=16))


def test_four_threads_add_and_abort_while_the_engine_steps(async_engine):
    rng = np.random.default_rng(0)
    specs = []
    for i in range(8):
        prompt = [1, *rng.integers(3, 8000, size=int(rng.integers(1, 40))).tolist()]
        kw = dict(max_tokens=int(rng.integers(4, 24)), ignore_eos=True)
        if i % 2:
            kw.update(n=2, temperature=0.8, top_p=0.9, seed=100 + i)
        specs.append((prompt, params(**kw)))
    # Each request alone first: what it must give in any company.
    solo = [read(async_engine.add_request(p, sp)) for p, sp in specs]
    assert_idle(async_engine.engine)

    failures: list[str] = []
    aborted = []

    def client(t: int) -> None:
        local = np.random.default_rng(t)
        try:
            for j in range(6):
                k = int(local.integers(len(specs)))
                stream = async_engine.add_request(*specs[k])
                if j % 3 == 2:  # abort once the first tokens came
                    first = stream.next(5.0)
                    async_engine.abort(stream.request_id)
                    tokens, finish = read(stream, first)
                    aborted.append(finish)
                    for i, reason in finish.items():
                        if reason != "abort":  # it ended before the abort: then as alone
                            assert (tokens[i], reason) == (solo[k][0][i], solo[k][1][i])
                    assert len(finish) == specs[k][1].n
                else:
                    assert read(stream) == solo[k], f"request {k} differs from its solo run"
        except Exception as e:  # noqa: BLE001: reported by the main thread
            failures.append(f"client {t}: {e!r}")

    threads = [threading.Thread(target=client, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=600)
    assert not any(th.is_alive() for th in threads), "a client hangs"
    assert not failures, failures
    assert any("abort" in f.values() for f in aborted), "no abort landed while its request ran"
    async_engine.drain()
    assert_idle(async_engine.engine)


def test_finish_sample_ends_one_sample(async_engine):
    stream = async_engine.add_request([1, 300, 400], params(n=2, max_tokens=40, ignore_eos=True))
    async_engine.finish_sample(stream.request_id, 1)
    tokens, finish = read(stream)
    assert finish == {0: "length", 1: "stop"}
    assert len(tokens[0]) == 40 and len(tokens.get(1, [])) < 40
    assert_idle(async_engine.engine)


def test_errors_reach_the_caller_and_unknown_ids_are_ignored(async_engine):
    with pytest.raises(corral.InvalidInputError, match="outside the vocabulary"):
        async_engine.add_request([1, 10**6], params())
    async_engine.abort(10**9)
    async_engine.finish_sample(10**9, 0)
    tokens, finish = read(async_engine.add_request([1, 5], params(max_tokens=3, ignore_eos=True)))
    assert finish == {0: "length"} and len(tokens[0]) == 3


def test_add_requests_is_all_or_none(async_engine):
    before = async_engine.stats()
    with pytest.raises(corral.InvalidInputError, match="outside the vocabulary"):
        async_engine.add_requests([[1, 2, 3] * 20, [1, 10**6]], [params(max_tokens=50)] * 2)
    assert async_engine.stats() == before  # the valid one was never stepped
    # The same while the engine thread steps another request: still none of them is stepped.
    # Each add waits for at most the step in progress (steps let pending adds in first), so the
    # running request is still far from its end after the 20 refusals below; an add kept out by
    # the engine thread retaking its lock would let it run to its end.
    running = async_engine.add_request([1, 42], params(max_tokens=4000, ignore_eos=True))
    running.next(5.0)  # its prefill is done
    prefilled = async_engine.stats()["prefill_tokens_computed"]
    for _ in range(20):
        with pytest.raises(corral.InvalidInputError):
            async_engine.add_requests([[1, 2, 3] * 20, [1, 10**6]], [params(max_tokens=50)] * 2)
    assert async_engine.stats()["prefill_tokens_computed"] == prefilled
    async_engine.abort(running.request_id)
    assert read(running)[1] == {0: "abort"}
    streams = async_engine.add_requests([[1, 2], [1, 3, 4]], [params(max_tokens=3, ignore_eos=True)] * 2)
    assert [len(read(s)[0][0]) for s in streams] == [3, 3]


def test_destruction_aborts_requests_in_flight():
    engine = _core.AsyncEngine(str(DEMO), options())
    streams = [engine.add_request([1, 7 + i], params(max_tokens=2000, ignore_eos=True)) for i in range(3)]
    while not streams[0].next(5.0):
        pass
    del engine  # joins the engine thread; the streams outlive it
    for s in streams:
        tokens, finish = read(s)
        assert finish == {0: "abort"} and len(tokens.get(0, [])) < 2000


def test_stop_tokens_and_defaults_match_transformers(tmp_path):
    """The engine reads generation_config.json and the tokenizer's special tokens in C++; the
    independent reading is transformers'."""
    engine = _core.AsyncEngine(str(DEMO), options()).engine
    gen = GenerationConfig.from_pretrained(DEMO)
    tok = AutoTokenizer.from_pretrained(DEMO)
    config = json.loads((DEMO / "config.json").read_text())
    text_config = config.get("text_config", config)
    eos = text_config.get("eos_token_id")
    ids = set(eos if isinstance(eos, list) else [eos]) | set(gen.eos_token_id)
    ids |= {tok.convert_tokens_to_ids(t) for t in (tok.eos_token, *END_TOKENS) if t in tok.get_vocab()}
    assert engine.stop_token_ids == sorted(ids)
    d = engine.default_sampling_params
    assert d.temperature == pytest.approx(gen.temperature) and d.top_p == pytest.approx(gen.top_p)
    assert corral.LLM(DEMO).get_default_sampling_params() == corral.SamplingParams(temperature=gen.temperature,
                                                                                   top_p=gen.top_p)

    # A tokenizer folder of its own (EngineOptions.tokenizer_dir, LLM's tokenizer=) whose
    # eos_token is a token a greedy run produces: generation now stops on it.
    ae = _core.AsyncEngine(str(DEMO), options())
    run, _ = read(ae.add_request([1, 300, 400], params(max_tokens=12, ignore_eos=True)))
    run = run[0]
    at = next(i for i in range(1, len(run)) if run[i] not in run[:i] and run[i] not in ids)
    assert not set(run[:at]) & ids  # the run ends at `at` only through the new eos_token
    tok_dir = tmp_path / "tokenizer"
    tok_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / name, tok_dir / name)
    tc = json.loads((tok_dir / "tokenizer_config.json").read_text())
    tc["eos_token"] = tok.convert_ids_to_tokens(run[at])
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(tc))
    other = _core.AsyncEngine(str(DEMO), options(tokenizer_dir=str(tok_dir)))
    assert other.engine.stop_token_ids == sorted(ids | {run[at]})
    tokens, finish = read(other.add_request([1, 300, 400], params(max_tokens=12)))
    assert (tokens[0], finish[0]) == (run[: at + 1], "stop")
