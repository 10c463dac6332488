"""The text model's element-wise kernels (embedding, rope_interleaved, silu_mul, kv_cache_copy_pages,
argmax) against independent float64 numpy references.

Every test body runs on the CPU and, with the `cuda` marker, on a GPU (tools/gpu_check.sh runs
`pytest -m cuda`; elsewhere those cases are reported as skipped). 16-bit tables are compared with a
reference computed from the ROUNDED values (numerics.rounded): their conversion to float32 is exact.
"""

import re

import numpy as np
import pytest

import corral
from corral import _core
from numerics import FLOAT_DTYPES, rounded

ops = _core.ops
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


# ---- embedding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("vocab, dim, tokens", [(1, 1, 1), (37, 13, 9), (50, 257, 33), (1000, 64, 1), (7, 1031, 5)])
def test_embedding(device, dtype, vocab, dim, tokens, rng):
    """Rows table[ids] converted exactly to float32 (ids repeat and include 0 and vocab - 1)."""
    bits, values = rounded(rng.standard_normal((vocab, dim)) * 3, dtype)
    ids = rng.integers(0, vocab, tokens).astype(np.int32)
    ids[0] = vocab - 1
    ids[-1] = 0
    out = ops.embedding(bits, ids, dtype, device=device)
    assert out.dtype == np.float32 and out.shape == (tokens, dim)
    np.testing.assert_array_equal(out.astype(np.float64), values[ids])


@pytest.mark.parametrize("device", DEVICES)
def test_embedding_no_tokens(device):
    out = ops.embedding(np.ones((4, 3), np.float32), np.zeros(0, np.int32), device=device)
    assert out.shape == (0, 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad_ids", [[50], [-1], [3, 57, 1], [2**31 - 1]])
def test_embedding_out_of_range_id(device, bad_ids, rng):
    """An id outside [0, vocab) raises InvalidInputError naming it (on CUDA: checked before launch)."""
    table = rng.standard_normal((50, 8)).astype(np.float32)
    bad = next(i for i in bad_ids if not 0 <= i < 50)
    with pytest.raises(corral.InvalidInputError, match=rf"(?<![0-9]){re.escape(str(bad))}(?![0-9])"):
        ops.embedding(table, np.array(bad_ids, np.int32), device=device)


@pytest.mark.cuda
def test_embedding_cuda_unchecked_ids_give_zero_rows(rng):
    """The CUDA kernel itself never reads outside the table: an unchecked bad id gives a row of zeros."""
    table = rng.standard_normal((50, 19)).astype(np.float32) + 5
    ids = np.array([3, 50, -1, 2**31 - 1, -(2**31), 49], np.int32)
    out = ops.embedding(table, ids, device="cuda", check_ids=False)
    np.testing.assert_array_equal(out[[0, 5]], table[[3, 49]])
    np.testing.assert_array_equal(out[1:5], np.zeros((4, 19), np.float32))


# ---- rope_interleaved --------------------------------------------------------------------------------


def rope_interleaved_ref(x, positions, inv_freq):
    """float64 rotation by the fp32 angle float32(position) * inv_freq (the contract's angle)."""
    angle = (positions.astype(np.float32)[:, None] * inv_freq[None, :]).astype(np.float64)  # (T, d/2), fp32 product
    c, s = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    x = np.asarray(x, np.float64)
    a, b = x[..., 0::2], x[..., 1::2]
    y = np.empty_like(x)
    y[..., 0::2] = a * c - b * s
    y[..., 1::2] = a * s + b * c
    return y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads, head_dim", [(1, 2), (3, 6), (8, 64), (5, 128), (2, 514)])
def test_rope_interleaved(device, heads, head_dim, rng):
    """Small, long-context and large positions (up to 2^31 - 1, float32-rounded as the contract says)."""
    positions = np.array([0, 1, 2, 7, 8191, 8192, 131071, 1_000_003, 2**24 + 1, 2**31 - 1, 12345], np.int32)
    inv_freq = ops.rope_inv_freq(head_dim, 500000.0)
    x = rng.standard_normal((len(positions), heads, head_dim)).astype(np.float32)
    y = ops.rope_interleaved(x, positions, inv_freq, device=device)
    ref = rope_interleaved_ref(x, positions, inv_freq)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-6 * np.abs(x).max())
    np.testing.assert_array_equal(y[0], x[0])  # position 0: untouched


@pytest.mark.parametrize("device", DEVICES)
def test_rope_interleaved_no_tokens(device):
    y = ops.rope_interleaved(np.zeros((0, 2, 8), np.float32), np.zeros(0, np.int32), np.ones(4, np.float32),
                             device=device)
    assert y.shape == (0, 2, 8)


# ---- silu_mul ------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows, n", [(1, 1), (3, 7), (5, 333), (2, 4099), (129, 31)])
def test_silu_mul(device, rows, n, rng):
    """silu(gate) * up, including saturated gates (+-100, -1e4, 1e4) and 0."""
    gate = (rng.standard_normal((rows, n)) * 4).astype(np.float32)
    up = rng.standard_normal((rows, n)).astype(np.float32)
    special = np.array([0.0, 100.0, -100.0, -1e4, 1e4, -88.5, 20.0], np.float32)
    flat = gate.reshape(-1)
    flat[: min(len(special), flat.size)] = special[: flat.size]
    out = ops.silu_mul(gate, up, device=device)
    g, u = gate.astype(np.float64), up.astype(np.float64)
    with np.errstate(over="ignore"):
        ref = g / (1.0 + np.exp(-g)) * u
    assert out.shape == (rows, n) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=2e-6, atol=1e-37)


@pytest.mark.parametrize("device", DEVICES)
def test_silu_mul_no_rows(device):
    assert ops.silu_mul(np.zeros((0, 5), np.float32), np.zeros((0, 5), np.float32), device=device).shape == (0, 5)


# ---- kv_cache_copy_pages -------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("page_bytes", [1, 7, 12, 16, 48, 4096, 4100])
def test_kv_cache_copy_pages(device, page_bytes, rng):
    """Pages src[i] -> dst[i] copied whole, the rest of the pool untouched (any page size, any alignment)."""
    pages = 11
    pool = rng.integers(0, 256, pages * page_bytes, dtype=np.uint8)
    src = np.array([0, 3, 3, 10], np.int32)  # a page copied twice
    dst = np.array([5, 1, 9, 2], np.int32)
    out = ops.kv_cache_copy_pages(pool, page_bytes, src, dst, device=device)
    ref = pool.copy().reshape(pages, page_bytes)
    for s, d in zip(src, dst):
        ref[d] = pool.reshape(pages, page_bytes)[s]
    assert out.dtype == np.uint8 and out.shape == pool.shape
    np.testing.assert_array_equal(out.reshape(pages, page_bytes), ref)


@pytest.mark.parametrize("device", DEVICES)
def test_kv_cache_copy_pages_float_pool(device, rng):
    """A float32 pool (taken as bytes): bit patterns copied, NaNs included."""
    pool = rng.standard_normal((6, 2, 32)).astype(np.float32)
    pool[1, 0, 3] = np.nan
    page_bytes = 2 * 32 * 4
    out = ops.kv_cache_copy_pages(pool, page_bytes, np.array([1], np.int32), np.array([4], np.int32), device=device)
    ref = pool.copy()
    ref[4] = pool[1]
    np.testing.assert_array_equal(out.view(np.uint32), ref.view(np.uint32))
    no_op = ops.kv_cache_copy_pages(pool, page_bytes, np.zeros(0, np.int32), np.zeros(0, np.int32), device=device)
    np.testing.assert_array_equal(no_op.view(np.uint32), pool.view(np.uint32))


# ---- argmax --------------------------------------------------------------------------------------


def argmax_ref(logits):
    """The contract's rule: the lowest index among equal maxima; NaN never compares greater, so a NaN is
    skipped, except at index 0, where the scan starts (the row's answer is then 0)."""
    out = np.zeros(len(logits), np.int64)
    for r, row in enumerate(np.asarray(logits, np.float64)):
        if np.isnan(row[0]) or np.isnan(row).all():
            continue
        vals = np.where(np.isnan(row), -np.inf, row)
        out[r] = np.flatnonzero(vals == vals.max())[0]
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab", [1, 2, 37, 1000, 4097, 202048])
def test_argmax(device, vocab, rng):
    """Ties at 0 / the end / the middle, all equal, -inf rows, NaN rows, +-0 ties."""
    logits = rng.standard_normal((16, vocab)).astype(np.float32)
    top = np.float32(10.0)
    mid, third = vocab // 2, vocab // 3
    logits[0, [0, vocab - 1]] = top  # tie between first and last
    logits[1, vocab - 1] = top  # max at the end
    logits[2, :] = 0.5  # all equal
    logits[3, [mid, third]] = top  # tie in the middle (lower index wins)
    logits[4, :] = -np.inf
    logits[4, mid] = -3.0  # one finite value among -inf
    logits[5, :] = -np.inf  # all -inf
    logits[6, 0] = np.nan  # NaN at index 0: the row's answer is 0
    logits[6, vocab - 1] = top
    logits[7, ::3] = np.nan  # NaNs skipped elsewhere (but index 0 is NaN here too)
    logits[8, 1::2] = np.nan  # NaNs at odd indices, the max among the rest
    logits[8, vocab - 1] = np.nan
    logits[9, :] = np.nan  # all NaN
    logits[10, :] = -1.0  # +-0 tie: -0 first wins
    logits[10, [third, vocab - 1]] = [-0.0, 0.0]
    logits[11, :] = -np.inf  # -inf with NaNs
    logits[11, 1:] = np.nan
    logits[12, vocab - 1] = np.inf  # +inf at the end
    logits[13, [mid, vocab - 1]] = np.inf  # +inf tie
    logits[14, :] = np.float32(3.4e38)
    logits[14, 1::2] = np.nan  # equal finite values among NaNs
    got = ops.argmax(logits, device=device)
    assert got.dtype == np.int32 and got.shape == (16,)
    np.testing.assert_array_equal(got, argmax_ref(logits))


@pytest.mark.parametrize("device", DEVICES)
def test_argmax_many_rows(device, rng):
    """Many short rows: every row's maximum planted at a random index (ties with earlier copies)."""
    rows, vocab = 3001, 129
    logits = rng.standard_normal((rows, vocab)).astype(np.float32)
    at = rng.integers(0, vocab, rows)
    logits[np.arange(rows), at] = 50.0
    logits[np.arange(0, rows, 7), vocab - 1] = 50.0
    got = ops.argmax(logits, device=device)
    np.testing.assert_array_equal(got, argmax_ref(logits))


@pytest.mark.parametrize("device", DEVICES)
def test_argmax_no_rows(device):
    assert ops.argmax(np.zeros((0, 5), np.float32), device=device).shape == (0,)
