"""The C++ engine through its binding: continuous batching, chunked prefill, preemption by
recompute, n > 1 samples by fork, sampling controls, abort; checked against runs alone and
against the transformers reference."""

import numpy as np
import pytest
import torch

from corral import _core
from tiny_models import VOCAB, build, load_reference, reference_logits

EOS = 2  # tiny_models' eos_token_id


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build("chunked", "causal", torch.float32, tmp_path_factory.mktemp("chunked"))


@pytest.fixture(scope="module")
def reference(model_path):
    return load_reference(model_path, "causal")


def engine(path, **options):
    o = _core.EngineOptions()
    o.block_size = 4
    o.num_threads = 2
    for k, v in options.items():
        setattr(o, k, v)
    return _core.Engine(str(path), o)


def params(**fields):
    p = _core.SamplingParams()
    p.ignore_eos = True
    for k, v in fields.items():
        setattr(p, k, v)
    return p


def run(eng, requests):
    """Adds every (prompt, params) at once and steps to the end: per request, per sample, its
    tokens and finish reason."""
    ids = [eng.add_request(prompt, p) for prompt, p in requests]
    out = {rid: {} for rid in ids}
    while eng.has_unfinished():
        for u in eng.step():
            tokens, _ = out[u.request_id].get(u.index, ([], None))
            out[u.request_id][u.index] = (tokens + list(u.new_token_ids), u.finish_reason)
    return [[out[rid][i] for i in sorted(out[rid])] for rid in ids]


def prompt(seed, n):
    return np.random.default_rng(seed).integers(3, VOCAB, size=n).tolist()


# 16 requests of different prompt lengths (some over a chunk and over the step's token budget)
# and max_tokens.
LENGTHS = [3, 40, 7, 90, 1, 25, 64, 12, 5, 33, 71, 18, 9, 50, 2, 28]
MAX_TOKENS = [12, 3, 20, 8, 16, 1, 10, 14, 6, 18, 4, 11, 15, 7, 19, 9]
PROMPTS = [prompt(100 + i, n) for i, n in enumerate(LENGTHS)]


def sixteen(sampled):
    """The 16 requests, greedy or each sampled with its own seed and settings."""
    reqs = []
    for i, (p, m) in enumerate(zip(PROMPTS, MAX_TOKENS)):
        if sampled:
            extra = [dict(), dict(top_k=20), dict(top_p=0.8), dict(min_p=0.1)][i % 4]
            reqs.append((p, params(max_tokens=m, temperature=1.3, seed=1000 + i, **extra)))
        else:
            reqs.append((p, params(max_tokens=m)))
    return reqs


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_batch_invariance(model_path, sampled):
    """Each of 16 requests gives the same tokens batched (decodes mixed with prompt pieces under
    a 48-token budget) as alone; seeded sampling too."""
    reqs = sixteen(sampled)
    alone_engine = engine(model_path)
    alone = [run(alone_engine, [r])[0] for r in reqs]
    batched = run(engine(model_path, max_num_batched_tokens=48), reqs)
    assert batched == alone
    assert all(len(s[0][0]) == m and s[0][1] == "length" for s, m in zip(alone, MAX_TOKENS))
    if sampled:  # the seeds matter
        other = [(p, params(max_tokens=m, temperature=1.3, seed=7)) for p, m in zip(PROMPTS, MAX_TOKENS)]
        assert run(engine(model_path), other) != alone


def test_greedy_matches_transformers(model_path, reference):
    """Batched greedy tokens are the argmax of transformers' logits at every step (teacher-forced
    on the engine's own tokens, so one near-tie cannot cascade)."""
    batched = run(engine(model_path, max_num_batched_tokens=48), sixteen(False))
    for p, samples in zip(PROMPTS[:6], batched[:6]):
        tokens = samples[0][0]
        logits = reference_logits(reference, p + tokens[:-1])[len(p) - 1 :]
        top = logits.max(axis=1)
        chosen = logits[np.arange(len(tokens)), tokens]
        assert np.all(chosen >= top - 1e-4)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_by_recompute(model_path, prefix_caching):
    """With a KV cache far too small for all 16 at once, every request (four of them with n = 2
    forked samples) still finishes with the tokens it gets with a large cache, and sequences were
    preempted."""
    reqs = sixteen(sampled=False)[:8] + sixteen(sampled=True)[8:]
    for _, p in reqs[12:]:
        p.n = 2
    big = run(engine(model_path), reqs)
    block_bytes = engine(model_path).stats()["kv_block_bytes"]
    # 64 blocks: the longest request (98 tokens) takes 28 at its end, 43 at most while its prompt
    # goes in pieces of 16 (every 4 tokens take a block in each of 4 layer groups, but 3 of the
    # groups are chunked layers that keep only the current 16-token chunk).
    small_engine = engine(
        model_path, kv_cache_bytes=64 * block_bytes, max_num_batched_tokens=16, enable_prefix_caching=prefix_caching
    )
    assert small_engine.stats()["kv_blocks_total"] == 64
    small = run(small_engine, reqs)
    assert small == big
    stats = small_engine.stats()
    assert stats["preemptions"] > 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert stats["requests_running"] == stats["requests_waiting"] == 0


def test_one_sample_too_big_for_the_cache(model_path):
    """A request that could outgrow the whole cache is refused up front, naming the remedy."""
    block_bytes = engine(model_path).stats()["kv_block_bytes"]
    eng = engine(model_path, kv_cache_bytes=40 * block_bytes)
    with pytest.raises(_core.OutOfKVCacheError, match="max_tokens"):
        eng.add_request(prompt(1, 30), params(max_tokens=200))
    assert not eng.has_unfinished()


def counts(stats):
    keys = ["kv_blocks_free", "kv_global_blocks_used", "kv_local_blocks_used", "requests_running", "requests_waiting"]
    return {k: stats[k] for k in keys}


def test_abort_frees_every_block(model_path):
    """Aborting requests mid-prefill, mid-decode (n = 3, forked) and still waiting returns the
    block and request counts to baseline; finish_sample frees one sample's blocks."""
    eng = engine(model_path, max_num_batched_tokens=32, max_num_seqs=4)
    baseline = counts(eng.stats())
    decoding = eng.add_request(prompt(1, 10), params(max_tokens=50, n=3, temperature=1.0, seed=3))
    prefilling = eng.add_request(prompt(2, 120), params(max_tokens=50))
    waiting = eng.add_request(prompt(3, 20), params(max_tokens=50))
    for _ in range(3):
        eng.step()
    s = eng.stats()
    assert s["requests_running"] == 2 and s["requests_waiting"] == 1
    used = s["kv_global_blocks_used"]
    eng.finish_sample(decoding, 1)
    assert eng.stats()["kv_global_blocks_used"] < used
    for rid in (decoding, prefilling, waiting):
        eng.abort(rid)
    assert not eng.has_unfinished()
    assert counts(eng.stats()) == baseline
    eng.abort(12345)  # unknown ids are ignored
    # The engine still works afterwards.
    assert run(eng, [(prompt(4, 6), params(max_tokens=3))])[0][0][1] == "length"


def test_n_samples_share_the_prompt(model_path, reference):
    """n = 4 samples fork after one prefill (the prompt's blocks are shared, not copied), diverge,
    and each is a valid top-3 draw at every step under transformers' logits for its own tokens."""
    p = prompt(5, 37)
    eng = engine(model_path)
    rid = eng.add_request(p, params(n=4, max_tokens=12, temperature=2.0, top_k=3, seed=11))
    first = eng.step()
    assert sorted(u.index for u in first) == [0, 1, 2, 3] and all(u.request_id == rid for u in first)
    after_prefill = eng.stats()["kv_global_blocks_used"]
    assert after_prefill == -(-len(p) // 4)  # one sequence's worth of blocks for four samples
    samples = {u.index: list(u.new_token_ids) for u in first}
    while eng.has_unfinished():
        for u in eng.step():
            samples[u.index] += list(u.new_token_ids)
    assert len({tuple(s) for s in samples.values()}) > 1
    for tokens in samples.values():
        assert len(tokens) == 12
        logits = reference_logits(reference, p + tokens[:-1])[len(p) - 1 :]
        third = np.sort(logits, axis=1)[:, -3]
        assert np.all(logits[np.arange(12), tokens] >= third - 1e-4)
    # Sample 0 is the n = 1 request with the same seed.
    alone = run(engine(model_path), [(p, params(max_tokens=12, temperature=2.0, top_k=3, seed=11))])
    assert alone[0][0][0] == samples[0]


def test_min_tokens_bans_stop_tokens(model_path, reference):
    """Until min_tokens are out, eos and stop_token_ids cannot be drawn: greedy then takes the
    best other token; afterwards they stop the sample."""
    p = prompt(6, 15)
    free = run(engine(model_path), [(p, params(max_tokens=6))])[0][0][0]
    stop = free[0]
    eng = engine(model_path)
    out, reason = run(eng, [(p, params(max_tokens=6, stop_token_ids=[stop], min_tokens=3, ignore_eos=False))])[0][0]
    assert stop not in out[:3] and EOS not in out[:3]
    logits = reference_logits(reference, p)[-1]
    logits[[stop, EOS]] = -np.inf
    assert out[0] == int(np.argmax(logits))
    if stop in out[3:] or EOS in out[3:]:
        assert reason == "stop" and out[-1] in (stop, EOS)
    # Without min_tokens the stop token ends the sample at once.
    out, reason = run(eng, [(p, params(max_tokens=6, stop_token_ids=[stop]))])[0][0]
    assert out == [stop] and reason == "stop"


def test_penalties_greedy_against_numpy(model_path, reference):
    """Greedy with repetition, presence and frequency penalties follows the numpy penalties on
    transformers' logits, step by step; they change the output."""
    p = prompt(7, 20)
    pen = dict(repetition_penalty=1.8, presence_penalty=0.7, frequency_penalty=0.4)
    out = run(engine(model_path), [(p, params(max_tokens=10, **pen))])[0][0][0]
    plain = run(engine(model_path), [(p, params(max_tokens=10))])[0][0][0]
    assert out != plain
    for step in range(10):
        logits = reference_logits(reference, p + out[:step])[-1]
        seen = np.zeros(VOCAB, bool)
        seen[p + out[:step]] = True
        c = np.bincount(out[:step], minlength=VOCAB).astype(np.float64)
        logits = np.where(seen, np.where(logits > 0, logits / 1.8, logits * 1.8), logits)
        logits -= 0.4 * c + 0.7 * (c > 0)
        assert logits[out[step]] >= logits.max() - 1e-4


def test_logprobs_are_the_models(model_path, reference):
    """logprobs: the chosen token's and the top n, from the model's distribution (before
    temperature and penalties), per sample."""
    p = prompt(8, 9)
    eng = engine(model_path)
    eng.add_request(p, params(max_tokens=3, logprobs=4, temperature=0.8, repetition_penalty=1.3, seed=2))
    tokens, entries = [], []
    while eng.has_unfinished():
        for u in eng.step():
            tokens += list(u.new_token_ids)
            entries += list(u.logprobs)
    for step, entry in enumerate(entries):
        logits = reference_logits(reference, p + tokens[:step])[-1]
        lp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
        assert entry[0][0] == tokens[step] and abs(entry[0][1] - lp[tokens[step]]) < 1e-4
        top = np.argsort(-lp)[:4]
        assert [t for t, _ in entry[1:]] == top.tolist()
        np.testing.assert_allclose([v for _, v in entry[1:]], lp[top], atol=1e-4)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(n=0), "n must be"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(min_p=1.5), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(min_tokens=20, max_tokens=10), "min_tokens"),
        (dict(stop_token_ids=[VOCAB]), "stop_token_ids"),
        (dict(temperature=-1.0), "temperature"),
    ],
)
def test_bad_sampling_params(model_path, fields, match):
    eng = engine(model_path)
    with pytest.raises(_core.InvalidInputError, match=match):
        eng.add_request(prompt(9, 5), params(**fields))
    assert not eng.has_unfinished()


@pytest.mark.parametrize("device, error", [("tpu", "InvalidInputError"), ("cuda:x", "InvalidInputError"),
                                           ("cuda:99", "DeviceError")], ids=["tpu", "letter", "index-99"])
def test_engine_device_option(model_path, device, error):
    """EngineOptions.device (the C++ API): a malformed name is InvalidInputError, a GPU that is not
    there DeviceError naming the reason, both before any weight is read."""
    with pytest.raises(getattr(_core, error), match="device|CUDA"):
        engine(model_path, device=device)


def test_enforce_eager_is_accepted_and_ignored_on_the_cpu(model_path):
    """enforce_eager (CUDA graphs off) changes nothing on the CPU: the same tokens either way, through
    the engine's options and LLM's keyword."""
    requests = [(prompt(90 + i, n), params(max_tokens=6)) for i, n in enumerate((5, 17, 30))]
    assert _core.EngineOptions().enforce_eager is False
    assert run(engine(model_path, enforce_eager=True), requests) == run(engine(model_path), requests)
    import corral

    llm = corral.LLM(model_path, enforce_eager=True, num_threads=2)
    out = llm.generate([prompt(95, 9)], corral.SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4
