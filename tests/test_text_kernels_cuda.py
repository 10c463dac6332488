"""The text model's element-wise kernels (embedding, rope_interleaved, silu_mul, kv_cache_copy_pages,
argmax) and the sampling side's apply_penalties, apply_token_mask and logprobs against independent float64 numpy
references; the CUDA sample against the CPU's (whose own tests are in test_kernels.py).

Every test body runs on the CPU and, with the `cuda` marker, on a GPU (tools/gpu_check.sh runs
`pytest -m cuda`; elsewhere those cases are reported as skipped). 16-bit tables are compared with a
reference computed from the ROUNDED values (numerics.rounded): their conversion to float32 is exact.
"""

import itertools
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


# ---- apply_penalties ---------------------------------------------------------------------------------


def penalty_lists(rng, rows, vocab, max_prompt, max_output):
    """Per row: prompt and output token lists, and the op's (offsets, distinct ids, output counts)."""
    prompts = [rng.integers(0, vocab, rng.integers(0, max_prompt + 1)) for _ in range(rows)]
    outputs = [rng.integers(0, vocab, rng.integers(0, max_output + 1)) for _ in range(rows)]
    return penalty_lists_from(prompts, outputs)


def penalty_lists_from(prompts, outputs):
    offsets, ids, counts = [0], [], []
    for prompt, output in zip(prompts, outputs):
        seen = np.union1d(prompt, output).astype(np.int64)
        ids += list(seen)
        counts += [int(np.sum(output == t)) for t in seen]
        offsets.append(len(ids))
    return prompts, outputs, np.array(offsets, np.int64), np.array(ids, np.int64), np.array(counts, np.int32)


def penalties_ref(logits, prompts, outputs, repetition, presence, frequency):
    """float64 from the raw token lists: divide positive logits / multiply the rest by `repetition`
    for every token seen, then subtract frequency * count and presence for output tokens."""
    want = logits.astype(np.float64)
    vocab = logits.shape[1]
    for r in range(len(prompts)):
        out_counts = np.bincount(outputs[r], minlength=vocab)
        seen = (np.bincount(prompts[r], minlength=vocab) > 0) | (out_counts > 0)
        rep = np.where(seen, float(repetition[r]), 1.0)
        with np.errstate(invalid="ignore"):
            want[r] = np.where(want[r] > 0, want[r] / rep, want[r] * rep)
            want[r] -= float(frequency[r]) * out_counts + float(presence[r]) * (out_counts > 0)
    return want


def penalties_f32(logits, offsets, ids, counts, repetition, presence, frequency):
    """The contract's float32 steps, each rounded once, in its order (the op is bit-exact to this)."""
    out = logits.copy()
    f32 = np.float32
    for r in range(len(offsets) - 1):
        for e in range(offsets[r], offsets[r + 1]):
            x = out[r, ids[e]]
            x = x / repetition[r] if x > 0 else x * repetition[r]
            if counts[e] > 0:
                x = f32(x - f32(frequency[r] * f32(counts[e])))
                x = f32(x - presence[r])
            out[r, ids[e]] = x
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows, vocab, max_prompt, max_output", [(1, 1, 1, 1), (6, 300, 40, 30), (4, 202048, 3000, 500)])
def test_apply_penalties(device, rows, vocab, max_prompt, max_output, rng):
    """Random prompt / output lists (tokens shared between rows, rows with no tokens at all and rows
    left alone by neutral penalties), -inf, +-0 and +inf logits among the penalized ones."""
    logits = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    prompts, outputs, offsets, ids, counts = penalty_lists(rng, rows, vocab, max_prompt, max_output)
    if rows > 1:  # row 1: no penalized tokens
        prompts[1], outputs[1] = np.zeros(0, np.int64), np.zeros(0, np.int64)
        prompts, outputs, offsets, ids, counts = penalty_lists_from(prompts, outputs)
    special = np.array([-np.inf, 0.0, -0.0, np.inf, 1e-30, -1e-30], np.float32)
    for e, v in zip(ids[: len(special)], special):
        logits[:, e] = v  # every row's copy: shared tokens
    repetition = rng.uniform(0.5, 2.0, rows).astype(np.float32)
    presence = rng.uniform(-1, 1, rows).astype(np.float32)
    frequency = rng.uniform(-0.5, 0.5, rows).astype(np.float32)
    repetition[-1], presence[-1], frequency[-1] = 1.0, 0.0, 0.0  # the last row left alone

    got = ops.apply_penalties(logits, offsets, ids, counts, repetition, presence, frequency, device=device)
    assert got.dtype == np.float32 and got.shape == logits.shape
    want = penalties_ref(logits, prompts, outputs, repetition, presence, frequency)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(got, penalties_f32(logits, offsets, ids, counts, repetition, presence, frequency))
    np.testing.assert_array_equal(got[-1], logits[-1])
    if rows > 1:
        np.testing.assert_array_equal(got[1], logits[1])



@pytest.mark.parametrize("device", DEVICES)
def test_apply_penalties_many_rows(device, rng):
    """Many short rows, each penalizing the same few tokens (0, vocab - 1 and one in between)."""
    rows, vocab = 2000, 64
    logits = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    ids = np.tile(np.array([0, 17, vocab - 1], np.int64), rows)
    counts = rng.integers(0, 4, ids.size).astype(np.int32)
    offsets = np.arange(0, ids.size + 1, 3, dtype=np.int64)
    repetition = rng.uniform(0.5, 2.0, rows).astype(np.float32)
    presence = rng.uniform(-1, 1, rows).astype(np.float32)
    frequency = rng.uniform(-0.5, 0.5, rows).astype(np.float32)
    got = ops.apply_penalties(logits, offsets, ids, counts, repetition, presence, frequency, device=device)
    np.testing.assert_array_equal(got, penalties_f32(logits, offsets, ids, counts, repetition, presence, frequency))


@pytest.mark.parametrize("device", DEVICES)
def test_apply_penalties_no_rows(device):
    empty = np.zeros(0, np.float32)
    got = ops.apply_penalties(np.zeros((0, 7), np.float32), np.zeros(1, np.int64), np.zeros(0, np.int64),
                              np.zeros(0, np.int32), empty, empty, empty, device=device)
    assert got.shape == (0, 7)


# ---- apply_token_mask ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows, vocab, masked", [(1, 1, [0]), (5, 33, [4, 0, 2]), (3, 202048, [1, 2]), (300, 64, None)])
def test_apply_token_mask(device, rows, vocab, masked, rng):
    """Listed rows keep exactly the tokens whose bit is set (numpy unpacks the words), the others
    are untouched; bits past the vocabulary are ignored."""
    logits = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    masked = np.array(masked if masked is not None else rng.permutation(rows)[: rows // 2], np.int64)
    words = -(-vocab // 32)
    mask = rng.integers(0, 2**32, size=(masked.size, words), dtype=np.uint64).astype(np.uint32)
    if masked.size > 1:
        mask[1] = 0  # a row allowing nothing
    got = ops.apply_token_mask(logits, masked, mask, device=device)
    bits = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")[:, :vocab].astype(bool)
    want = logits.copy()
    for i, r in enumerate(masked):
        want[r, ~bits[i]] = -np.inf
    np.testing.assert_array_equal(got, want)


def test_apply_token_mask_refuses_bad_input():
    logits = np.zeros((3, 40), np.float32)
    with pytest.raises(corral.ShapeError, match="mask must be"):
        ops.apply_token_mask(logits, np.array([0]), np.zeros((1, 1), np.uint32))
    with pytest.raises(corral.ShapeError, match="distinct rows"):
        ops.apply_token_mask(logits, np.array([1, 1]), np.zeros((2, 2), np.uint32))
    with pytest.raises(corral.ShapeError, match="distinct rows"):
        ops.apply_token_mask(logits, np.array([3]), np.zeros((1, 2), np.uint32))


# ---- logprobs ------------------------------------------------------------------------------------------


def logprobs_ref(logits, chosen, top_n):
    """float64 log_softmax (max-subtracted); the top_n by value, then the lower id among ties."""
    x = logits.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        m = x.max(axis=1, keepdims=True)
        lse = np.log(np.exp(x - m).sum(axis=1, keepdims=True)) + m
        lp = x - lse
    rows, vocab = x.shape
    order = np.stack([np.lexsort((np.arange(vocab), -x[r]))[:top_n] for r in range(rows)]) if rows else np.zeros((0, top_n))
    order = order.astype(np.int64).reshape(rows, top_n)
    return lp[np.arange(rows), chosen], order, np.take_along_axis(lp, order, axis=1)


def check_logprobs(logits, chosen, top_n, device):
    got_lp, got_ids, got_top = ops.logprobs(logits, chosen, top_n, device=device)
    rows = logits.shape[0]
    assert got_lp.dtype == np.float32 and got_lp.shape == (rows,)
    assert got_ids.dtype == np.int32 and got_ids.shape == (rows, top_n)
    assert got_top.dtype == np.float32 and got_top.shape == (rows, top_n)
    want_lp, want_ids, want_top = logprobs_ref(logits, chosen, top_n)
    np.testing.assert_allclose(got_lp, want_lp, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_top, want_top, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab", [1, 5, 37, 1000, 4097, 202048])
@pytest.mark.parametrize("top_n", [0, 1, 20])
def test_logprobs(device, vocab, top_n, rng):
    """Random rows, rows of coarse values (many ties, also within the top_n), rows with -inf logits,
    a +-0 tie and rows of one large value."""
    top_n = min(top_n, vocab)
    rows = 8
    logits = (rng.standard_normal((rows, vocab)) * 4).astype(np.float32)
    logits[1] = np.round(logits[1])  # ties everywhere
    logits[2] = np.float32(7.0)  # all equal: ids in order
    logits[3, rng.random(vocab) < 0.5] = -np.inf
    logits[3, 0] = 1.0  # at least one finite
    logits[4, 1:] = -np.inf  # only id 0 finite: the rest of the top_n are -inf, in id order
    logits[5] = -1.0
    logits[5, [vocab // 2, vocab - 1]] = [-0.0, 0.0]  # +-0 tie: the lower id first
    logits[6] = logits[6] + np.float32(80.0)  # large logits: the maximum is subtracted
    logits[7, rng.integers(0, vocab, 5)] = np.float32(3e4)
    chosen = rng.integers(0, vocab, rows)
    chosen[4] = vocab - 1  # a -inf token's log-probability is -inf
    check_logprobs(logits, chosen, top_n, device)


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_many_rows(device, rng):
    rows, vocab = 1500, 300
    logits = np.round(rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    check_logprobs(logits, rng.integers(0, vocab, rows), 20, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("top_n", [20, 64])
def test_logprobs_top_n_large(device, top_n, rng):
    """top_n up to 64 (the CUDA kernel's limit), over a vocabulary of 202048 with tied values."""
    rows, vocab = 3, 202048
    logits = np.round(rng.standard_normal((rows, vocab)) * 8).astype(np.float32)
    check_logprobs(logits, rng.integers(0, vocab, rows), top_n, device)


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_nan(device):
    """A NaN or +inf logit, or a row of -inf, makes every log-probability of the row NaN."""
    vocab = 50
    logits = np.zeros((4, vocab), np.float32)
    logits[0, 7] = np.nan
    logits[1, 0] = np.nan
    logits[2, 3] = np.inf
    logits[3] = -np.inf
    lp, ids, top = ops.logprobs(logits, np.array([1, 2, 3, 4]), 5, device=device)
    assert np.isnan(lp).all() and np.isnan(top).all()
    assert ((ids >= 0) & (ids < vocab)).all()


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_no_rows(device):
    lp, ids, top = ops.logprobs(np.zeros((0, 5), np.float32), np.zeros(0, np.int32), 3, device=device)
    assert lp.shape == (0,) and ids.shape == (0, 3) and top.shape == (0, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_bad_arguments(device):
    logits = np.zeros((2, 10), np.float32)
    with pytest.raises(corral.InvalidInputError):
        ops.logprobs(logits, np.array([0, 10]), 1, device=device)
    with pytest.raises(corral.InvalidInputError):
        ops.logprobs(logits, np.array([0, 1]), 11, device=device)


@pytest.mark.cuda
def test_logprobs_cuda_top_n_limit():
    """Over 64 top tokens: NotSupportedError on CUDA (the CPU has no limit)."""
    logits = np.zeros((1, 100), np.float32)
    with pytest.raises(corral.NotSupportedError, match="64"):
        ops.logprobs(logits, np.array([0]), 65, device="cuda")
    assert ops.logprobs(logits, np.array([0]), 65)[1].shape == (1, 65)


# ---- sample --------------------------------------------------------------------------------------
# With the same uniform numbers the CUDA sampler picks the CPU's tokens: they differ only where
# float64 sums rounded in other orders (or exp's last bit) fall on the two sides of a cut, cases of
# measure zero that these rows do not hit, so every test asks for equal tokens.


def sample_both(logits, uniform, settings):
    """The CPU's and the CUDA's tokens; settings: one (temperature, top_k, top_p, min_p) per row."""
    t, k, p, m = (np.array(c) for c in zip(*settings))
    kw = dict(temperature=t.astype(np.float32), top_k=k.astype(np.int32), top_p=p.astype(np.float32),
              min_p=m.astype(np.float32))
    uniform = np.asarray(uniform, np.float32)
    want = ops.sample(logits, uniform, **kw)
    got = ops.sample(logits, uniform, **kw, device="cuda")
    assert got.dtype == np.int32 and got.shape == (len(logits),)
    return want, got


def sample_logits(rng, rows, vocab, pattern):
    logits = (rng.standard_normal((rows, vocab)) * 2).astype(np.float32)
    if pattern == "ties":  # many exact ties, also at the top-k and top-p cuts
        logits = np.round(logits)
    elif pattern == "quarters":
        logits = np.round(logits * 4) / 4 - 1
    elif pattern == "-inf":
        logits[rng.random((rows, vocab)) < 0.3] = -np.inf
    return logits


@pytest.mark.cuda
@pytest.mark.parametrize("vocab", [1000, 50000, 202048])
@pytest.mark.parametrize("pattern", ["random", "ties", "quarters", "-inf"])
def test_sample_cuda_matches_cpu(vocab, pattern, rng):
    """Every combination of temperature 0 / 0.7 / 1.5, top_k 0 / 1 / 5 / 5000 (over the 4096 tokens
    the kernel sorts in shared memory) / vocab + 3, top_p 1 / 0.9 / 0.3 and min_p 0 / 0.1, one row
    each, drawn with u = 0, 0.5 and 1 - 2^-24 and with random u."""
    settings = list(itertools.product([0.0, 0.7, 1.5], [0, 1, 5, 5000, vocab + 3], [1.0, 0.9, 0.3], [0.0, 0.1]))
    logits = sample_logits(rng, len(settings), vocab, pattern)
    for u in [0.0, 0.5, 1 - 2**-24, None]:
        uniform = rng.random(len(settings), dtype=np.float32) if u is None else np.full(len(settings), u)
        want, got = sample_both(logits, uniform, settings)
        np.testing.assert_array_equal(got, want, err_msg=f"u = {u}")


@pytest.mark.cuda
@pytest.mark.parametrize("vocab", [5, 1000, 10000])
def test_sample_cuda_edge_rows(vocab, rng):
    """Rows of one finite logit among -inf, two tied ones, all equal, NaN at index 0 (greedy on the
    CPU), +inf, a +-0 tie at the top, huge logits, a float32 overflow in l - max; each with every
    setting of a list that includes top_k at and around the list's 4096 tokens, top_p 0 and
    just under 1, min_p 1 and over 1, temperatures tiny, huge and NaN."""
    base = (rng.standard_normal(vocab) * 2).astype(np.float32)
    rows = []
    row = np.full(vocab, -np.inf, np.float32)
    row[vocab // 2] = 1.0
    rows.append(row)
    row = np.full(vocab, -np.inf, np.float32)
    row[[1, vocab - 1]] = 2.0
    rows.append(row)
    rows.append(np.full(vocab, 0.25, np.float32))
    row = base.copy()
    row[0] = np.nan
    rows.append(row)
    row = base.copy()
    row[vocab // 3] = np.inf
    rows.append(row)
    row = np.minimum(base, -1.0)
    row[[vocab // 4, vocab // 2]] = [0.0, -0.0]
    rows.append(row)
    rows.append(base * 100)
    rows.append(base + 1000)
    row = np.full(vocab, -3e38, np.float32)
    row[vocab - 2] = 3e38
    rows.append(row)
    settings = [(0.7, k, p, m) for k in [0, 1, 5, 4095, 4096, 4097, vocab - 1, vocab] for p in [1.0, 0.9, 0.0]
                for m in [0.0, 0.1]]
    settings += [(1.0, 0, 0.9999999, 0.0), (1.0, 3, 0.9999999, 0.0), (1.0, 0, 1.0, 1.0), (1.0, 0, 0.9, 1.5),
                 (1e-30, 0, 1.0, 0.0), (1e-45, 3, 0.9, 0.0), (1e30, 0, 1.0, 0.0), (1e30, 7, 0.5, 0.0),
                 (np.nan, 0, 1.0, 0.0), (np.nan, 5, 1.0, 0.0), (np.nan, 0, 0.9, 0.0), (-1.0, 0, 0.5, 0.0),
                 (1.5, -3, 1.0, 0.0)]
    logits = np.repeat(np.stack(rows).astype(np.float32), len(settings), axis=0)
    settings = settings * len(rows)
    for u in [0.0, 0.5, 1 - 2**-24]:
        want, got = sample_both(logits, np.full(len(logits), u), settings)
        np.testing.assert_array_equal(got, want, err_msg=f"u = {u}")


@pytest.mark.cuda
@pytest.mark.parametrize("vocab", [1000, 202048])
def test_sample_cuda_nan_logits(vocab, rng):
    """Without truncation (where the CPU's order of NaN is defined): a NaN weight is walked, and once
    the running sum is NaN nothing passes u * total, so the walk ends on its last token."""
    settings = [(1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.1), (1.5, vocab + 3, 1.0, 0.0)]
    rows = []
    for at in [1, vocab // 2, vocab - 1]:
        row = (rng.standard_normal(vocab) * 2).astype(np.float32)
        row[at] = np.nan
        rows.append(row)
    logits = np.repeat(np.stack(rows), len(settings), axis=0)
    settings = settings * len(rows)
    for u in [0.0, 0.3, 0.7, 0.999, 1 - 2**-24]:
        want, got = sample_both(logits, np.full(len(logits), u), settings)
        np.testing.assert_array_equal(got, want, err_msg=f"u = {u}")


@pytest.mark.cuda
def test_sample_cuda_many_rows(rng):
    """300 short rows, each with its own settings and uniform number."""
    rows, vocab = 300, 129
    logits = np.round(rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    settings = list(zip(rng.choice([0.0, 0.5, 1.0, 2.0], rows), rng.integers(0, vocab + 5, rows),
                        rng.choice([1.0, 0.95, 0.5, 0.1], rows), rng.choice([0.0, 0.05, 0.3], rows)))
    want, got = sample_both(logits, rng.random(rows, dtype=np.float32), settings)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_sample_no_rows_and_empty_vocabulary(device):
    """No rows: no tokens; rows of no logits: InvalidInputError on either device."""
    got = ops.sample(np.zeros((0, 5), np.float32), np.zeros(0, np.float32), temperature=1.0, device=device)
    assert got.shape == (0,)
    with pytest.raises(corral.InvalidInputError, match="vocab"):
        ops.sample(np.zeros((2, 0), np.float32), np.zeros(2, np.float32), temperature=1.0, device=device)
