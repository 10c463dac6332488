"""CPU kernel tests: every op of corral._core.ops against an independent float64 numpy reference.

16-bit weights and caches are compared with a reference computed from the ROUNDED values
(numerics.rounded / from_bits), so the tolerance measures the kernel's float32 arithmetic alone;
fp8 (e4m3) caches likewise against what the cache holds (stored code * its block-head scale).
The SIMD kernels (linear, paged_attention, swiglu_mlp, moe) run once per CPU ISA level (cpu_isa).
"""

import math
import re

import numpy as np
import pytest
import torch
import transformers

import corral
from corral import _core
from numerics import FLOAT_DTYPES, from_bits, rel_err, rounded, to_bits

ops = _core.ops


def k_by_slot(k_cache):
    """A view of a K cache, stored [num_blocks, kv_heads, head_dim, block_size] (each block
    transposed), indexed like V: [num_blocks, kv_heads, block_size, head_dim]."""
    return k_cache.swapaxes(2, 3)

# ---- shared float64 references ------------------------------------------------------------------


def silu64(a):
    """silu in float64 without overflow warnings (exp(-a) may be inf: silu is then -0)."""
    a = np.asarray(a, dtype=np.float64)
    with np.errstate(over="ignore"):
        return a / (1.0 + np.exp(-a))


def product_input(a, dtype):
    """Activations as a product with `dtype` weights reads them: rounded to bfloat16 (from float32)
    for bfloat16 weights, as they are otherwise."""
    if dtype != "bfloat16":
        return np.asarray(a, dtype=np.float64)
    return from_bits(to_bits(np.asarray(a, dtype=np.float32), "bfloat16"), "bfloat16")


def product_input_slack(a, dtype, rel=1e-5):
    """How far product_input(a) may be from what Corral rounds: a value computed in float32 within
    `rel` of a (relatively) may round to the neighbouring bfloat16 where a lies near a rounding
    boundary (0 elsewhere, and for other dtypes)."""
    a = np.asarray(a, dtype=np.float64)
    v = product_input(a, dtype)
    lo, hi = product_input(a * (1 - rel), dtype), product_input(a * (1 + rel), dtype)
    return np.maximum(np.abs(hi - v), np.abs(lo - v))


def assert_within(got, ref, slack, tol=1e-5):
    """|got - ref| <= tol * max|ref| + slack, elementwise."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    excess = np.abs(got - ref) - (tol * np.max(np.abs(ref)) + slack)
    assert np.max(excess) <= 0, f"exceeds the bound by {np.max(excess):.3g} (max|ref| {np.max(np.abs(ref)):.3g})"


def linear_ref(x, w64, layout, dtype="float32"):
    """y = x @ w.T (out_in, w [N, K]) or x @ w (in_out, w [K, N]) in float64, x as the product reads it."""
    return product_input(x, dtype) @ (w64.T if layout == "out_in" else w64)


def rms_norm_ref(x, w64, eps):
    x = np.asarray(x, dtype=np.float64)
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if w64 is None else y * w64


def swiglu_ref(x, gate64, up64, down64, dtype="float32"):
    """(silu(x @ gate.T) * (x @ up.T)) @ down.T in float64 (nn.Linear weights), each product's input as
    the product reads it. Returns (out, slack): the bound on |out - Corral's| that the rounding of
    the hidden rows adds (see product_input_slack)."""
    x = product_input(x, dtype)
    h = silu64(x @ gate64.T) * (x @ up64.T)
    return product_input(h, dtype) @ down64.T, product_input_slack(h, dtype) @ np.abs(down64.T)


def inv_freq_ref(head_dim, theta, rope_type="default", factor=1.0, low=1.0, high=1.0, orig=8192.0):
    """RoPE inverse frequencies (default or llama3 scaling), transformers' formula in float64."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if rope_type == "default":
        return inv
    wavelen = 2 * np.pi / inv
    low_wl, high_wl = orig / low, orig / high
    inv_l = np.where(wavelen > low_wl, inv / factor, inv)
    with np.errstate(divide="ignore", invalid="ignore"):  # low == high: only used where is_medium
        smooth = (orig / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
    is_medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    return np.where(is_medium, smoothed, inv_l)


def rope_ref(x, positions, inv_freq):
    """Interleaved (adjacent-pair) rotation; angle in float32 as the model computes it, cos/sin in float64."""
    angle = (positions.astype(np.float32)[:, None] * np.asarray(inv_freq, np.float32)[None, :]).astype(np.float64)
    c, s = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    x = np.asarray(x, dtype=np.float64)
    a, b = x[..., 0::2], x[..., 1::2]
    y = np.empty_like(x)
    y[..., 0::2] = a * c - b * s
    y[..., 1::2] = a * s + b * c
    return y


def attention_ref(q, keys, values, seq_starts, positions, scale, chunk, kv_heads):
    """Per-row softmax(q.k * scale) @ v over keys lo..p of the row's sequence (float64).

    keys[s], values[s]: [written_len, kv_heads, head_dim] float64 values of what the cache holds.
    """
    rows, heads, d = q.shape
    group = heads // kv_heads
    out = np.zeros((rows, heads, d))
    for s in range(len(seq_starts) - 1):
        for r in range(seq_starts[s], seq_starts[s + 1]):
            p = int(positions[r])
            lo = 0 if chunk == 0 else p - p % chunk
            k, v = keys[s][lo : p + 1], values[s][lo : p + 1]  # [L, kv_heads, d]
            qr = q[r].astype(np.float64).reshape(kv_heads, group, d)
            sc = np.einsum("kgd,lkd->kgl", qr, k) * scale
            w = np.exp(sc - sc.max(axis=-1, keepdims=True))
            w /= w.sum(axis=-1, keepdims=True)
            out[r] = np.einsum("kgl,lkd->kgd", w, v).reshape(heads, d)
    return out


def moe_ref(x, router, gate_up, down, shared_gate, shared_up, shared_down, top_k, dtype="float32"):
    """Llama 4 MoE in float64: top_k by logit (the router reads x exactly), sigmoid score scales the
    expert input, plus shared expert; the experts' products read their inputs as Corral's do."""
    x = np.asarray(x, dtype=np.float64)
    T, E, I = x.shape[0], router.shape[0], down.shape[1]
    logits = x @ router.T
    chosen = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
    out, slack = swiglu_ref(x, shared_gate, shared_up, shared_down, dtype)
    counts = np.zeros(E, dtype=np.int64)
    for t in range(T):
        for e in chosen[t]:
            counts[e] += 1
            z = x[t] / (1.0 + np.exp(-logits[t, e]))
            gu = product_input(z, dtype) @ gate_up[e]
            # A scaled input element that rounds the other way moves both halves of gu.
            gu_slack = product_input_slack(z, dtype) @ np.abs(gate_up[e])
            h = silu64(gu[:I]) * gu[I:]
            h_slack = (np.abs(gu[I:]) + gu_slack[I:]) * gu_slack[:I] * 1.1 + np.abs(silu64(gu[:I])) * gu_slack[I:]
            out[t] += product_input(h, dtype) @ down[e]
            slack[t] += (product_input_slack(h, dtype) + h_slack) @ np.abs(down[e])
    return out, counts, logits, slack


def topk_gap(logits, top_k):
    """Smallest gap, over tokens, between the k-th and (k+1)-th largest logit (inf if k == E)."""
    if top_k >= logits.shape[1]:
        return np.inf
    srt = -np.sort(-logits, axis=1)
    return float(np.min(srt[:, top_k - 1] - srt[:, top_k]))


def chi_square(counts, probs):
    n = counts.sum()
    expected = n * probs
    return float(np.sum((counts - expected) ** 2 / expected))


def chi_square_critical(dof):
    """A generous critical value (about 6 standard deviations above the mean of chi2(dof))."""
    return dof + 6 * math.sqrt(2 * dof)


def cache_np_dtype(dtype):
    return np.float32 if dtype == "float32" else np.uint16


# NaN in each storage format, used to poison cache slots that a kernel must never read.
NAN_BITS = {"float32": np.float32(np.nan), "bfloat16": np.uint16(0x7FC0), "float16": np.uint16(0x7E00)}


def build_paged_cache(rng, dtype, kv_heads, head_dim, block_size, written_lens, spare_blocks=3):
    """A paged K/V cache filled through ops.kv_cache_write via shuffled block tables.

    Sequence s has written_lens[s] tokens (positions 0..len-1) written. Every slot that is not
    written, spare blocks included, holds NaN. Returns (k_cache, v_cache, block_tables, keys,
    values) with keys[s] / values[s] the float64 values of the rounded K/V ([len, kv_heads, d]).
    """
    blocks_per_seq = [-(-n // block_size) for n in written_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    perm = rng.permutation(num_blocks).astype(np.int32)
    max_blocks = max(blocks_per_seq) + 1
    tables = np.empty((len(written_lens), max_blocks), np.int32)
    spare = perm[sum(blocks_per_seq) :]
    i = 0
    for s, nb in enumerate(blocks_per_seq):
        tables[s, :nb] = perm[i : i + nb]
        tables[s, nb:] = spare[0]  # valid (poisoned) ids past the end: a read of them shows as NaN
        i += nb
    k_cache = np.full((num_blocks, kv_heads, head_dim, block_size), NAN_BITS[dtype], cache_np_dtype(dtype))
    v_cache = np.full((num_blocks, kv_heads, block_size, head_dim), NAN_BITS[dtype], cache_np_dtype(dtype))
    keys, values = [], []
    for s, n in enumerate(written_lens):
        k = rng.standard_normal((n, kv_heads * head_dim)).astype(np.float32)
        v = rng.standard_normal((n, kv_heads * head_dim)).astype(np.float32)
        order = rng.permutation(n)  # write tokens in a shuffled order
        j = np.arange(n)[order]
        slots = tables[s, j // block_size].astype(np.int64) * block_size + j % block_size
        k_in, v_in = np.ascontiguousarray(k[order]), np.ascontiguousarray(v[order])
        ops.kv_cache_write(k_cache, v_cache, dtype, k_in, v_in, slots)
        keys.append(from_bits(to_bits(k, dtype), dtype).reshape(n, kv_heads, head_dim))
        values.append(from_bits(to_bits(v, dtype), dtype).reshape(n, kv_heads, head_dim))
    return k_cache, v_cache, tables, keys, values


def in_pool(rng, tables, extra_rows=3):
    """(pool, table_rows): the tables' rows at shuffled rows of a larger pool, as the model's
    persistent block tables hold them; the other rows point at the poisoned spare block of the
    tables' padding (a read through a wrong row shows as NaN)."""
    S = len(tables)
    pool = np.full((S + extra_rows, tables.shape[1]), tables[0, -1], np.int32)
    rows = rng.permutation(S + extra_rows)[:S].astype(np.int32)
    pool[rows] = tables
    return pool, rows


# ---- linear --------------------------------------------------------------------------------------

LINEAR_SIZES = [(5, 37, 29), (70, 300, 130), (4, 64, 64), (1, 3, 17)]  # (M, K, N)


@pytest.mark.parametrize("activations", ["native", "float32"])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M,K,N", LINEAR_SIZES)
def test_linear_matches_float64(cpu_isa, rng, M, K, N, dtype, layout, activations):
    """linear == x @ W (rounded W) within 1e-5 for every dtype, layout, ISA and tile-crossing size;
    x rounded to bf16 for bf16 weights unless the activations are float32."""
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = (rng.standard_normal((N, K) if layout == "out_in" else (K, N)) / np.sqrt(K)).astype(np.float32)
    bits, w64 = rounded(w, dtype)
    y = ops.linear(x, bits, dtype, layout, activations=activations)
    assert y.shape == (M, N) and y.dtype == np.float32
    assert rel_err(y, linear_ref(x, w64, layout, dtype if activations == "native" else "float32")) < 1e-5


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_linear_non_contiguous_inputs(rng, dtype):
    """Strided / transposed views of x and W give the same result as their contiguous values."""
    x = rng.standard_normal((9, 80)).astype(np.float32)[:, ::2]  # [9, 40], strided
    w = rng.standard_normal((40, 23)).astype(np.float32)  # [K, N]
    bits, w64 = rounded(w, dtype)
    ref = linear_ref(x, w64, "in_out", dtype)
    assert rel_err(ops.linear(x, bits, dtype, "in_out"), ref) < 1e-5
    assert rel_err(ops.linear(np.asfortranarray(x), bits.T, dtype, "out_in"), ref) < 1e-5


# ---- rms_norm / silu_mul ---------------------------------------------------------------------------


@pytest.mark.parametrize("w_dtype", [None, *FLOAT_DTYPES])
@pytest.mark.parametrize(
    "rows,dim,eps,scale",
    [(5, 37, 1e-5, 1.0), (3, 5120, 1e-5, 3.0), (4, 24, 1e-2, 1e-3)],  # last: eps dominates mean(x^2)
)
def test_rms_norm(rng, rows, dim, eps, scale, w_dtype):
    """rms_norm == x / sqrt(mean(x^2) + eps) * w, with and without a (rounded) weight."""
    x = (rng.standard_normal((rows, dim)) * scale).astype(np.float32)
    if w_dtype is None:
        y, ref = ops.rms_norm(x, None, eps), rms_norm_ref(x, None, eps)
    else:
        bits, w64 = rounded(rng.uniform(0.5, 1.5, dim), w_dtype)
        y, ref = ops.rms_norm(x, bits, eps, "float32", w_dtype), rms_norm_ref(x, w64, eps)
    assert y.shape == (rows, dim)
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("rows,n", [(5, 37), (33, 300)])
def test_silu_mul(rng, rows, n):
    """silu_mul == silu(gate) * up elementwise, including saturated gates (+-100, -1e4, 0)."""
    gate = (rng.standard_normal((rows, n)) * 4).astype(np.float32)
    gate[0, :6] = [-100.0, 100.0, 0.0, -87.0, 1e4, -1e4]
    up = rng.standard_normal((rows, n)).astype(np.float32)
    out = ops.silu_mul(gate, up)
    np.testing.assert_allclose(out, silu64(gate) * up, rtol=1e-6, atol=1e-30)


# ---- RoPE ------------------------------------------------------------------------------------------

SCOUT_ROPE = dict(factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0, original_max_position_embeddings=8192)
RELEASE_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


def corral_inv_freq(head_dim, theta, rope_type, params):
    return ops.rope_inv_freq(head_dim, theta, rope_type, **params) if params else ops.rope_inv_freq(head_dim, theta)


def transformers_inv_freq(head_dim, theta, rope_type, params):
    """inv_freq from transformers' own RoPE init functions for a Llama4TextConfig."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama4.modeling_llama4 import Llama4TextRotaryEmbedding

    cfg = transformers.Llama4TextConfig(
        head_dim=head_dim,
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        rope_parameters={"rope_type": rope_type, "rope_theta": theta, **params},
    )
    if rope_type in ROPE_INIT_FUNCTIONS:
        inv, _ = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
    else:  # transformers 5 keeps the default RoPE on the model class
        inv, _ = Llama4TextRotaryEmbedding.compute_default_rope_parameters(cfg)
    return inv.numpy()


@pytest.mark.parametrize("theta", [5e5, 1e4])
@pytest.mark.parametrize("head_dim", [128, 48, 80])
@pytest.mark.parametrize(
    "rope_type,params",
    [("default", {}), ("llama3", SCOUT_ROPE), ("llama3", RELEASE_ROPE)],
    ids=["default", "scout", "release"],
)
def test_rope_inv_freq(head_dim, theta, rope_type, params):
    """rope_inv_freq matches transformers (float32) and the float64 formula within 1e-6 relative."""
    got = corral_inv_freq(head_dim, theta, rope_type, params)
    assert got.shape == (head_dim // 2,) and got.dtype == np.float32
    ref64 = inv_freq_ref(
        head_dim,
        theta,
        rope_type,
        params.get("factor", 1.0),
        params.get("low_freq_factor", 1.0),
        params.get("high_freq_factor", 1.0),
        params.get("original_max_position_embeddings", 8192.0),
    )
    np.testing.assert_allclose(got, ref64, rtol=1e-6, atol=0)
    np.testing.assert_allclose(got, transformers_inv_freq(head_dim, theta, rope_type, params), rtol=1e-6, atol=0)


def test_rope_inv_freq_scout_bands():
    """Scout (theta 5e5, d 128, llama3 x16, low = high = 1): pairs 0..34 kept, pairs 35..63 divided by 16."""
    base = ops.rope_inv_freq(128, 5e5)
    scaled = ops.rope_inv_freq(128, 5e5, "llama3", **SCOUT_ROPE)
    assert not np.isnan(scaled).any()
    np.testing.assert_array_equal(scaled[:35], base[:35])
    np.testing.assert_array_equal(scaled[35:], base[35:] / np.float32(16))


def test_rope_inv_freq_release_bands():
    """Release-day (x8, low 1, high 4): wavelengths < 2048 kept, > 8192 divided by 8, the band between blended."""
    base = inv_freq_ref(128, 5e5)
    got = ops.rope_inv_freq(128, 5e5, "llama3", **RELEASE_ROPE).astype(np.float64)
    wavelen = 2 * np.pi / base
    high, low = wavelen < 2048, wavelen > 8192
    mid = ~high & ~low
    assert high.any() and low.any() and mid.any()
    np.testing.assert_allclose(got[high], base[high], rtol=1e-6)
    np.testing.assert_allclose(got[low], base[low] / 8, rtol=1e-6)
    assert np.all(got[mid] < base[mid]) and np.all(got[mid] > base[mid] / 8)


ROPE_POSITIONS = [0, 1, 2, 7, 100, 8191, 8192, 65535, 131071, 500000, 999999, 1000000]


@pytest.mark.parametrize("head_dim,heads", [(128, 3), (48, 5), (1030, 2)])  # 1030: more than 512 pairs
@pytest.mark.parametrize("freqs", ["scout", "random"])
def test_rope_interleaved(rng, head_dim, heads, freqs):
    """Adjacent pairs (2i, 2i+1) rotate by float32(pos) * inv_freq[i]; positions up to 1,000,000."""
    positions = np.array(ROPE_POSITIONS + list(rng.integers(0, 1_000_001, 5)), np.int32)
    if freqs == "scout":
        inv = inv_freq_ref(head_dim, 5e5, "llama3", 16.0, 1.0, 1.0, 8192.0).astype(np.float32)
    else:
        inv = rng.uniform(1e-6, 1.0, head_dim // 2).astype(np.float32)
    x = rng.standard_normal((len(positions), heads, head_dim)).astype(np.float32)
    y = ops.rope_interleaved(x, positions, inv)
    ref = rope_ref(x, positions, inv)
    assert y.shape == x.shape
    assert rel_err(y, ref) < 1e-6
    np.testing.assert_allclose(y, ref, rtol=0, atol=4e-6)  # per element, not only the max


# ---- embedding, argmax, sampling ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_embedding_gathers_rows(rng, dtype):
    """embedding returns table[ids] converted exactly to float32 (ids repeat, include 0 and V-1)."""
    V, D = 50, 37
    bits, table64 = rounded(rng.standard_normal((V, D)), dtype)
    ids = np.concatenate([[0, V - 1, 7, 7], rng.integers(0, V, 9)]).astype(np.int32)
    out = ops.embedding(bits, ids, dtype)
    assert out.dtype == np.float32 and out.shape == (len(ids), D)
    np.testing.assert_array_equal(out.astype(np.float64), table64[ids])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_embedding_every_16bit_pattern(dtype):
    """Every one of the 65536 bit patterns (subnormals, inf, -0) widens exactly as numpy does; NaN stays NaN."""
    table = np.arange(65536, dtype=np.uint32).astype(np.uint16).reshape(4096, 16)
    out = ops.embedding(table, np.arange(4096, dtype=np.int32), dtype)
    if dtype == "float16":
        ref = table.view(np.float16).astype(np.float32)
    else:
        ref = (table.astype(np.uint32) << 16).view(np.float32)
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(out), nan)
    np.testing.assert_array_equal(out.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])


@pytest.mark.parametrize("bad_ids", [[50], [-1], [3, 57, 1], [2**31 - 1]])
def test_embedding_out_of_range_id(rng, bad_ids):
    """An id outside [0, V) raises InvalidInputError naming that id."""
    table = rng.standard_normal((50, 8)).astype(np.float32)
    bad = next(i for i in bad_ids if not 0 <= i < 50)
    with pytest.raises(corral.InvalidInputError, match=rf"(?<![0-9]){re.escape(str(bad))}(?![0-9])"):
        ops.embedding(table, np.array(bad_ids, np.int32))


@pytest.mark.parametrize("vocab", [1, 37, 1000, 202048])
def test_argmax(rng, vocab):
    """argmax per row with the lowest index among ties (ties at 0 / the end, all equal, -inf)."""
    logits = rng.standard_normal((8, vocab)).astype(np.float32)
    top = np.float32(10.0)
    logits[0, [0, vocab - 1]] = top  # tie between first and last
    logits[1, vocab - 1] = top  # max at the end
    logits[2, :] = 0.5  # all equal
    logits[3, [vocab // 2, vocab // 3]] = top  # tie in the middle (lower index wins)
    logits[4, :] = -np.inf
    logits[4, vocab // 2] = -3.0  # one finite value among -inf
    logits[5, :] = -np.inf  # all -inf
    got = ops.argmax(logits)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.argmax(logits, axis=1))


def sampling_expectation(logits, temperature, uniform):
    """Expected inverse-CDF index (float64) and the distance of u*total to its nearest CDF boundary."""
    l64 = logits.astype(np.float64)
    expected = np.argmax(l64, axis=1)
    margin = np.full(len(l64), np.inf)
    for r in range(len(l64)):
        if temperature[r] <= 0:
            continue
        w = np.exp((l64[r] - l64[r].max()) / float(temperature[r]))
        cdf = np.cumsum(w)
        target = float(uniform[r]) * cdf[-1]
        expected[r] = int(np.argmax(cdf > target))
        margin[r] = np.min(np.abs(cdf - target)) / cdf[-1]
    return expected, margin


@pytest.mark.parametrize("rows,vocab", [(64, 1000), (6, 202048)])
def test_sample_temperature_inverse_cdf(rng, rows, vocab):
    """Without truncation, sample picks the first index whose softmax(l/T) CDF exceeds u; T = 0 is argmax."""
    logits = (rng.standard_normal((rows, vocab)) * 2).astype(np.float32)
    logits[rng.random((rows, vocab)) < 0.1] = -np.inf  # masked tokens: never drawn
    logits[1, [3, vocab - 2]] = 20.0  # a tie at the max, for a T = 0 row
    temperature = np.resize(np.array([0.0, 0.0, 0.25, 0.7, 1.0, 1.6, 3.0], np.float32), rows)
    uniform = rng.random(rows, dtype=np.float32)
    uniform[2] = 0.0
    for _ in range(100):  # keep every u*total at least 1e-4 of the mass away from a CDF boundary
        expected, margin = sampling_expectation(logits, temperature, uniform)
        near = margin < 1e-4
        if not near.any():
            break
        uniform[near] = rng.random(int(near.sum()), dtype=np.float32)
    else:
        pytest.fail("could not draw uniforms away from CDF boundaries")
    got = ops.sample(logits, uniform, temperature=temperature)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expected)
    assert np.all(np.isfinite(logits[np.arange(rows), got]))


def reference_probs(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """The distribution transformers' warpers sample from (float64): temperature, then top-k,
    top-p (on the renormalized top-k), min-p; ties broken towards the lower id."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-logits, kind="stable")  # most likely first, lower id first among equals
    keep = np.zeros(len(p), bool)
    keep[order[: top_k if top_k > 0 else len(p)]] = True
    if top_p < 1.0:
        q = np.where(keep, p, 0.0)
        q /= q.sum()
        before = np.cumsum(q[order]) - q[order]  # mass of the more likely tokens
        keep[order[before >= top_p]] = False
    keep &= p >= min_p * p.max()
    out = np.where(keep, p, 0.0)
    return out / out.sum()


SAMPLER_SETTINGS = [  # temperature, top_k, top_p, min_p
    (1.0, 0, 1.0, 0.0),
    (0.5, 0, 1.0, 0.0),
    (2.0, 0, 1.0, 0.0),
    (0.8, 6, 1.0, 0.0),
    (1.0, 0, 0.7, 0.0),
    (1.5, 0, 1.0, 0.15),
    (1.2, 15, 0.85, 0.05),
]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", SAMPLER_SETTINGS)
def test_sample_distribution(rng, temperature, top_k, top_p, min_p):
    """20,000 draws follow the numpy reference distribution (chi-square), never pick a token it
    excludes, and clearly differ from the distribution without the setting under test."""
    V, N = 40, 20_000
    lg = (rng.standard_normal(V) * 1.5).astype(np.float32)
    lg[7] = lg[8] = lg.max() + 0.5  # a tie at the top
    uniform = rng.random(N, dtype=np.float32)
    draws = ops.sample(np.tile(lg, (N, 1)), uniform, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    counts = np.bincount(draws, minlength=V)
    probs = reference_probs(lg, temperature, top_k, top_p, min_p)
    assert counts[probs == 0].sum() == 0, "drew a token the settings exclude"
    kept = probs > 0
    critical = chi_square_critical(int(kept.sum()) - 1)
    assert chi_square(counts[kept], probs[kept]) < critical
    if (top_k, top_p, min_p) == (0, 1.0, 0.0):
        other = reference_probs(lg, 1.5 * temperature)
    else:
        other = reference_probs(lg, temperature)  # the test has power: truncation matters
        assert (other > 0).sum() > kept.sum()
    assert chi_square(counts, other) > chi_square_critical(V - 1)


@pytest.mark.parametrize("top_k,top_p,min_p", [(50, 1.0, 0.0), (0, 0.9, 0.0), (0, 1.0, 0.02), (1000, 0.95, 0.01)])
def test_sample_truncation_large_vocab(rng, top_k, top_p, min_p):
    """At Llama 4's vocabulary every draw lands in the reference's kept set; top-k 1 and top-p
    tiny are greedy."""
    rows, V = 8, 202048
    logits = (rng.standard_normal((rows, V)) * 3).astype(np.float32)
    uniform = rng.random(rows, dtype=np.float32)
    got = ops.sample(logits, uniform, temperature=0.9, top_k=top_k, top_p=top_p, min_p=min_p)
    for r in range(rows):
        assert reference_probs(logits[r], 0.9, top_k, top_p, min_p)[got[r]] > 0
    greedy = np.argmax(logits, axis=1)
    np.testing.assert_array_equal(ops.sample(logits, uniform, temperature=0.9, top_k=1), greedy)
    np.testing.assert_array_equal(ops.sample(logits, uniform, temperature=0.9, top_p=1e-6), greedy)


def test_apply_penalties_matches_numpy(rng):
    """Repetition on prompt and output tokens (divide positive logits, multiply negative ones),
    presence and frequency on output tokens only, per row, against a numpy reference built from
    the raw token lists."""
    rows, V = 6, 300
    logits = (rng.standard_normal((rows, V)) * 3).astype(np.float32)
    prompts = [rng.integers(0, V, rng.integers(1, 40)) for _ in range(rows)]
    outputs = [rng.integers(0, V, rng.integers(0, 30)) for _ in range(rows)]
    repetition = rng.uniform(0.5, 2.0, rows).astype(np.float32)
    presence = rng.uniform(-1, 1, rows).astype(np.float32)
    frequency = rng.uniform(-0.5, 0.5, rows).astype(np.float32)
    repetition[0], presence[0], frequency[0] = 1.0, 0.0, 0.0  # a row left alone

    offsets, ids, counts = [0], [], []
    for prompt, output in zip(prompts, outputs):
        seen = np.union1d(prompt, output)
        ids += list(seen)
        counts += [int(np.sum(output == t)) for t in seen]
        offsets.append(len(ids))
    got = ops.apply_penalties(logits, np.array(offsets), np.array(ids), np.array(counts, np.int32), repetition,
                              presence, frequency)

    want = logits.astype(np.float64)
    for r in range(rows):
        out_counts = np.bincount(outputs[r], minlength=V)
        seen = (np.bincount(prompts[r], minlength=V) > 0) | (out_counts > 0)
        rep = np.where(seen, float(repetition[r]), 1.0)
        want[r] = np.where(want[r] > 0, want[r] / rep, want[r] * rep)
        want[r] -= float(frequency[r]) * out_counts + float(presence[r]) * (out_counts > 0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(got[0], logits[0])
    assert not np.allclose(got[1:], logits[1:])


# ---- KV cache and paged attention -------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_kv_cache_write_slots(rng, dtype):
    """kv_cache_write puts token t's head g at [slot // bs, g, slot % bs] (K transposed per block)
    bit-exactly and touches nothing else."""
    num_blocks, kvh, bs, d, T = 5, 3, 6, 20, 11
    sentinel = np.float32(1234.5) if dtype == "float32" else np.uint16(0x1234)
    k_cache = np.full((num_blocks, kvh, d, bs), sentinel, cache_np_dtype(dtype))
    v_cache = np.full((num_blocks, kvh, bs, d), sentinel, cache_np_dtype(dtype))
    k = rng.standard_normal((T, kvh * d)).astype(np.float32)
    v = rng.standard_normal((T, kvh * d)).astype(np.float32)
    slots = rng.choice(num_blocks * bs, T, replace=False).astype(np.int64)
    ops.kv_cache_write(k_cache, v_cache, dtype, k, v, slots)
    k_exp = np.full_like(k_cache, sentinel)
    v_exp = np.full_like(v_cache, sentinel)
    kb, vb = to_bits(k, dtype), to_bits(v, dtype)
    for t, slot in enumerate(slots):
        for g in range(kvh):
            k_by_slot(k_exp)[slot // bs, g, slot % bs] = kb[t, g * d : (g + 1) * d]
            v_exp[slot // bs, g, slot % bs] = vb[t, g * d : (g + 1) * d]
    bits = np.uint32 if dtype == "float32" else np.uint16  # compare bit patterns (-0, exact rounding)
    np.testing.assert_array_equal(k_cache.view(bits), k_exp.view(bits))
    np.testing.assert_array_equal(v_cache.view(bits), v_exp.view(bits))


EDGE_VALUES = np.array(
    [0.0, -0.0, 1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 1 + 3 * 2**-11, 65504.0, 65519.0, 65520.0, 7e4, -7e4,
     6.1e-5, 6.09e-5, 2**-24, 2.9e-8, 3.0e-8, 1e-8, 3.4e38, -3.4e38, 1e-40, -2.5],
    np.float32,
)  # round-to-even ties of bf16 and fp16, fp16 overflow and subnormals, float32 extremes


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_kv_cache_write_rounding(dtype):
    """16-bit caches round to nearest even exactly as numpy (fp16 overflow -> inf, subnormals kept)."""
    d = len(EDGE_VALUES)
    k_cache = np.zeros((2, 1, d, 3), np.uint16)
    v_cache = np.zeros((2, 1, 3, d), np.uint16)
    ops.kv_cache_write(k_cache, v_cache, dtype, EDGE_VALUES[None], -EDGE_VALUES[None], np.array([4], np.int64))
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(k_by_slot(k_cache)[1, 0, 1], to_bits(EDGE_VALUES, dtype))
        np.testing.assert_array_equal(v_cache[1, 0, 1], to_bits(-EDGE_VALUES, dtype))


# (kv_heads, GQA group, head_dim, block_size, chunk_size); chunk 0 is global causal attention.
ATTENTION_CASES = [
    (2, 1, 64, 16, 0),
    (1, 8, 128, 16, 0),
    (2, 5, 40, 6, 0),
    (1, 8, 64, 4, 8),
    (2, 5, 40, 6, 8),  # block size 6 does not divide the chunk
    (1, 1, 128, 16, 16),
    (2, 8, 64, 6, 16),
]


def ragged_batch():
    """(written lengths, seq_starts, positions): a mid-sequence prefill mixed with decode rows.

    Sequence 0: keys 0..56 written, 37 query rows at positions 20..56 (crosses chunk and 16-row tiles).
    Sequences 1..4: one decode row each; sequences 1 and 4 also have future keys written that the
    row must not see.
    """
    written = [57, 33, 1, 45, 19]
    decode = [30, 0, 44, 17]
    positions = list(range(20, 57)) + decode
    seq_starts = [0, 37, 38, 39, 40, 41]
    return written, np.array(seq_starts, np.int32), np.array(positions, np.int32)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "kv_heads,group,head_dim,block_size,chunk",
    ATTENTION_CASES,
    ids=[f"kv{c[0]}-g{c[1]}-d{c[2]}-bs{c[3]}-ch{c[4]}" for c in ATTENTION_CASES],
)
def test_paged_attention_ragged(cpu_isa, rng, kv_heads, group, head_dim, block_size, chunk, dtype):
    """Ragged prefill + decode batch over shuffled blocks matches per-row float64 attention (1e-4)."""
    written, seq_starts, positions = ragged_batch()
    k_cache, v_cache, tables, keys, values = build_paged_cache(rng, dtype, kv_heads, head_dim, block_size, written)
    heads = kv_heads * group
    q = rng.standard_normal((len(positions), heads, head_dim)).astype(np.float32)
    scale = 1.0 / math.sqrt(head_dim)
    pool, rows = in_pool(rng, tables)
    out = ops.paged_attention(q, k_cache, v_cache, dtype, seq_starts, positions, pool, scale, chunk, table_rows=rows)
    assert out.shape == q.shape
    ref = attention_ref(q, keys, values, seq_starts, positions, scale, chunk, kv_heads)
    assert rel_err(out, ref) < 1e-4


def test_paged_attention_reads_each_sequence_through_its_table_row(rng):
    """The same batch through its own tables (row s for sequence s) and through shuffled rows of a
    larger pool gives the same bits; a row pointing at another sequence's table changes the result,
    and a row outside the pool is refused."""
    written, seq_starts, positions = ragged_batch()
    k_cache, v_cache, tables, _, _ = build_paged_cache(rng, "bfloat16", 2, 64, 16, written)
    q = rng.standard_normal((len(positions), 4, 64)).astype(np.float32)
    direct = ops.paged_attention(q, k_cache, v_cache, "bfloat16", seq_starts, positions, tables, 0.125, 0)
    pool, rows = in_pool(rng, tables)
    pooled = ops.paged_attention(q, k_cache, v_cache, "bfloat16", seq_starts, positions, pool, 0.125, 0, table_rows=rows)
    np.testing.assert_array_equal(pooled, direct)
    swapped = rows.copy()
    swapped[[1, 2]] = swapped[[2, 1]]  # sequence 1's row at position 30 reads 2's table (1 block)
    other = ops.paged_attention(q, k_cache, v_cache, "bfloat16", seq_starts, positions, pool, 0.125, 0, table_rows=swapped)
    assert not np.array_equal(other[37], direct[37])
    with pytest.raises(corral.ShapeError, match="not a row of block_tables"):
        ops.paged_attention(q, k_cache, v_cache, "bfloat16", seq_starts, positions, pool, 0.125, 0,
                            table_rows=np.full(len(rows), len(pool), np.int32))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_paged_attention_large_scores_and_empty_sequence(cpu_isa, rng, dtype):
    """Scores of magnitude ~100 stay finite and exact (online softmax); a sequence with no rows is skipped."""
    written = [41, 12, 23]
    k_cache, v_cache, tables, keys, values = build_paged_cache(rng, dtype, 2, 64, 16, written)
    seq_starts = np.array([0, 21, 21, 22], np.int32)  # sequence 1 has no query rows this step
    positions = np.array(list(range(20, 41)) + [22], np.int32)
    q = (rng.standard_normal((22, 4, 64)) * 12).astype(np.float32)
    out = ops.paged_attention(q, k_cache, v_cache, dtype, seq_starts, positions, tables, 1.0, 0)
    assert np.all(np.isfinite(out))
    assert rel_err(out, attention_ref(q, keys, values, seq_starts, positions, 1.0, 0, 2)) < 1e-4


@pytest.mark.parametrize("block_size", [4, 6])
def test_paged_attention_chunks_are_aligned(rng, block_size):
    """Chunked attention uses aligned chunks, not a sliding window: a row at p % chunk == 0 sees only key p."""
    chunk = 8
    k_cache, v_cache, tables, keys, values = build_paged_cache(rng, "float32", 1, 16, block_size, [33])
    positions = np.array([8, 16, 24, 32, 9], np.int32)
    q = rng.standard_normal((5, 2, 16)).astype(np.float32)
    seq_starts = np.array([0, 5], np.int32)
    out = ops.paged_attention(q, k_cache, v_cache, "float32", seq_starts, positions, tables, 0.25, chunk)
    for r, p in enumerate(positions[:4]):
        np.testing.assert_allclose(out[r], np.broadcast_to(values[0][p, 0], (2, 16)), rtol=1e-6, atol=1e-6)
    # position 9 sees keys 8 and 9 only
    assert rel_err(out[4], attention_ref(q[4:], keys, values, [0, 1], positions[4:], 0.25, chunk, 1)[0]) < 1e-5


# ---- fp8 (e4m3) KV cache -------------------------------------------------------------------------

FP8 = "float8_e4m3"
FP8_NAN = 0x7F  # e4m3fn has no infinities: 0x7f and 0xff are NaN


def e4m3_decode(codes):
    """float64 values of e4m3fn codes: sign, 4 exponent bits (bias 7), 3 mantissa bits, subnormals at exponent 0."""
    b = np.asarray(codes).astype(np.int64)
    e, m = (b >> 3) & 0xF, b & 0x7
    mag = np.where(e == 0, m / 8.0 * 2.0**-6, (1.0 + m / 8.0) * np.exp2(e - 7.0))
    out = np.where(b & 0x80, -mag, mag)
    return np.where((b & 0x7F) == 0x7F, np.nan, out)


E4M3_VALUES = e4m3_decode(np.arange(0x7F))  # the finite non-negative values, increasing with the code


def e4m3_encode(x):
    """float64 reference encoder: the nearest finite e4m3 value (ties to the even code), saturating at 448."""
    x = np.asarray(x, dtype=np.float64)
    a = np.minimum(np.abs(x), E4M3_VALUES[-1])
    hi = np.minimum(np.searchsorted(E4M3_VALUES, a), 0x7E)  # first value >= a
    lo = np.maximum(hi - 1, 0)
    d_lo, d_hi = a - E4M3_VALUES[lo], E4M3_VALUES[hi] - a
    code = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo % 2 == 0, lo, hi)))
    return (code | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8)


def fp8_dequant(cache, scale):
    """float64 values a fp8 cache holds: code * its (block, head) scale."""
    return e4m3_decode(cache) * np.asarray(scale, np.float64)[:, :, None, None]


def fp8_empty_cache(num_blocks, kv_heads, block_size, head_dim):
    """(k_cache, v_cache, k_scale, v_scale) poisoned with NaN codes and NaN scales (K transposed per block)."""
    k_cache = np.full((num_blocks, kv_heads, head_dim, block_size), FP8_NAN, np.uint8)
    v_cache = np.full((num_blocks, kv_heads, block_size, head_dim), FP8_NAN, np.uint8)
    k_scale = np.full((num_blocks, kv_heads), np.nan, np.float32)
    return k_cache, v_cache, k_scale, k_scale.copy()


def fp8_write(cache, k, v, slots):
    k_cache, v_cache, k_scale, v_scale = cache
    ops.kv_cache_write(k_cache, v_cache, FP8, k, v, np.asarray(slots, np.int64), k_scale=k_scale, v_scale=v_scale)


def random_merge(rng, lists):
    """The items of lists, randomly interleaved, each list's items in their own order."""
    lists, out = [list(x) for x in lists if len(x)], []
    while lists:
        i = int(rng.integers(len(lists)))
        out.append(lists[i].pop(0))
        if not lists[i]:
            lists.pop(i)
    return out


def fp8_block_scales(x):
    """Scale of each (token, head) at the time token t of a block is written, as the contract sets it:
    the first token's amax / 448, then doubled as often as each later token's amax / 448 needs."""
    need = np.maximum(np.abs(x).max(axis=2).astype(np.float64) / 448, 2.0**-126)  # [n, heads]
    scale = need.copy()
    for t in range(1, len(x)):
        scale[t] = scale[t - 1]
        while np.any(scale[t] < need[t]):
            scale[t] = np.where(scale[t] < need[t], scale[t] * 2, scale[t])
    return scale


def fp8_error_bounds(x):
    """Largest errors the write contract allows for the tokens x [n, kv_heads, d] of one block, written
    in this order from offset 0: half an fp8 ulp at the top (16 * scale) at the scale a token was rounded
    with; re-quantizations by powers of two are exact except where a value falls among fp8's
    subnormals (half a subnormal step, 2^-10 * the final scale)."""
    scale = fp8_block_scales(x)
    return (16 * scale + 2.0**-10 * scale[-1]) * (1 + 1e-6)


def check_fp8_cache(cache, written, k, v, block_size, kv_heads, head_dim, within_amax_14=False):
    """Every written slot holds k/v to fp8 precision without clipping (fp8_error_bounds; with within_amax_14
    also 1/14 of its block-head amax: twice fp8's best, amax / 28, since a grown scale is at most twice
    amax / 448); each written (block, head) scale is fp8_block_scales' last; unwritten
    slots and scales are untouched. written: token index -> slot."""
    k_cache, v_cache, k_scale, v_scale = cache
    for data, c, sc in ((k, k_by_slot(k_cache), k_scale), (v, v_cache, v_scale)):
        deq = fp8_dequant(c, sc)
        x = data.reshape(len(data), kv_heads, head_dim).astype(np.float64)
        blocks = {}
        for t, slot in sorted(written.items(), key=lambda item: item[1]):
            blocks.setdefault(slot // block_size, []).append(t)
        for b, ts in blocks.items():
            amax = np.abs(x[ts]).max(axis=(0, 2))  # per head
            assert np.all((sc[b] > 0) & np.isfinite(sc[b]))  # all-zero heads too, so that later tokens can grow it
            order = sorted(ts, key=lambda t: written[t])
            expected = fp8_block_scales(x[order])[-1]
            np.testing.assert_allclose(sc[b][amax > 0], expected[amax > 0], rtol=1e-6)
            err = np.abs(deq[b, :, [written[t] % block_size for t in ts]] - x[ts]).max(axis=-1)  # [tokens, heads]
            bound = fp8_error_bounds(x[ts])
            assert np.all(err <= bound), (b, err / bound)
            if within_amax_14:
                assert np.all(err <= amax / 14), (b, err / amax)
        unwritten = np.ones(c.shape[0] * block_size, bool)
        unwritten[list(written.values())] = False
        by_slot = c.transpose(0, 2, 1, 3).reshape(-1, kv_heads, head_dim)
        assert np.all(by_slot[unwritten] == FP8_NAN)
        assert np.all(np.isnan(np.delete(sc, list(blocks), axis=0)))


def test_fp8_decode_every_code():
    """All 256 e4m3fn codes decode exactly (subnormals, -0, +-448); 0x7f and 0xff are NaN."""
    codes = np.arange(256, dtype=np.uint8)
    got = ops.from_fp8_e4m3(codes)
    assert got.dtype == np.float32 and got.shape == (256,)
    ref = e4m3_decode(codes)
    np.testing.assert_array_equal(got, ref)
    assert np.flatnonzero(np.isnan(got)).tolist() == [0x7F, 0xFF]
    np.testing.assert_array_equal(np.signbit(got), codes >= 0x80)
    assert got[0x7E] == 448 and got[0xFE] == -448 and got[1] == 2.0**-9 and got[8] == 2.0**-6 and got[0x38] == 1


FP8_EDGE_VALUES = [
    0.0, -0.0, 1.0, -1.0, 0.3, -17.0,
    1 + 2**-4, 1 + 3 * 2**-4, -(1 + 5 * 2**-4),  # ties between 1, 1.125, 1.25, 1.375: to the even code
    17.0, 19.0, 240.0 + 8, 240.0 + 7.99,  # ties 16|18 -> 16, 18|20 -> 20, 240|256 -> 256
    448.0, -448.0, 449.0, 464.0, 465.0, 480.0, 1e4, 3.4e38, -3.4e38, np.inf, -np.inf,  # saturate at 448
    2.0**-6, 2.0**-6 - 2**-10, 2.0**-6 - 2**-11, 2.0**-9, 2.0**-10, 3 * 2.0**-10, 5 * 2.0**-10, 2.0**-10 + 2**-30,
    2.0**-10 - 2**-30, -3 * 2.0**-10, 2.0**-12, 1e-40, -1e-40, 2.0**-149,  # subnormals, their ties, float denormals
]


def test_fp8_encode_edges_and_random(rng):
    """float32 -> e4m3 rounds to nearest even (subnormals included) and saturates to +-448, like a float64 reference."""
    edges = np.array(FP8_EDGE_VALUES, np.float32)
    mids = ((E4M3_VALUES[:-1] + E4M3_VALUES[1:]) / 2).astype(np.float32)  # every tie, and one float ulp around it
    around = np.concatenate([mids, np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(np.inf))])
    randoms = (rng.standard_normal(200_000) * np.exp2(rng.uniform(-16, 11, 200_000))).astype(np.float32)
    for x in (edges, around, -around, randoms):
        np.testing.assert_array_equal(ops.to_fp8_e4m3(x), e4m3_encode(x))
    got = ops.to_fp8_e4m3(edges)
    assert got[1] == 0x80 and got[6] == 0x38  # -0 keeps its sign; 1 + 2^-4 ties down to 1.0
    assert np.all(got[np.abs(edges) >= 448] & 0x7F == 0x7E)
    assert ops.to_fp8_e4m3(np.array([np.nan], np.float32))[0] & 0x7F == FP8_NAN
    # No finite input ever produces a NaN code.
    everything = np.concatenate([edges, around, randoms])
    assert not np.any(ops.to_fp8_e4m3(everything) & 0x7F == FP8_NAN)


def test_fp8_round_trip_every_finite_code():
    codes = np.array([c for c in range(256) if c & 0x7F != 0x7F], np.uint8)
    np.testing.assert_array_equal(ops.to_fp8_e4m3(ops.from_fp8_e4m3(codes)), codes)


def test_fp8_simd_loads_every_code(cpu_isa, rng):
    """The SIMD fp8 loads of paged_attention decode every code exactly (NaN included): one visible key
    whose V holds all 256 codes."""
    d = 256
    k_cache, v_cache, k_scale, v_scale = fp8_empty_cache(2, 1, 4, d)
    k_by_slot(k_cache)[1, 0, 0] = rng.choice([c for c in range(256) if c & 0x7F != 0x7F], d).astype(np.uint8)
    v_cache[1, 0, 0] = np.arange(256, dtype=np.uint8)
    k_scale[1], v_scale[1] = 0.0625, 0.5  # powers of two: the products are exact
    q = rng.standard_normal((1, 3, d)).astype(np.float32)
    out = ops.paged_attention(q, k_cache, v_cache, FP8, np.array([0, 1], np.int32), np.array([0], np.int32),
                              np.array([[1]], np.int32), 1.0, k_scale=k_scale, v_scale=v_scale)
    for h in range(3):
        np.testing.assert_array_equal(out[0, h], e4m3_decode(np.arange(256)) * 0.5)


def test_kv_cache_write_fp8_slots(rng):
    """One call writing tokens of several blocks, interleaved (each block in slot order from offset 0)."""
    num_blocks, kvh, bs, d = 6, 3, 5, 24
    cache = fp8_empty_cache(num_blocks, kvh, bs, d)
    counts = {0: 5, 2: 1, 3: 3, 5: 4}  # tokens written per block; blocks 1 and 4 stay empty
    slots = random_merge(rng, [[b * bs + o for o in range(n)] for b, n in counts.items()])
    T = len(slots)
    k = (rng.standard_normal((T, kvh * d)) * np.exp2(rng.uniform(-3, 3, (T, 1)))).astype(np.float32)
    v = (rng.standard_normal((T, kvh * d)) * np.exp2(rng.uniform(-3, 3, (T, 1)))).astype(np.float32)
    fp8_write(cache, k, v, slots)
    check_fp8_cache(cache, dict(enumerate(slots)), k, v, bs, kvh, d)


@pytest.mark.parametrize("first_zero", [False, True])
def test_kv_cache_write_fp8_requantizes(rng, first_zero):
    """A block filled token by token, later tokens 10x larger: the scale grows, earlier tokens are
    re-quantized, and every value stays within 1/14 of the block-head amax. A first token of zeros
    leaves a scale later tokens can grow from."""
    num_blocks, kvh, bs, d = 3, 2, 8, 64
    cache = fp8_empty_cache(num_blocks, kvh, bs, d)
    amp = np.array([1, 0.3, 10, 2, 100, 10, 1, 0.1])
    k = (rng.standard_normal((bs, kvh * d)) * amp[:, None]).astype(np.float32)
    v = (rng.standard_normal((bs, kvh * d)) * amp[:, None] * 0.01).astype(np.float32)
    if first_zero:
        k[0], v[0] = 0, -0.0
    block = 1
    scales = []
    for t in range(bs):
        fp8_write(cache, k[t : t + 1], v[t : t + 1], [block * bs + t])
        scales.append(cache[2][block].copy())
        check_fp8_cache(cache, {i: block * bs + i for i in range(t + 1)}, k[: t + 1], v[: t + 1], bs, kvh, d, True)
    assert np.all(scales[2] >= 2 * scales[1]) and np.all(scales[4] >= 2 * scales[3])  # grown, for every head
    np.testing.assert_array_equal(scales[-1], scales[4])
    if first_zero:
        assert np.all(k_by_slot(cache[0])[block, :, 0] & 0x7F == 0)


def test_kv_cache_write_fp8_small_growths(rng):
    """Amplitudes growing by a few percent a token: the scale grows at nearly every token and the first
    tokens are re-quantized many times, each time within half an fp8 ulp (fp8_error_bounds)."""
    kvh, bs, d = 2, 16, 64
    k = (rng.standard_normal((bs, kvh * d)) * 1.05 ** np.arange(bs)[:, None]).astype(np.float32)
    v = (rng.standard_normal((bs, kvh * d)) * 1.03 ** np.arange(bs)[:, None]).astype(np.float32)
    cache = fp8_empty_cache(2, kvh, bs, d)
    for t in range(bs):
        fp8_write(cache, k[t : t + 1], v[t : t + 1], [bs + t])
    check_fp8_cache(cache, {t: bs + t for t in range(bs)}, k, v, bs, kvh, d)


def test_kv_cache_write_fp8_one_call_equals_token_by_token(rng):
    """Several tokens of one block in one call (amplitudes growing and shrinking) store exactly what
    writing them one by one stores; a later call continues the block."""
    kvh, bs, d = 2, 16, 40
    amp = np.exp2(rng.uniform(-4, 4, 12))
    k = (rng.standard_normal((12, kvh * d)) * amp[:, None]).astype(np.float32)
    v = (rng.standard_normal((12, kvh * d)) * amp[::-1, None]).astype(np.float32)
    one, each = fp8_empty_cache(2, kvh, bs, d), fp8_empty_cache(2, kvh, bs, d)
    fp8_write(one, k[:9], v[:9], np.arange(bs, bs + 9))
    fp8_write(one, k[9:], v[9:], np.arange(bs + 9, bs + 12))
    for t in range(12):
        fp8_write(each, k[t : t + 1], v[t : t + 1], [bs + t])
    for a, b in zip(one, each):
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))  # bitwise, scales included
    check_fp8_cache(one, {t: bs + t for t in range(12)}, k, v, bs, kvh, d)


def build_fp8_paged_cache(rng, kv_heads, head_dim, block_size, written_lens, spare_blocks=3):
    """build_paged_cache for float8_e4m3, through ops.kv_cache_write in position order.

    Each sequence is written in chunks of random sizes; each call writes one chunk of every
    sequence, randomly interleaved. Returns (cache, tables, keys, values, keys_in, values_in):
    cache = (k_cache, v_cache, k_scale, v_scale), keys[s] / values[s] the float64 values of what
    the cache holds (code * scale) and keys_in / values_in the unquantized inputs ([len, kv_heads, d]).
    """
    blocks_per_seq = [-(-n // block_size) for n in written_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    perm = rng.permutation(num_blocks).astype(np.int32)
    tables = np.empty((len(written_lens), max(blocks_per_seq) + 1), np.int32)
    i = 0
    for s, nb in enumerate(blocks_per_seq):
        tables[s, :nb] = perm[i : i + nb]
        tables[s, nb:] = perm[-1]  # valid (poisoned) ids past the end
        i += nb
    cache = fp8_empty_cache(num_blocks, kv_heads, block_size, head_dim)
    width = kv_heads * head_dim
    k_in = [rng.standard_normal((n, width)).astype(np.float32) for n in written_lens]
    v_in = [rng.standard_normal((n, width)).astype(np.float32) for n in written_lens]
    chunks = []
    for n in written_lens:
        cuts = np.sort(rng.choice(np.arange(1, n), min(n - 1, 4), replace=False)) if n > 1 else []
        chunks.append(np.split(np.arange(n), cuts))
    for c in range(max(len(x) for x in chunks)):
        items = random_merge(rng, [[(s, int(p)) for p in x[c]] for s, x in enumerate(chunks) if c < len(x)])
        slots = [int(tables[s, p // block_size]) * block_size + p % block_size for s, p in items]
        k = np.stack([k_in[s][p] for s, p in items])
        v = np.stack([v_in[s][p] for s, p in items])
        fp8_write(cache, k, v, slots)
    k_deq, v_deq = fp8_dequant(k_by_slot(cache[0]), cache[2]), fp8_dequant(cache[1], cache[3])
    keys, values = [], []
    for s, n in enumerate(written_lens):
        p = np.arange(n)
        keys.append(k_deq[tables[s, p // block_size], :, p % block_size])
        values.append(v_deq[tables[s, p // block_size], :, p % block_size])
    shape = lambda x: x.reshape(len(x), kv_heads, head_dim).astype(np.float64)  # noqa: E731
    return cache, tables, keys, values, [shape(x) for x in k_in], [shape(x) for x in v_in]


def fp8_attention(q, cache, seq_starts, positions, tables, scale, chunk, table_rows=None):
    k_cache, v_cache, k_scale, v_scale = cache
    return ops.paged_attention(q, k_cache, v_cache, FP8, seq_starts, positions, tables, scale, chunk,
                               k_scale=k_scale, v_scale=v_scale, table_rows=table_rows)


@pytest.mark.parametrize(
    "kv_heads,group,head_dim,block_size,chunk",
    ATTENTION_CASES,
    ids=[f"kv{c[0]}-g{c[1]}-d{c[2]}-bs{c[3]}-ch{c[4]}" for c in ATTENTION_CASES],
)
def test_paged_attention_fp8_ragged(cpu_isa, rng, kv_heads, group, head_dim, block_size, chunk):
    """fp8 caches: float64 attention over the dequantized cache (code * scale) within 1e-4, and over the
    unquantized K/V within 8e-2 (fp8 keeps 3 mantissa bits: each value is rounded once, to within 2^-4
    relative; the attention outputs measure up to about 0.056 here)."""
    written, seq_starts, positions = ragged_batch()
    cache, tables, keys, values, keys_in, values_in = build_fp8_paged_cache(
        rng, kv_heads, head_dim, block_size, written
    )
    heads = kv_heads * group
    q = rng.standard_normal((len(positions), heads, head_dim)).astype(np.float32)
    scale = 1.0 / math.sqrt(head_dim)
    pool, rows = in_pool(rng, tables)
    out = fp8_attention(q, cache, seq_starts, positions, pool, scale, chunk, table_rows=rows)
    assert out.shape == q.shape
    assert rel_err(out, attention_ref(q, keys, values, seq_starts, positions, scale, chunk, kv_heads)) < 1e-4
    ref_in = attention_ref(q, keys_in, values_in, seq_starts, positions, scale, chunk, kv_heads)
    assert rel_err(out, ref_in) < 8e-2


def test_paged_attention_fp8_large_scores_and_empty_sequence(cpu_isa, rng):
    """Scores of magnitude ~100 over an fp8 cache stay finite and exact; a sequence with no rows is skipped."""
    cache, tables, keys, values, _, _ = build_fp8_paged_cache(rng, 2, 64, 16, [41, 12, 23])
    seq_starts = np.array([0, 21, 21, 22], np.int32)
    positions = np.array(list(range(20, 41)) + [22], np.int32)
    q = (rng.standard_normal((22, 4, 64)) * 12).astype(np.float32)
    out = fp8_attention(q, cache, seq_starts, positions, tables, 1.0, 0)
    assert np.all(np.isfinite(out))
    assert rel_err(out, attention_ref(q, keys, values, seq_starts, positions, 1.0, 0, 2)) < 1e-4


def test_attn_temperature_scale_documented_values():
    """attn_scale 0.1, floor_scale 8192: factor 1 up to p = 8190, then 1.0693, 1.1099, 1.2833, 1.4860."""
    positions = np.array([0, 5000, 8190, 8191, 16383, 131071, 1048575], np.int32)
    out = ops.attn_temperature_scale(np.ones((7, 3), np.float32), positions, 0.1, 8192.0)
    expected = [1.0, 1.0, 1.0, 1.0693, 1.1099, 1.2833, 1.4860]
    np.testing.assert_array_equal(out[:3], 1.0)
    np.testing.assert_allclose(out[:, 0], expected, rtol=0, atol=5e-5)
    np.testing.assert_array_equal(out, np.repeat(out[:, :1], 3, axis=1))


def test_attn_temperature_scale_random(rng):
    """q * (1 + attn_scale * log1p(floor((p + 1) / floor_scale))) with the floor taken in float32."""
    positions = np.concatenate([[0, 8191, 2**24 - 2], rng.integers(0, 3_000_000, 20)]).astype(np.int32)
    q = rng.standard_normal((len(positions), 40)).astype(np.float32)
    attn_scale, floor_scale = np.float32(0.1), np.float32(8192.0)
    out = ops.attn_temperature_scale(q, positions, float(attn_scale), float(floor_scale))
    steps = np.floor((positions.astype(np.float32) + np.float32(1.0)) / floor_scale).astype(np.float64)
    factor = 1.0 + float(attn_scale) * np.log1p(steps)
    np.testing.assert_allclose(out, q.astype(np.float64) * factor[:, None], rtol=1e-6, atol=0)


# ---- SwiGLU MLP and MoE -----------------------------------------------------------------------


@pytest.mark.parametrize("activations", ["native", "float32"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("rows,H,I", [(7, 40, 36), (70, 96, 130)])
def test_swiglu_mlp(cpu_isa, rng, rows, H, I, dtype, activations):
    """swiglu_mlp == (silu(x gate^T) * (x up^T)) down^T with the rounded weights, within 1e-5."""
    x = rng.standard_normal((rows, H)).astype(np.float32)
    (gb, g64), (ub, u64), (db, d64) = (
        rounded(rng.standard_normal(shape) / np.sqrt(shape[1]), dtype) for shape in [(I, H), (I, H), (H, I)]
    )
    out = ops.swiglu_mlp(x, gb, ub, db, dtype, activations=activations)
    assert out.shape == (rows, H)
    assert_within(out, *swiglu_ref(x, g64, u64, d64, dtype if activations == "native" else "float32"))


def make_moe(rng, T, H, I, E, top_k, shared_I=None):
    """Random fp32 MoE weights and inputs whose router top_k has no near-tie (gap > 1e-4)."""
    shared_I = shared_I or I
    x = rng.standard_normal((T, H)).astype(np.float32)
    for _ in range(100):
        router = (rng.standard_normal((E, H)) / np.sqrt(H)).astype(np.float32)
        if topk_gap(x.astype(np.float64) @ router.astype(np.float64).T, top_k) > 1e-4:
            break
    else:
        pytest.fail("could not draw a router without near-ties")
    w = dict(
        router=router,
        gate_up=(rng.standard_normal((E, H, 2 * I)) / np.sqrt(H)).astype(np.float32),
        down=(rng.standard_normal((E, I, H)) / np.sqrt(I)).astype(np.float32),
        shared_gate=(rng.standard_normal((shared_I, H)) / np.sqrt(H)).astype(np.float32),
        shared_up=(rng.standard_normal((shared_I, H)) / np.sqrt(H)).astype(np.float32),
        shared_down=(rng.standard_normal((H, shared_I)) / np.sqrt(shared_I)).astype(np.float32),
    )
    return x, w


MOE_ORDER = ("router", "gate_up", "down", "shared_gate", "shared_up", "shared_down")
# (T, H, I, E, top_k)
MOE_CASES = [(1, 24, 20, 16, 1), (7, 24, 20, 128, 2), (33, 40, 36, 16, 2), (33, 40, 36, 128, 1)]


@pytest.mark.parametrize("activations", ["native", "float32"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("T,H,I,E,top_k", MOE_CASES)
def test_moe_matches_float64(cpu_isa, rng, T, H, I, E, top_k, dtype, activations):
    """moe output and per-expert token counts match the float64 Llama 4 reference on the rounded weights.

    The tolerance is 1e-5 for every weight dtype: the reference uses the same rounded weights and
    rounds the experts' inputs and hidden rows to bf16 where Corral does (plus the slack of values
    near a rounding boundary); the router reads x exactly.
    """
    x, w = make_moe(rng, T, H, I, E, top_k)
    if dtype != "float32":  # re-check the top-k gap on the rounded router
        r64 = from_bits(to_bits(w["router"], dtype), dtype)
        assert topk_gap(x.astype(np.float64) @ r64.T, top_k) > 1e-5
    pairs = [rounded(w[name], dtype) for name in MOE_ORDER]
    out, counts = ops.moe(x, *[b for b, _ in pairs], top_k, dtype, activations=activations)
    ref, ref_counts, _, slack = moe_ref(x, *[v for _, v in pairs], top_k, dtype if activations == "native" else "float32")
    assert out.shape == (T, H) and counts.dtype == np.int64
    np.testing.assert_array_equal(counts, ref_counts)
    assert counts.sum() == T * top_k
    if T * top_k < E:  # some experts necessarily idle: their count must be 0
        assert (counts == 0).sum() >= E - T * top_k
    assert_within(out, ref, slack)


def test_moe_many_idle_experts(rng):
    """With tokens steered to experts 3 and 11, every other expert gets zero tokens and the output still matches."""
    T, H, I, E, top_k = 9, 24, 20, 16, 2
    x, w = make_moe(rng, T, H, I, E, top_k)
    x = np.abs(x) + 0.5  # all-positive inputs
    w["router"][:] = (-np.abs(rng.standard_normal((E, H))) / np.sqrt(H)).astype(np.float32)
    w["router"][3] = np.abs(w["router"][3]) + 0.3  # strongly positive logits for experts 3 and 11
    w["router"][11] = np.abs(w["router"][11]) + 0.1
    assert topk_gap(x.astype(np.float64) @ w["router"].astype(np.float64).T, top_k) > 1e-4
    out, counts = ops.moe(x, *[w[n] for n in MOE_ORDER], top_k)
    expected_counts = np.zeros(E, np.int64)
    expected_counts[[3, 11]] = T
    np.testing.assert_array_equal(counts, expected_counts)
    ref = moe_ref(x, *[w[n].astype(np.float64) for n in MOE_ORDER], top_k)[0]
    assert rel_err(out, ref) < 1e-5


def test_moe_shared_expert_width_differs(rng):
    """The shared expert may be wider than the routed experts (I_shared = 52 vs I = 20)."""
    x, w = make_moe(rng, 5, 24, 20, 16, 1, shared_I=52)
    out, _ = ops.moe(x, *[w[n] for n in MOE_ORDER], 1)
    ref = moe_ref(x, *[w[n].astype(np.float64) for n in MOE_ORDER], 1)[0]
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("T,H,I,E,top_k", [(7, 24, 20, 16, 1), (33, 40, 36, 16, 2)])
def test_moe_matches_transformers(rng, T, H, I, E, top_k):
    """moe equals transformers' Llama4TextMoe (fp32) on the same weights: output, logits' top-k, counts."""
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    x, w = make_moe(rng, T, H, I, E, top_k)
    cfg = transformers.Llama4TextConfig(
        hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=top_k
    )
    module = Llama4TextMoe(cfg).float().eval()
    with torch.no_grad():
        module.experts.gate_up_proj.copy_(torch.from_numpy(w["gate_up"]))
        module.experts.down_proj.copy_(torch.from_numpy(w["down"]))
        module.router.weight.copy_(torch.from_numpy(w["router"]))
        module.shared_expert.gate_proj.weight.copy_(torch.from_numpy(w["shared_gate"]))
        module.shared_expert.up_proj.weight.copy_(torch.from_numpy(w["shared_up"]))
        module.shared_expert.down_proj.weight.copy_(torch.from_numpy(w["shared_down"]))
        ref_out, ref_logits = module(torch.from_numpy(x))
    ref_out, ref_logits = ref_out.double().numpy(), ref_logits.double().numpy()
    out, counts = ops.moe(x, *[w[n] for n in MOE_ORDER], top_k)
    chosen = np.argsort(-ref_logits, axis=1, kind="stable")[:, :top_k]
    np.testing.assert_array_equal(counts, np.bincount(chosen.ravel(), minlength=E))
    assert rel_err(out, ref_out) < 1e-5


# ---- bad inputs ----------------------------------------------------------------------------------


def _z(*shape, dtype=np.float32):
    return np.zeros(shape, dtype)


BAD_INPUTS = {
    "linear_x_shape": (lambda: ops.linear(_z(3, 5), _z(4, 6)), corral.ShapeError, r"\(rows, 6\)"),
    "linear_in_out_shape": (lambda: ops.linear(_z(3, 5), _z(6, 4), layout="in_out"), corral.ShapeError, r"\(rows, 6\)"),
    "linear_w_1d": (lambda: ops.linear(_z(3, 5), _z(5)), corral.ShapeError, r"2-D"),
    "linear_dtype": (lambda: ops.linear(_z(3, 5), _z(4, 5), "float64"), corral.DTypeError, "float64"),
    "linear_layout": (lambda: ops.linear(_z(3, 5), _z(4, 5), layout="io"), corral.InvalidInputError, "layout"),
    "rms_norm_w_shape": (lambda: ops.rms_norm(_z(2, 4), _z(5), 1e-5), corral.ShapeError, r"\(4,\)"),
    "rms_norm_dtype": (lambda: ops.rms_norm(_z(2, 4), None, 1e-5, "float8"), corral.DTypeError, "float8"),
    "silu_mul_shapes": (lambda: ops.silu_mul(_z(2, 4), _z(2, 5)), corral.ShapeError, r"\(2, 4\) and \(2, 5\)"),
    "rope_inv_freq_shape": (
        lambda: ops.rope_interleaved(_z(2, 1, 6), _z(2, dtype=np.int32), _z(2)),
        corral.ShapeError,
        r"\(3,\)",
    ),
    "rope_positions_shape": (
        lambda: ops.rope_interleaved(_z(2, 1, 6), _z(3, dtype=np.int32), _z(3)),
        corral.ShapeError,
        r"\(2,\)",
    ),
    "embedding_dtype": (
        lambda: ops.embedding(_z(3, 4, dtype=np.uint16), _z(2, dtype=np.int32), "int8"),
        corral.DTypeError,
        "int8",
    ),
    "kv_write_kv_shape": (
        lambda: ops.kv_cache_write(_z(2, 1, 8, 4), _z(2, 1, 4, 8), "float32", _z(1, 7), _z(1, 7), np.array([1])),
        corral.ShapeError,
        r"\(1, 8\)",
    ),
    "kv_write_slot": (
        lambda: ops.kv_cache_write(_z(2, 1, 8, 4), _z(2, 1, 4, 8), "float32", _z(1, 8), _z(1, 8), np.array([8])),
        corral.InvalidInputError,
        "slot 8",
    ),
    "kv_write_dtype": (
        lambda: ops.kv_cache_write(_z(2, 1, 8, 4), _z(2, 1, 4, 8), "double", _z(1, 8), _z(1, 8), np.array([1])),
        corral.DTypeError,
        "double",
    ),
    "attention_heads_not_multiple": (
        lambda: ops.paged_attention(
            _z(1, 3, 8), _z(2, 2, 8, 4), _z(2, 2, 4, 8), "float32", np.array([0, 1]), np.array([0]), np.array([[0]]), 1.0
        ),
        corral.ShapeError,
        "multiple",
    ),
    "attention_beyond_block_table": (
        lambda: ops.paged_attention(
            _z(1, 2, 8), _z(2, 2, 8, 4), _z(2, 2, 4, 8), "float32", np.array([0, 1]), np.array([4]), np.array([[0]]), 1.0
        ),
        corral.ShapeError,
        "position 4",
    ),
    "swiglu_shapes": (
        lambda: ops.swiglu_mlp(_z(2, 4), _z(3, 4), _z(3, 4), _z(3, 4)),
        corral.ShapeError,
        r"down \(H, I\)",
    ),
    "swiglu_dtype": (lambda: ops.swiglu_mlp(_z(2, 4), _z(3, 4), _z(3, 4), _z(4, 3), "fp8"), corral.DTypeError, "fp8"),
    "moe_down_shape": (
        lambda: ops.moe(_z(2, 4), _z(3, 4), _z(3, 4, 6), _z(3, 3, 5), _z(3, 4), _z(3, 4), _z(4, 3), 1),
        corral.ShapeError,
        r"got \(3, 3, 5\)",
    ),
    "moe_top_k": (
        lambda: ops.moe(_z(2, 4), _z(3, 4), _z(3, 4, 6), _z(3, 3, 4), _z(3, 4), _z(3, 4), _z(4, 3), 4),
        corral.InvalidInputError,
        "top_k 4",
    ),
    "moe_dtype": (
        lambda: ops.moe(_z(2, 4), _z(3, 4), _z(3, 4, 6), _z(3, 3, 4), _z(3, 4), _z(3, 4), _z(4, 3), 1, "float64"),
        corral.DTypeError,
        "float64",
    ),
    "unknown_isa": (lambda: ops.set_cpu_isa("sse9"), corral.InvalidInputError, "sse9"),
    "linear_fp8_weights": (
        lambda: ops.linear(_z(3, 5), _z(4, 5, dtype=np.uint8), "float8_e4m3"),
        corral.DTypeError,
        "float8_e4m3",
    ),
    "rms_norm_fp8_weights": (
        lambda: ops.rms_norm(_z(2, 4), _z(4, dtype=np.uint8), 1e-5, w_dtype="float8_e4m3"),
        corral.DTypeError,
        "float8_e4m3",
    ),
    "fp8_codes_dtype": (lambda: ops.from_fp8_e4m3(_z(3)), corral.DTypeError, "uint8"),
    "kv_write_fp8_no_scales": (
        lambda: ops.kv_cache_write(_z(2, 1, 8, 4, dtype=np.uint8), _z(2, 1, 4, 8, dtype=np.uint8), "float8_e4m3",
                                   _z(1, 8), _z(1, 8), np.array([0])),
        corral.InvalidInputError,
        "k_scale and v_scale",
    ),
    "kv_write_scales_not_fp8": (
        lambda: ops.kv_cache_write(_z(2, 1, 8, 4), _z(2, 1, 4, 8), "float32", _z(1, 8), _z(1, 8), np.array([0]),
                                   k_scale=_z(2, 1), v_scale=_z(2, 1)),
        corral.InvalidInputError,
        "only for float8_e4m3",
    ),
    "kv_write_fp8_cache_dtype": (
        lambda: ops.kv_cache_write(_z(2, 1, 8, 4), _z(2, 1, 4, 8), "float8_e4m3", _z(1, 8), _z(1, 8), np.array([0]),
                                   k_scale=_z(2, 1), v_scale=_z(2, 1)),
        corral.DTypeError,
        "uint8",
    ),
    "kv_write_fp8_scale_dtype": (
        lambda: ops.kv_cache_write(_z(2, 1, 8, 4, dtype=np.uint8), _z(2, 1, 4, 8, dtype=np.uint8), "float8_e4m3",
                                   _z(1, 8), _z(1, 8), np.array([0]), k_scale=_z(2, 1),
                                   v_scale=_z(2, 1, dtype=np.float64)),
        corral.DTypeError,
        "v_scale must be a numpy float32",
    ),
    "kv_write_fp8_scale_shape": (
        lambda: ops.kv_cache_write(_z(2, 1, 8, 4, dtype=np.uint8), _z(2, 1, 4, 8, dtype=np.uint8), "float8_e4m3",
                                   _z(1, 8), _z(1, 8), np.array([0]), k_scale=_z(2), v_scale=_z(2, 1)),
        corral.ShapeError,
        r"k_scale must be \(2, 1\)",
    ),
    "attention_fp8_no_scales": (
        lambda: ops.paged_attention(_z(1, 2, 8), _z(2, 2, 8, 4, dtype=np.uint8), _z(2, 2, 4, 8, dtype=np.uint8),
                                    "float8_e4m3", np.array([0, 1]), np.array([0]), np.array([[0]]), 1.0),
        corral.InvalidInputError,
        "k_scale and v_scale",
    ),
    "attention_fp8_scale_shape": (
        lambda: ops.paged_attention(_z(1, 2, 8), _z(2, 2, 8, 4, dtype=np.uint8), _z(2, 2, 4, 8, dtype=np.uint8),
                                    "float8_e4m3", np.array([0, 1]), np.array([0]), np.array([[0]]), 1.0,
                                    k_scale=_z(2, 2), v_scale=_z(2, 3)),
        corral.ShapeError,
        r"v_scale must be \(2, 2\)",
    ),
    "attention_cache_dtype_name": (
        lambda: ops.paged_attention(_z(1, 2, 8), _z(2, 2, 8, 4), _z(2, 2, 4, 8), "float8", np.array([0, 1]),
                                    np.array([0]), np.array([[0]]), 1.0),
        corral.DTypeError,
        "float8_e4m3",
    ),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises(name):
    """Wrong shapes raise ShapeError naming the expected shape; unknown dtypes raise DTypeError."""
    call, exc, match = BAD_INPUTS[name]
    previous = ops.cpu_isa()
    try:
        with pytest.raises(exc, match=match):
            call()
    finally:
        ops.set_cpu_isa(previous)


def test_error_classes_are_value_errors():
    """ShapeError, DTypeError and InvalidInputError are ValueError subclasses."""
    for exc in (corral.ShapeError, corral.DTypeError, corral.InvalidInputError):
        assert issubclass(exc, ValueError)


def test_16bit_data_not_as_uint16_raises_dtype_error():
    """16-bit weights given as float arrays instead of uint16 bits raise DTypeError."""
    with pytest.raises(corral.DTypeError, match="uint16"):
        ops.linear(_z(3, 5), np.ones((4, 5), np.float16), "float16")
    with pytest.raises(corral.DTypeError, match="uint16"):
        ops.linear(_z(3, 5), np.ones((4, 5), np.float32), "bfloat16")


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_linear_rows_do_not_depend_on_the_batch(cpu_isa, rng, layout, dtype):
    """A row's result is the same bits whether it runs alone, with a few rows (InOut streams W row
    by row) or with many (panels): what makes batched generation equal generation alone."""
    K, N = 601, 83  # three k-chunks of 256, odd tails
    x = rng.standard_normal((21, K)).astype(np.float32)
    w, _ = rounded(rng.standard_normal((K, N) if layout == "in_out" else (N, K)) * 0.05, dtype)
    many = ops.linear(x, w, dtype, layout)
    few = np.concatenate([ops.linear(x[i : i + 3], w, dtype, layout) for i in range(0, 21, 3)])
    alone = np.concatenate([ops.linear(x[i : i + 1], w, dtype, layout) for i in range(21)])
    np.testing.assert_array_equal(few, many)
    np.testing.assert_array_equal(alone, many)


@pytest.mark.parametrize("I", [72, 80])
@pytest.mark.parametrize("E", [4, 16])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_moe_tokens_do_not_depend_on_the_batch(cpu_isa, rng, dtype, E, I):
    """Each token's MoE output is the same bits alone and in a batch, though its expert then has
    one row (streamed, its k-chunks as work items) or, batched, many (E = 4: panels) or a few
    (E = 16: streamed, each expert one work item); K spans several k-chunks. I = 72 is no multiple
    of 16 (gate and up stream apart), I = 80 is (they stream as whole rows of gate_up)."""
    T, H, top_k = 40, 300, 2
    x, w = make_moe(rng, T, H, I, E, top_k)
    args = [rounded(w[name], dtype)[0] for name in MOE_ORDER]
    together = ops.moe(x, *args, top_k, dtype)[0]
    alone = np.concatenate([ops.moe(x[t : t + 1], *args, top_k, dtype)[0] for t in range(T)])
    np.testing.assert_array_equal(alone, together)


# ---- long contexts: split-KV decode ------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("chunk", [0, 8192])
def test_decode_attention_million_token_context(rng, dtype, chunk):
    """One decode row over a 1,048,576-token context (blocks shuffled through the pool), GQA 5:
    the context is split across threads and the partial softmax results merged; within 1e-4 (fp32)
    or 2e-2 (bf16) of float64 over the cached values. chunk 8192: a local layer reads one chunk."""
    n, bs, d, group = 1 << 20, 16, 64, 5
    table = rng.permutation(n // bs).astype(np.int32)[None]
    slots = table[0, np.arange(n) // bs].astype(np.int64) * bs + np.arange(n) % bs
    k = rng.standard_normal((n, d), dtype=np.float32)
    v = rng.standard_normal((n, d), dtype=np.float32)
    k_cache = np.empty((n // bs, 1, d, bs), cache_np_dtype(dtype))
    v_cache = np.empty((n // bs, 1, bs, d), cache_np_dtype(dtype))
    ops.kv_cache_write(k_cache, v_cache, dtype, k, v, slots)
    q = rng.standard_normal((1, group, d)).astype(np.float32) * 2
    scale = 1 / np.sqrt(d)
    out = ops.paged_attention(q, k_cache, v_cache, dtype, np.array([0, 1], np.int32), np.array([n - 1], np.int32),
                              table, scale, chunk)
    lo = 0 if chunk == 0 else (n - 1) - (n - 1) % chunk
    keys, values = from_bits(to_bits(k[lo:], dtype), dtype), from_bits(to_bits(v[lo:], dtype), dtype)
    scores = q[0].astype(np.float64) @ keys.T * scale
    w = np.exp(scores - scores.max(axis=1, keepdims=True))
    ref = (w / w.sum(axis=1, keepdims=True)) @ values
    assert rel_err(out[0], ref) < (1e-4 if dtype == "float32" else 2e-2)


def test_attention_rows_do_not_depend_on_the_batch(cpu_isa, rng):
    """Rows past several 4096-key splits: computed in one prefill tile, as decode rows alone (their
    splits then run on different threads), or in other groupings: the same bits."""
    n, bs, kvh, group, d = 9000, 16, 2, 3, 40
    k_cache, v_cache, tables, _, _ = build_paged_cache(rng, "bfloat16", kvh, d, bs, [n])
    rows = np.arange(n - 37, n, dtype=np.int32)
    q = rng.standard_normal((len(rows), kvh * group, d)).astype(np.float32)

    def attend(sel):
        return ops.paged_attention(q[sel], k_cache, v_cache, "bfloat16", np.array([0, len(sel)], np.int32), rows[sel],
                                   tables[:1], 0.2, 0)

    together = attend(np.arange(len(rows)))
    alone = np.concatenate([attend(np.array([i])) for i in range(len(rows))])
    pairs = np.concatenate([attend(np.arange(i, min(i + 2, len(rows)))) for i in range(0, len(rows), 2)])
    np.testing.assert_array_equal(alone, together)
    np.testing.assert_array_equal(pairs, together)
