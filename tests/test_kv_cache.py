"""The paged KV cache in the engine: prefix caching, chunked-local memory, KV dtypes."""

import json

import numpy as np
import pytest
import torch

import corral
from numerics import rel_err
from tiny_models import VOCAB, build


def tokens(seed, n):
    return np.random.default_rng(seed).integers(3, VOCAB, size=n).tolist()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Float32 checkpoints: the chunked variant (chunk 16, a multiple of the block) and one with
    chunk 40, so that a cached prefix ends inside a chunk whose local blocks must be reused too."""
    return {
        "chunk16": build("chunked", "causal", torch.float32, tmp_path_factory.mktemp("c16")),
        "chunk40": build("chunked", "causal", torch.float32, tmp_path_factory.mktemp("c40"), attention_chunk_size=40),
    }


@pytest.mark.parametrize("model", ["chunk16", "chunk40"])
def test_prefix_caching_changes_nothing_numerically(models, model):
    """Two prompts sharing a 200-token prefix: the second one's first-step log-probabilities (all
    of them) and greedy tokens are identical with prefix caching on and off, and with it on only
    the tokens after the cached full blocks are prefilled."""
    prefix = tokens(1, 200)
    first, second = prefix + tokens(2, 21), prefix + tokens(3, 13)
    params = corral.SamplingParams(max_tokens=10, ignore_eos=True, logprobs=VOCAB)
    runs = {}
    for caching in (True, False):
        llm = corral.LLM(models[model], block_size=16, enable_prefix_caching=caching)
        llm.generate([first], corral.SamplingParams(max_tokens=2, ignore_eos=True))
        before = llm.stats()
        out = llm.generate([second], params)[0].outputs[0]
        after = llm.stats()
        runs[caching] = (out, after["prefill_tokens_computed"] - before["prefill_tokens_computed"],
                         after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"])
    (cached, cached_prefill, hits), (plain, plain_prefill, plain_hits) = runs[True], runs[False]
    assert cached.token_ids == plain.token_ids
    assert cached.logprobs[0] == plain.logprobs[0]  # every token's log-probability, bit for bit
    assert len(cached.logprobs[0]) == VOCAB
    assert hits == 192 and plain_hits == 0  # 12 full blocks of 16 inside the shared 200 tokens
    assert cached_prefill == len(second) - 192
    assert plain_prefill == len(second)


def test_logprobs_are_log_softmax_of_the_logits(models):
    llm = corral.LLM(models["chunk16"])
    prompt = tokens(4, 30)
    out = llm.generate([prompt], corral.SamplingParams(max_tokens=3, ignore_eos=True, logprobs=5))[0].outputs[0]
    logits = llm.logits(prompt + out.token_ids[:-1]).astype(np.float64)[len(prompt) - 1 :]
    ref = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        top = np.argsort(-ref[step], kind="stable")[:5]
        assert list(entry)[0] == token and token == top[0]  # greedy picks the most likely
        assert set(entry) == set(top.tolist())
        for t, lp in entry.items():
            assert abs(lp - ref[step, t]) < 1e-5


def test_local_memory_bounded_by_one_chunk(models):
    """Generating far past the chunk size, local layer groups hold at most one chunk plus one
    block per sequence, while global groups grow with the context."""
    llm = corral.LLM(models["chunk16"], block_size=4, enable_prefix_caching=False)
    stats = llm.stats()
    global_groups, local_groups = stats["kv_global_layer_groups"], stats["kv_local_layer_groups"]
    assert (global_groups, local_groups) == (1, 3)  # 8 layers: 2 NoPE, 6 chunked; groups of 2
    prompt = tokens(5, 37)
    engine = llm._engine
    rid = engine.add_request(prompt, corral.SamplingParams(max_tokens=60, ignore_eos=True)._to_core())
    computed = len(prompt)  # tokens with K/V after the first step; each later step adds one
    while True:
        engine.step()
        if not engine.has_unfinished():
            break
        s = llm.stats()
        assert s["kv_local_blocks_used"] <= local_groups * (16 // 4 + 1)
        assert s["kv_global_blocks_used"] == global_groups * -(-computed // 4)
        computed += 1
    assert computed == len(prompt) + 59
    assert llm.stats()["kv_blocks_free"] == llm.stats()["kv_blocks_total"]
    del rid


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16", "float16"])
def test_kv_bytes_per_token(models, kv_dtype):
    llm = corral.LLM(models["chunk16"], kv_cache_dtype=kv_dtype)
    cfg = llm.config
    size = {"float32": 4, "bfloat16": 2, "float16": 2}[kv_dtype]
    assert llm.stats()["kv_bytes_per_token"] == 2 * cfg["num_layers"] * cfg["num_kv_heads"] * cfg["head_dim"] * size


def tiny_config(path, **overrides):
    """A config.json of a tiny Llama 4 (no weights: the KV cache needs only the config)."""
    config = dict(
        model_type="llama4_text", vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=8,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, attention_chunk_size=64,
    ) | overrides
    (path / "config.json").write_text(json.dumps(config))
    return path / "config.json"


def test_million_token_sequence_memory(tmp_path):
    """Appending 1,048,576 tokens to one sequence (K/V written through the KV-write kernel):
    local layer groups never hold more than ceil(64 / 16) + 1 blocks each, and the global groups
    end with exactly ceil(1,048,576 / 16) blocks each."""
    layout = corral._core.KvLayout.from_config(str(tiny_config(tmp_path)), block_size=16, dtype="bfloat16")
    assert (layout.global_groups, layout.local_groups) == (1, 3)  # 2 NoPE + 6 chunked layers, in groups of 2
    n, block = 1 << 20, 16
    kv = corral._core.KvCache(layout, (n // block + 64) * layout.page_bytes)
    blocks = kv.blocks
    k = np.random.default_rng(0).standard_normal((block, 8)).astype(np.float32)
    blocks.add(0, [1])
    peak_local = 0
    for start in range(0, n, block):
        assert kv.append(0, block)
        kv.write(0, start, k, -k)
        peak_local = max(peak_local, blocks.stats()["pages_used_local"])
        blocks.commit(0, [start % 7] * block)
    stats = blocks.stats()
    assert stats["pages_used_global"] == layout.global_groups * (n // block)
    assert peak_local <= layout.local_groups * (64 // 16 + 1)
    assert stats["pages_used_local"] <= layout.local_groups * (64 // 16 + 1)
    assert layout.sequence_bytes(n, True) == layout.page_bytes * (n // block + 3 * (64 // 16))


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_fp8_kv_cache_close_to_bf16(tmp_path, weights):
    """fp8 (e4m3) KV cache: first-step logits within 5e-2 of a bf16 KV cache, and the first 16
    greedy tokens equal. (The chunked model routes each token to 2 of 8 experts; the Scout- and
    Maverick-like tiny models, top-1 of 16 or 128 random experts, flip routes under any rounding.)"""
    path = build("chunked", "causal", getattr(torch, weights), tmp_path)
    prompt = tokens(7, 130)
    params = corral.SamplingParams(max_tokens=16, ignore_eos=True)
    bf16, fp8 = (corral.LLM(path, kv_cache_dtype=dtype) for dtype in ("bfloat16", "fp8"))
    assert rel_err(fp8.logits(prompt)[-1], bf16.logits(prompt)[-1]) <= 5e-2
    assert fp8.generate([prompt], params)[0].outputs[0].token_ids == bf16.generate([prompt], params)[0].outputs[0].token_ids
    assert fp8.stats()["kv_bytes_per_token"] < 0.51 * bf16.stats()["kv_bytes_per_token"]


def test_kv_cache_attend_reads_the_layer_pages(tmp_path, rng=np.random.default_rng(3)):
    """KvCache.attend (a decode step of one layer through its group's pages) equals float64
    attention over what was written: all keys on a global layer, the last chunk on a local one."""
    layout = corral._core.KvLayout.from_config(str(tiny_config(tmp_path, num_key_value_heads=2)), 16, "float32")
    kv = corral._core.KvCache(layout, 4096 * layout.page_bytes)
    n = 150  # the last chunk of 64 starts at 128
    k = rng.standard_normal((n, 16)).astype(np.float32)
    v = rng.standard_normal((n, 16)).astype(np.float32)
    kv.blocks.add(0, [1])
    assert kv.append(0, n)
    kv.write(0, 0, k, v)
    q = rng.standard_normal((6, 8)).astype(np.float32)  # 3 query heads per KV head
    for layer, lo in ((3, 0), (0, 128)):  # layer 3 is NoPE (global), layer 0 chunked
        out = kv.attend(0, layer, q, 0.5)
        keys, values = k.reshape(n, 2, 8)[lo:], v.reshape(n, 2, 8)[lo:]
        for h in range(6):
            s = keys[:, h // 3] @ q[h].astype(np.float64) * 0.5
            w = np.exp(s - s.max())
            np.testing.assert_allclose(out[h], (w / w.sum()) @ values[:, h // 3], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_block_table_pool_rows_equal_the_block_manager_tables(tmp_path, seed):
    """After random programs of add (with prefix hits) / append (copy-on-write) / commit / fork / free /
    preempt (free, then add again), every live sequence's row of the persistent block tables begins
    with its BlockManager table, in every group; the pool grows (rows rewritten) past its first rows."""
    rng = np.random.default_rng(seed)
    layout = corral._core.KvLayout.from_config(str(tiny_config(tmp_path, attention_chunk_size=8)), 4, "float32")
    kv = corral._core.KvCache(layout, 48 * layout.page_bytes, max_len=64, max_seqs=1)
    blocks, groups = kv.blocks, layout.global_groups + layout.local_groups
    texts = [[int(t) for t in rng.integers(0, 3, 40)] for _ in range(2)]
    seqs, next_id = {}, 0  # id -> tokens known

    def check():
        for seq in seqs:
            for g in range(groups):
                table = blocks.table(seq, g)
                assert kv.table_pool_row(seq, g)[: len(table)] == table, (seed, seq, g)

    for _ in range(60):
        op = rng.choice(["add", "append", "append", "fork", "free", "preempt"]) if seqs else "add"
        seq = int(rng.choice(sorted(seqs))) if seqs else None
        if op == "add":
            prompt = texts[rng.integers(2)][: rng.integers(2, 40)]
            blocks.add(next_id, prompt)
            seqs[next_id], next_id = list(prompt), next_id + 1
        elif op == "append":
            done = blocks.num_computed(seq)
            n = int(rng.integers(1, 9))
            seqs[seq] += [int(t) for t in rng.integers(0, 3, max(0, done + n - len(seqs[seq])))]
            if done + n <= 64 and kv.append(seq, n):
                blocks.commit(seq, seqs[seq][done : done + n])
        elif op == "fork":
            blocks.fork(seq, next_id)
            seqs[next_id], next_id = seqs[seq][: blocks.num_computed(seq)], next_id + 1
        elif op == "free":
            blocks.free(seq)
            del seqs[seq]
        else:  # preempt: its pages go, its tokens stay (prefix caching may give some back)
            blocks.free(seq)
            blocks.add(seq, seqs[seq])
        if rng.random() < 0.5:
            check()
    check()
    assert kv.table_pool_rows >= blocks.num_rows > 2  # grown from 2 * max_seqs rows
