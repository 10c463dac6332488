"""Kernels with a CUDA implementation, checked by one test body on every device.

CUDA cases carry the `cuda` marker: they run on a GPU machine (tools/gpu_check.sh) and are
reported as skipped elsewhere."""

import numpy as np
import pytest

from corral import _core
from numerics import FLOAT_DTYPES, from_bits, rel_err, rounded, to_bits

ops = _core.ops
# (device, activation dtype): CPU activations are float32; CUDA takes all three.
DEVICE_ACTS = [("cpu", "float32")] + [pytest.param("cuda", a, marks=pytest.mark.cuda) for a in FLOAT_DTYPES]
# Error of one rounding of the output to each dtype, plus float32 arithmetic.
TOLERANCE = {"float32": 1e-5, "bfloat16": 8e-3, "float16": 1e-3}


def rms_norm_reference(x, w, eps):
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if w is None else y * w


@pytest.mark.parametrize("device, act", DEVICE_ACTS)
@pytest.mark.parametrize("w_dtype", FLOAT_DTYPES + (None,))
@pytest.mark.parametrize("rows, dim", [(1, 5120), (7, 33), (64, 128), (3, 8191), (130, 1)])
def test_rms_norm(device, act, w_dtype, rows, dim, rng):
    x_bits, x = rounded(rng.standard_normal((rows, dim)) * 3, act)
    w_bits, w = rounded(rng.standard_normal(dim), w_dtype) if w_dtype else (None, None)
    y = ops.rms_norm(x_bits, w_bits, 1e-5, dtype=act, w_dtype=w_dtype or "float32", device=device)
    got = from_bits(y, act)
    ref = rms_norm_reference(x, w, 1e-5)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, ref, rtol=TOLERANCE[act], atol=TOLERANCE[act] * np.abs(ref).max())


def test_cuda_without_a_device_is_a_clean_error():
    """Asking for CUDA where there is none (no backend, driver or GPU) raises DeviceError."""
    x = np.ones((2, 8), np.float32)
    if _core.cuda_device_count() > 0:
        assert ops.rms_norm(x, None, 1e-5, device="cuda").shape == (2, 8)
    else:
        with pytest.raises(_core.DeviceError, match="CUDA"):
            ops.rms_norm(x, None, 1e-5, device="cuda")


@pytest.mark.cuda
def test_cuda_device_out_of_range():
    with pytest.raises(_core.DeviceError, match="not available"):
        ops.rms_norm(np.ones((2, 8), np.float32), None, 1e-5, device=f"cuda:{_core.cuda_device_count()}")


# ---- MoE ---------------------------------------------------------------------------------------

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
MOE_ORDER = ("router", "gate_up", "down", "shared_gate", "shared_up", "shared_down")
# float32 weights: float32 arithmetic (CUDA sums in other orders: 1e-4). bfloat16 weights: both
# devices round the scaled inputs and hidden rows to bfloat16 (vdpbf16ps, tensor cores); the
# reference does not (tests/test_kernels.py checks the CPU's rounding exactly).
MOE_TOLERANCE = {("cpu", "float32"): 1e-5, ("cuda", "float32"): 1e-4, ("cpu", "bfloat16"): 2e-2,
                 ("cuda", "bfloat16"): 2e-2}


def silu64(a):
    with np.errstate(over="ignore"):
        return a / (1.0 + np.exp(-a))


def moe_reference(x, router, gate_up, down, shared_gate, shared_up, shared_down, top_k):
    """Llama 4 MoE in float64: the top_k experts by logit (ties to the lower id), each fed
    sigmoid(logit) * x, plus the shared expert. Returns (out, per-expert token counts)."""
    x = np.asarray(x, dtype=np.float64)
    T, E, I = x.shape[0], router.shape[0], down.shape[1]
    logits = x @ router.T
    chosen = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
    out = (silu64(x @ shared_gate.T) * (x @ shared_up.T)) @ shared_down.T
    counts = np.zeros(E, dtype=np.int64)
    for t in range(T):
        for e in chosen[t]:
            counts[e] += 1
            gu = (x[t] / (1.0 + np.exp(-logits[t, e]))) @ gate_up[e]
            out[t] += (silu64(gu[:I]) * gu[I:]) @ down[e]
    return out, counts


def make_moe_weights(rng, x, H, I, E, top_k, dtype, steer=None):
    """Weights rounded to dtype as (bits, float64 values) per name, with a router whose rounded
    logits have no near-tie at the top_k boundary. steer: experts that get every token."""
    for _ in range(100):
        router = rng.standard_normal((E, H)) / np.sqrt(H)
        if steer is not None:  # x is positive: negative rows lose, boosted rows win
            router = -np.abs(router)
            for j, e in enumerate(steer):
                router[e] = np.abs(router[e]) + 0.3 - 0.2 * j
        r_bits, r64 = rounded(router, dtype)
        logits = x.astype(np.float64) @ r64.T
        srt = -np.sort(-logits, axis=1)
        if top_k == E or np.min(srt[:, top_k - 1] - srt[:, top_k]) > 1e-4:
            break
    else:
        pytest.fail("could not draw a router without near-ties")
    w = {"router": (r_bits, r64)}
    for name, shape, fan_in in [("gate_up", (E, H, 2 * I), H), ("down", (E, I, H), I), ("shared_gate", (I, H), H),
                                ("shared_up", (I, H), H), ("shared_down", (H, I), I)]:
        w[name] = rounded(rng.standard_normal(shape) / np.sqrt(fan_in), dtype)
    return w


def check_moe(device, dtype, x, w, top_k, expect_counts=None):
    out, counts = ops.moe(x, *[w[n][0] for n in MOE_ORDER], top_k, dtype, device=device)
    ref, ref_counts = moe_reference(x, *[w[n][1] for n in MOE_ORDER], top_k)
    assert out.shape == x.shape and counts.dtype == np.int64
    np.testing.assert_array_equal(counts, ref_counts)
    if expect_counts is not None:
        np.testing.assert_array_equal(counts, expect_counts)
    assert np.all(np.isfinite(out))
    assert rel_err(out, ref) < MOE_TOLERANCE[(device, dtype)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "T,H,I,E,top_k",
    [
        (1, 40, 36, 16, 1),  # decode path on CUDA (at most 8 (token, k) pairs)
        (3, 40, 36, 128, 2),
        (7, 128, 96, 16, 1),
        (2, 41, 33, 16, 2),  # odd sizes: element-wise weight loads
        (33, 40, 36, 16, 2),  # grouped GEMMs
        (33, 128, 96, 128, 1),
        (130, 40, 36, 128, 2),
        (130, 128, 96, 16, 1),
        (7, 41, 33, 16, 2),
    ],
)
def test_moe(device, dtype, T, H, I, E, top_k, rng):
    """Output and per-expert counts match float64 on the rounded weights; with E = 128 most experts
    get no token."""
    x = rng.standard_normal((T, H)).astype(np.float32)
    w = make_moe_weights(rng, x, H, I, E, top_k, dtype)
    check_moe(device, dtype, x, w, top_k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("T", [2, 9, 70])
def test_moe_idle_experts(device, dtype, T, rng):
    """Every token goes to experts 3 and 11; the 14 others get none and counts say so."""
    H, I, E, top_k = 40, 36, 16, 2
    x = (np.abs(rng.standard_normal((T, H))) + 0.5).astype(np.float32)
    w = make_moe_weights(rng, x, H, I, E, top_k, dtype, steer=[3, 11])
    expect = np.zeros(E, np.int64)
    expect[[3, 11]] = T
    check_moe(device, dtype, x, w, top_k, expect_counts=expect)


# ---- KV cache writes and paged attention -----------------------------------------------------------
#
# Attention over caches filled by ops.kv_cache_write, against float64 over the values the cache holds
# (helpers of test_kernels). On CUDA, rows of sequences with at most 4 query rows (decode) run on
# CUDA cores in float32 for every cache dtype; prefill rows of bfloat16 / float16 caches with head_dim
# 64 or 128 and block size 16, 32 or 64 run on tensor cores, which round the scaled queries and the
# probabilities to the cache's 16-bit type (float32 accumulation); other prefill rows run on CUDA
# cores in float32. Keys are split every 2048 (by absolute position, as the CPU splits them), the
# splits' partial results merged in order.

import math  # noqa: E402

from test_kernels import (  # noqa: E402
    FP8,
    FP8_NAN,
    attention_ref,
    build_fp8_paged_cache,
    build_paged_cache,
    in_pool,
    cache_np_dtype,
    check_fp8_cache,
    e4m3_decode,
    fp8_empty_cache,
    k_by_slot,
    random_merge,
    ragged_batch,
)

KV_DTYPES = ("float32", "bfloat16", "float16", FP8)
# Relative error (max |got - ref| / max |ref|) against float64 over the cached values. Float32
# arithmetic: 1e-4 (decode rows everywhere, and every row of float32 and fp8 caches). Tensor-core
# prefill rows: the queries and probabilities rounded to bfloat16 (8 bits) or float16 (11 bits).
ATTN_TOL = 1e-4
TC_TOL = {"bfloat16": 2e-2, "float16": 4e-3}


def prefill_tolerance(device, dtype):
    return TC_TOL.get(dtype, ATTN_TOL) if device == "cuda" else ATTN_TOL


def fresh_copy(cache):
    return tuple(np.array(a, copy=True) for a in cache)


def attend(device, q, cache, dtype, seq_starts, positions, tables, scale, chunk, table_rows=None):
    """ops.paged_attention on (k_cache, v_cache[, k_scale, v_scale])."""
    scales = {} if dtype != FP8 else {"k_scale": cache[2], "v_scale": cache[3]}
    return ops.paged_attention(q, cache[0], cache[1], dtype, np.asarray(seq_starts, np.int32),
                               np.asarray(positions, np.int32), tables, scale, chunk, device=device,
                               table_rows=table_rows, **scales)


def paged_cache(rng, dtype, kv_heads, head_dim, block_size, written):
    """((k_cache, v_cache[, k_scale, v_scale]), tables, keys, values): written on the CPU."""
    if dtype == FP8:
        cache, tables, keys, values, _, _ = build_fp8_paged_cache(rng, kv_heads, head_dim, block_size, written)
        return cache, tables, keys, values
    k_cache, v_cache, tables, keys, values = build_paged_cache(rng, dtype, kv_heads, head_dim, block_size, written)
    return (k_cache, v_cache), tables, keys, values


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_kv_cache_write_slots_and_bits(device, dtype, rng):
    """Token t's head g lands at [slot // bs, g, :, slot % bs] of K (transposed) and [.., slot % bs, :] of
    V, rounded to nearest even (NaN and infinities included), nothing else touched; CUDA writes the CPU's bits."""
    num_blocks, kvh, bs, d, T = 7, 3, 6, 20, 23
    sentinel = np.float32(1234.5) if dtype == "float32" else np.uint16(0x1234)
    k_cache = np.full((num_blocks, kvh, d, bs), sentinel, cache_np_dtype(dtype))
    v_cache = np.full((num_blocks, kvh, bs, d), sentinel, cache_np_dtype(dtype))
    k = (rng.standard_normal((T, kvh * d)) * np.exp2(rng.uniform(-20, 20, (T, 1)))).astype(np.float32)
    v = rng.standard_normal((T, kvh * d)).astype(np.float32)
    k[0, :4] = [np.nan, np.inf, -np.inf, 7e4]
    slots = rng.choice(num_blocks * bs, T, replace=False).astype(np.int64)
    ref_k, ref_v = k_cache.copy(), v_cache.copy()
    with np.errstate(over="ignore"):
        ops.kv_cache_write(ref_k, ref_v, dtype, k, v, slots)  # the CPU
        ops.kv_cache_write(k_cache, v_cache, dtype, k, v, slots, device=device)
    bits = np.uint32 if dtype == "float32" else np.uint16
    np.testing.assert_array_equal(k_cache.view(bits), ref_k.view(bits))
    np.testing.assert_array_equal(v_cache.view(bits), ref_v.view(bits))
    untouched = np.ones(num_blocks * bs, bool)
    untouched[slots] = False
    by_slot = k_by_slot(k_cache).reshape(num_blocks, kvh, bs, d).transpose(0, 2, 1, 3).reshape(-1, kvh, d)
    assert np.all(by_slot[untouched].view(bits) == np.asarray(sentinel).view(bits))
    for t, slot in enumerate(slots[1:], start=1):
        with np.errstate(over="ignore"):
            np.testing.assert_array_equal(v_cache[slot // bs, :, slot % bs].reshape(-1).view(bits),
                                          to_bits(v[t], dtype).view(bits))


@pytest.mark.parametrize("device", DEVICES)
def test_kv_cache_write_fp8_interleaved_blocks(device, rng):
    """One call writing several blocks' tokens interleaved (each block in slot order from offset 0),
    amplitudes spanning 2^-12..2^12 so that scales grow and earlier tokens are re-quantized; then a
    second call continuing the blocks: within the write contract's bounds, and on CUDA the CPU's bits
    (codes and scales)."""
    num_blocks, kvh, bs, d = 9, 3, 16, 40
    counts = {0: 16, 2: 1, 3: 7, 5: 12, 8: 3}
    slots = random_merge(rng, [[b * bs + o for o in range(n)] for b, n in counts.items()])
    later = random_merge(rng, [[b * bs + o for o in range(n, min(n + 3, bs))] for b, n in counts.items()])
    T, T2 = len(slots), len(later)
    amp = np.exp2(rng.uniform(-12, 12, (T + T2, 1)))
    k = (rng.standard_normal((T + T2, kvh * d)) * amp).astype(np.float32)
    v = (rng.standard_normal((T + T2, kvh * d)) * amp[::-1]).astype(np.float32)
    k[1, :] = 0.0  # an all-zero token
    ref = fp8_empty_cache(num_blocks, kvh, bs, d)
    got = fresh_copy(ref)
    for c, sl, lo, hi in ((ref, slots, 0, T), (ref, later, T, T + T2)):
        ops.kv_cache_write(c[0], c[1], FP8, k[lo:hi], v[lo:hi], np.array(sl, np.int64), k_scale=c[2], v_scale=c[3])
    for sl, lo, hi in ((slots, 0, T), (later, T, T + T2)):
        ops.kv_cache_write(got[0], got[1], FP8, k[lo:hi], v[lo:hi], np.array(sl, np.int64), k_scale=got[2],
                           v_scale=got[3], device=device)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
    check_fp8_cache(got, dict(enumerate(slots + later)), k, v, bs, kvh, d)


@pytest.mark.parametrize("device", DEVICES)
def test_kv_cache_write_fp8_token_by_token(device, rng):
    """Amplitudes growing a few percent a token: the scale doubles often and the first tokens are
    re-quantized many times; token by token and in one call store the same bits."""
    kvh, bs, d = 2, 16, 64
    k = (rng.standard_normal((bs, kvh * d)) * 1.07 ** np.arange(bs)[:, None]).astype(np.float32)
    v = (rng.standard_normal((bs, kvh * d)) * 0.9 ** np.arange(bs)[:, None]).astype(np.float32)
    one, each = fp8_empty_cache(3, kvh, bs, d), fp8_empty_cache(3, kvh, bs, d)
    ops.kv_cache_write(one[0], one[1], FP8, k, v, np.arange(bs, 2 * bs), k_scale=one[2], v_scale=one[3],
                       device=device)
    for t in range(bs):
        ops.kv_cache_write(each[0], each[1], FP8, k[t : t + 1], v[t : t + 1], np.array([bs + t]), k_scale=each[2],
                           v_scale=each[3], device=device)
    for a, b in zip(one, each):
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
    check_fp8_cache(one, {t: bs + t for t in range(bs)}, k, v, bs, kvh, d)


# (kv_heads, GQA group, head_dim, block_size, chunk_size); chunk 0 is global causal attention.
DEVICE_ATTENTION_CASES = [
    (2, 1, 64, 16, 0),
    (1, 8, 128, 16, 0),
    (2, 5, 128, 16, 0),  # Scout's group
    (2, 5, 64, 32, 8),   # chunks smaller than a block
    (1, 8, 128, 64, 16),
    (2, 5, 40, 6, 8),    # block size 6 does not divide the chunk; CUDA cores everywhere
    (1, 3, 33, 5, 0),    # odd head_dim and block size: unaligned K/V copies
    (2, 8, 64, 4, 16),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize(
    "kv_heads,group,head_dim,block_size,chunk",
    DEVICE_ATTENTION_CASES,
    ids=[f"kv{c[0]}-g{c[1]}-d{c[2]}-bs{c[3]}-ch{c[4]}" for c in DEVICE_ATTENTION_CASES],
)
def test_paged_attention_ragged_on_device(device, dtype, kv_heads, group, head_dim, block_size, chunk, rng):
    """A mid-sequence prefill (37 rows at positions 20..56) with four decode rows (two of which have
    future keys written that they must not see), over shuffled blocks with NaN in every unwritten slot:
    float64 attention over the cached values, decode rows within 1e-4, prefill rows within the
    device's tolerance (see prefill_tolerance)."""
    written, seq_starts, positions = ragged_batch()
    cache, tables, keys, values = paged_cache(rng, dtype, kv_heads, head_dim, block_size, written)
    heads = kv_heads * group
    q = rng.standard_normal((len(positions), heads, head_dim)).astype(np.float32)
    scale = 1.0 / math.sqrt(head_dim)
    pool, rows = in_pool(rng, tables)
    out = attend(device, q, cache, dtype, seq_starts, positions, pool, scale, chunk, table_rows=rows)
    assert out.shape == q.shape and np.all(np.isfinite(out))
    ref = attention_ref(q, keys, values, seq_starts, positions, scale, chunk, kv_heads)
    assert rel_err(out[37:], ref[37:]) < ATTN_TOL
    assert rel_err(out[:37], ref[:37]) < prefill_tolerance(device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KV_DTYPES)
def test_paged_attention_large_scores_on_device(device, dtype, rng):
    """Scores of magnitude ~100 stay finite and exact (online softmax; on tensor cores the running
    max moves late and the output is rescaled); a sequence with no rows is skipped."""
    cache, tables, keys, values = paged_cache(rng, dtype, 2, 64, 16, [141, 12, 23])
    seq_starts = np.array([0, 121, 121, 122], np.int32)
    positions = np.array(list(range(20, 141)) + [22], np.int32)
    q = (rng.standard_normal((122, 4, 64)) * 12).astype(np.float32)
    out = attend(device, q, cache, dtype, seq_starts, positions, tables, 1.0, 0)
    assert np.all(np.isfinite(out))
    ref = attention_ref(q, keys, values, seq_starts, positions, 1.0, 0, 2)
    assert rel_err(out[121:], ref[121:]) < ATTN_TOL
    if device == "cuda" and dtype in TC_TOL:
        # Tensor cores take the scaled queries rounded to the cache's type (scale 1 here): scores
        # of ~100 move by ~0.2 with that rounding alone, so the reference uses the rounded queries.
        q_tc = from_bits(to_bits(q, dtype), dtype).astype(np.float32)
        ref = attention_ref(q_tc, keys, values, seq_starts, positions, 1.0, 0, 2)
    assert rel_err(out[:121], ref[:121]) < prefill_tolerance(device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [4, 16])
def test_paged_attention_chunks_are_aligned_on_device(device, block_size, rng):
    """Aligned chunks, not a sliding window: a row at p % chunk == 0 sees only key p."""
    chunk = 16
    k_cache, v_cache, tables, keys, values = build_paged_cache(rng, "float32", 1, 16, block_size, [65])
    positions = np.array([16, 32, 48, 64, 17], np.int32)
    q = rng.standard_normal((5, 2, 16)).astype(np.float32)
    out = ops.paged_attention(q, k_cache, v_cache, "float32", np.array([0, 5], np.int32), positions, tables, 0.25,
                              chunk, device=device)
    for r, p in enumerate(positions[:4]):
        np.testing.assert_allclose(out[r], np.broadcast_to(values[0][p, 0], (2, 16)), rtol=1e-6, atol=1e-6)
    assert rel_err(out[4], attention_ref(q[4:], keys, values, [0, 1], positions[4:], 0.25, chunk, 1)[0]) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("chunk", [0, 4096])
def test_paged_attention_past_several_splits(device, dtype, chunk, rng):
    """9,000-key contexts (five 2048-key splits): two decode sequences (one row, and two rows), a
    37-row prefill ending at the last key and a 1-row sequence at position 8191 (the last key of a
    split). Decode rows run split by split with the partials merged in order; chunk 4096: local
    attention sees at most one or two splits."""
    n, bs, kvh, group, d = 9000, 16, 2, 5, 64
    written = [n, n, n, 8192]
    cache, tables, keys, values = paged_cache(rng, dtype, kvh, d, bs, written)
    positions = [n - 1, n - 2, n - 1] + list(range(n - 37, n)) + [8191]
    seq_starts = [0, 1, 3, 40, 41]
    q = rng.standard_normal((len(positions), kvh * group, d)).astype(np.float32)
    out = attend(device, q, cache, dtype, seq_starts, positions, tables, 0.2, chunk)
    ref = attention_ref(q, keys, values, seq_starts, positions, 0.2, chunk, kvh)
    decode = np.r_[0:3, 40]
    assert np.all(np.isfinite(out))
    assert rel_err(out[decode], ref[decode]) < ATTN_TOL
    assert rel_err(out[3:40], ref[3:40]) < prefill_tolerance(device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", FP8])
def test_long_prefill_after_a_long_context(device, dtype, rng):
    """2,900 prefill rows at positions 6,100..8,999: on CUDA enough tiles that each runs its five
    splits in turn, merged in place (the merge's arithmetic, in `out`), not as split work items."""
    n, bs, kvh, group, d, rows = 9000, 16, 2, 3, 64, 2900
    cache, tables, keys, values = paged_cache(rng, dtype, kvh, d, bs, [n])
    positions = np.arange(n - rows, n, dtype=np.int32)
    q = rng.standard_normal((rows, kvh * group, d)).astype(np.float32)
    out = attend(device, q, cache, dtype, [0, rows], positions, tables, 0.125, 0)
    sel = np.r_[0:rows:97, rows - 1]  # float64 reference on a sample of rows
    ref = attention_ref(q[sel], keys, values, [0, len(sel)], positions[sel], 0.125, 0, kvh)
    assert np.all(np.isfinite(out))
    assert rel_err(out[sel], ref) < prefill_tolerance(device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", FP8])
def test_decode_rows_do_not_depend_on_the_batch(device, dtype, rng):
    """Rows past several splits give the same bits alone, in pairs, in fours (decode tiles of 3, 6
    and 12 rows) and as one 37-row prefill sequence (head_dim 40: CUDA cores on every device)."""
    n, bs, kvh, group, d = 9000, 16, 2, 3, 40
    cache, tables, _, _ = paged_cache(rng, dtype, kvh, d, bs, [n])
    rows = np.arange(n - 37, n, dtype=np.int32)
    q = rng.standard_normal((len(rows), kvh * group, d)).astype(np.float32)

    def run(groups):  # groups: row index arrays, one sequence each
        starts = np.cumsum([0] + [len(g) for g in groups]).astype(np.int32)
        sel = np.concatenate(groups)
        t = np.repeat(tables[:1], len(groups), axis=0)
        out = attend(device, q[sel], cache, dtype, starts, rows[sel], t, 0.2, 0)
        return out[np.argsort(sel)]

    idx = np.arange(len(rows))
    alone = run([idx[i : i + 1] for i in idx])
    pairs = run([idx[i : i + 2] for i in range(0, len(idx), 2)])
    fours = run([idx[i : i + 4] for i in range(0, len(idx), 4)])
    np.testing.assert_array_equal(pairs, alone)
    np.testing.assert_array_equal(fours, alone)
    np.testing.assert_array_equal(run([idx]), alone)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_attention_million_token_context_on_device(device, rng):
    """One decode row over a 1,048,576-token bf16 context (a single KV head, blocks shuffled through
    the pool), GQA 8: 512 splits merged in order; every query head within 2e-2 of float64 over the
    cached values (float32 arithmetic: all heads together within 1e-3)."""
    n, bs, d, group = 1 << 20, 16, 64, 8
    table = rng.permutation(n // bs).astype(np.int32)[None]
    slots = table[0, np.arange(n) // bs].astype(np.int64) * bs + np.arange(n) % bs
    k = rng.standard_normal((n, d), dtype=np.float32)
    v = rng.standard_normal((n, d), dtype=np.float32)
    k_cache = np.empty((n // bs, 1, d, bs), np.uint16)
    v_cache = np.empty((n // bs, 1, bs, d), np.uint16)
    ops.kv_cache_write(k_cache, v_cache, "bfloat16", k, v, slots, device=device)
    q = rng.standard_normal((1, group, d)).astype(np.float32) * 2
    out = ops.paged_attention(q, k_cache, v_cache, "bfloat16", np.array([0, 1], np.int32), np.array([n - 1], np.int32),
                              table, 1 / np.sqrt(d), 0, device=device)
    keys, values = from_bits(to_bits(k, "bfloat16"), "bfloat16"), from_bits(to_bits(v, "bfloat16"), "bfloat16")
    scores = q[0].astype(np.float64) @ keys.T / np.sqrt(d)
    w = np.exp(scores - scores.max(axis=1, keepdims=True))
    ref = (w / w.sum(axis=1, keepdims=True)) @ values
    for h in range(group):
        assert rel_err(out[0, h], ref[h]) < 2e-2
    assert rel_err(out[0], ref) < 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_attention_decodes_every_code(device, rng):
    """fp8 codes decode exactly in attention (subnormals, +-448, 0x7f / 0xff NaN): one visible key
    whose V holds all 256 codes, power-of-two scales."""
    d = 256
    k_cache, v_cache, k_scale, v_scale = fp8_empty_cache(2, 1, 4, d)
    k_by_slot(k_cache)[1, 0, 0] = rng.choice([c for c in range(256) if c & 0x7F != 0x7F], d).astype(np.uint8)
    v_cache[1, 0, 0] = np.arange(256, dtype=np.uint8)
    k_scale[1], v_scale[1] = 0.0625, 0.5
    q = rng.standard_normal((1, 3, d)).astype(np.float32)
    out = ops.paged_attention(q, k_cache, v_cache, FP8, np.array([0, 1], np.int32), np.array([0], np.int32),
                              np.array([[1]], np.int32), 1.0, k_scale=k_scale, v_scale=v_scale, device=device)
    for h in range(3):
        np.testing.assert_array_equal(out[0, h], e4m3_decode(np.arange(256)) * 0.5)
    assert np.all(k_cache[0] == FP8_NAN)  # block 0 (NaN codes) is never read


@pytest.mark.parametrize("device", DEVICES)
def test_attn_temperature_scale_on_device(device, rng):
    """q * (1 + attn_scale * log1p(floor((p + 1) / floor_scale))), float32 in transformers' order."""
    positions = np.concatenate([[0, 8190, 8191, 16383, 2**24 - 2], rng.integers(0, 3_000_000, 40)]).astype(np.int32)
    q = rng.standard_normal((len(positions), 72)).astype(np.float32)
    out = ops.attn_temperature_scale(q, positions, 0.1, 8192.0, device=device)
    steps = np.floor((positions.astype(np.float32) + np.float32(1.0)) / np.float32(8192.0)).astype(np.float64)
    factor = 1.0 + float(np.float32(0.1)) * np.log1p(steps)
    np.testing.assert_allclose(out, q.astype(np.float64) * factor[:, None], rtol=1e-6, atol=0)
    np.testing.assert_array_equal(out[:2], q[:2])  # p + 1 < floor_scale: factor 1


def test_fp8_tensor_products_probe():
    """The probe of fp8 prefill on tensor cores answers, never raises: no without a usable GPU
    (whatever the build), and never below 64 rows (decode stays on Corral's kernels)."""
    got = _core.cuda_fp8_tensor_products(512, 5120, 16384)
    assert isinstance(got, bool)
    if _core.cuda_device_count() == 0:
        assert got is False
    assert _core.cuda_fp8_tensor_products(63, 5120, 16384) is False
