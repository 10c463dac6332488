"""Quantized weight products (int8, int4, fp8) against float64 references, per CPU ISA level.

The reference reproduces what the integer products compute by contract (kernels/linear.h):
activations quantized per token and per block of 32 k to 8-bit codes (scale max|x| / 127,
codes = round-half-even(x * (1 / scale)) in float32),
each block's dot product exact, then summed in float64 with the block and weight scales. The
tolerance then measures only the kernels' float32 accumulation. Weights come from the packed
matrix's own unpacking, itself checked against the codes and scales it was packed from.
"""

import numpy as np
import pytest
import torch

import corral
from corral import _core
from numerics import from_bits, to_bits

ops = _core.ops
BLOCK = 32


def quantize_activations(x):
    """(codes, scales) of x [rows, k] as the products quantize them: per row and block of 32."""
    x = np.asarray(x, np.float32)
    rows, k = x.shape
    nb = -(-k // BLOCK)
    xp = np.zeros((rows, nb * BLOCK), np.float32)
    xp[:, :k] = x
    blocks = xp.reshape(rows, nb, BLOCK)
    amax = np.abs(blocks).max(axis=2)
    d = (amax / np.float32(127)).astype(np.float32)
    inv = np.where(amax > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    q = np.rint(blocks * inv[:, :, None]).astype(np.int64)
    return q, d.astype(np.float64)


def int_reference(x, codes, scales, zero_points, dtype, group):
    """y [rows, out] in float64 for integer codes [out, in] (int4 in [-8, 7]) with per-(row, group)
    scales and zero points, as the integer products compute it."""
    out, k = codes.shape
    q, d = quantize_activations(x)
    nb = q.shape[1]
    w = np.zeros((out, nb * BLOCK), np.int64)
    z = np.zeros_like(scales, dtype=np.int64) if zero_points is None else zero_points.astype(np.int64)
    g_of_k = np.arange(nb * BLOCK) // group
    g_of_k = np.minimum(g_of_k, scales.shape[1] - 1)
    w[:, :k] = codes.astype(np.int64) - z[:, g_of_k[:k]]
    dots = np.einsum("rbi,obi->rob", q, w.reshape(out, nb, BLOCK))  # exact integers
    s_block = scales.astype(np.float64)[:, np.minimum((np.arange(nb) * BLOCK) // group, scales.shape[1] - 1)]
    y = np.einsum("rob,rb,ob->ro", dots.astype(np.float64), d, s_block)
    bound = np.einsum("rob,rb,ob->ro", np.abs(dots).astype(np.float64), d, np.abs(s_block))
    return y, bound


def random_quantized(rng, out, k, dtype, group, asym):
    groups = -(-k // group)
    if dtype == "int4":
        codes = rng.integers(-8, 8, size=(out, k), dtype=np.int8)
        zp = rng.integers(-8, 8, size=(out, groups), dtype=np.int8) if asym else None
    else:
        codes = rng.integers(-128, 128, size=(out, k), dtype=np.int8)
        zp = rng.integers(-128, 128, size=(out, groups), dtype=np.int8) if asym else None
    scales = (rng.random((out, groups)) * 0.02 + 1e-3).astype(np.float32)
    return codes, scales, zp


def fp8_values(bits):
    return torch.from_numpy(np.ascontiguousarray(bits, np.uint8)).view(torch.float8_e4m3fn).double().numpy()


def fp8_round(a):
    return torch.from_numpy(np.asarray(a, np.float32)).to(torch.float8_e4m3fn).float().numpy()


def bf16_exact(a):
    return from_bits(to_bits(np.asarray(a, np.float32), "bfloat16"), "bfloat16").astype(np.float32)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("M,K,N,group", [(1, 64, 70, 32), (3, 96, 64, 32), (7, 160, 129, 64), (13, 256, 33, 128),
                                         (1, 40, 5, 32)])
def test_integer_linear_matches_float64(cpu_isa, rng, M, K, N, group, dtype, asym, scale_dtype):
    codes, scales, zp = random_quantized(rng, N, K, dtype, group, asym)
    if scale_dtype == "bfloat16":
        scales = bf16_exact(scales)
    x = rng.standard_normal((M, K)).astype(np.float32)
    x[0, : min(K, 8)] *= 50  # an outlier block
    p = ops.pack_quantized(codes, scales, zp, dtype=dtype, group=group, scale_dtype=scale_dtype)
    # The packed matrix unpacks to (q - z) * s exactly.
    groups = np.arange(K) // group
    z = 0 if zp is None else zp[:, groups].astype(np.float32)
    np.testing.assert_array_equal(ops.unpack_packed(p), (codes.astype(np.float32) - z) * scales[:, groups])
    y = ops.linear_packed(x, p)
    ref, bound = int_reference(x, codes, scales, zp, dtype, group)
    assert np.all(np.abs(y - ref) <= 1e-5 * bound + 1e-30), np.max(np.abs(y - ref) / (bound + 1e-30))


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_integer_linear_close_to_float(rng, dtype):
    """The activation quantization's own error (8-bit codes per block of 32): within 1e-2 of the
    float64 product of the same weights."""
    K, N = 512, 96
    codes, scales, _ = random_quantized(rng, N, K, dtype, 32, False)
    p = ops.pack_quantized(codes, scales, None, dtype=dtype, group=32)
    x = rng.standard_normal((4, K)).astype(np.float32)
    exact = x.astype(np.float64) @ ops.unpack_packed(p).astype(np.float64).T
    err = np.linalg.norm(ops.linear_packed(x, p) - exact) / np.linalg.norm(exact)
    assert err < 1e-2, err


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_integer_glu_and_mlp(cpu_isa, rng, dtype):
    """Gate and up packed together give silu(gate) * up, and the MLP its down product."""
    H, I, rows = 96, 80, 5
    g = random_quantized(rng, I, H, dtype, 32, dtype == "int4")
    u = random_quantized(rng, I, H, dtype, 32, dtype == "int4")
    d = random_quantized(rng, H, I, dtype, 32, False)
    gu = ops.pack_quantized(*g, dtype=dtype, group=32, up=u)
    dn = ops.pack_quantized(*d, dtype=dtype, group=32)
    w = ops.unpack_packed(gu)
    np.testing.assert_array_equal(w[:I], ops.unpack_packed(ops.pack_quantized(*g, dtype=dtype, group=32)))
    x = rng.standard_normal((rows, H)).astype(np.float32)
    gate, _ = int_reference(x, *g, dtype, 32)
    up, _ = int_reference(x, *u, dtype, 32)
    h = gate / (1 + np.exp(-gate)) * up
    ref, _ = int_reference(h.astype(np.float32), *d, dtype, 32)
    got = ops.swiglu_packed(x, gu, dn)
    # h is float32 in the kernel: its quantization may differ at block-scale rounding boundaries.
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 2e-2


@pytest.mark.parametrize("group,act_group", [(64, 0), (32, 0), (96, 32), (200, 200)])
def test_fp8_linear_matches_float64(cpu_isa, rng, group, act_group):
    N, K, M = 70, 200, 6
    bits = rng.integers(0, 256, size=(N, K), dtype=np.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0x3F  # no NaN codes
    groups = -(-K // group)
    scales = (rng.random((N, groups)) + 0.5).astype(np.float32)
    p = ops.pack_quantized(bits.view(np.int8), scales, None, dtype="float8_e4m3", group=group, act_group=act_group)
    w = fp8_values(bits) * scales[:, np.arange(K) // group]
    np.testing.assert_array_equal(ops.unpack_packed(p), w.astype(np.float32))
    x = rng.standard_normal((M, K)).astype(np.float32)
    if act_group:  # the reference's fp8 rounding of activations, per token and run
        xr = x.copy()
        for k0 in range(0, K, act_group):
            blk = x[:, k0 : k0 + act_group]
            s = (np.abs(blk).max(axis=1, keepdims=True) / np.float32(448)).astype(np.float32)
            xr[:, k0 : k0 + act_group] = fp8_round(blk / s) * s
        x_ref = xr.astype(np.float64)
    else:
        x_ref = x.astype(np.float64)
    ref = x_ref @ w.T
    bound = np.abs(x_ref) @ np.abs(w).T
    y = ops.linear_packed(x, p)
    assert np.all(np.abs(y - ref) <= 1e-5 * bound), np.max(np.abs(y - ref) / bound)


@pytest.mark.parametrize("dtype", ["int8", "int4", "float8_e4m3"])
def test_quantized_rows_do_not_depend_on_the_batch(cpu_isa, rng, dtype):
    """Bitwise: a row's output alone equals its output inside batches of other sizes."""
    K, N = 224, 150
    if dtype == "float8_e4m3":
        codes = rng.integers(0, 0x7E, size=(N, K), dtype=np.uint8).view(np.int8)
        scales, zp = (rng.random((N, 1)) + 0.5).astype(np.float32), None
        p = ops.pack_quantized(codes, scales, zp, dtype=dtype, group=K)
    else:
        codes, scales, zp = random_quantized(rng, N, K, dtype, 32, True)
        p = ops.pack_quantized(codes, scales, zp, dtype=dtype, group=32)
    x = rng.standard_normal((70, K)).astype(np.float32)
    full = ops.linear_packed(x, p)
    for rows in (1, 2, 5, 13):
        for start in (0, 3, 40):
            np.testing.assert_array_equal(ops.linear_packed(x[start : start + rows], p), full[start : start + rows])


def test_int8_quantizer(rng):
    w = rng.standard_normal((40, 100)).astype(np.float32)
    codes, scales, group = ops.quantize_weights(w, "int8")
    assert group == 128 and scales.shape == (40, 1)
    np.testing.assert_allclose(scales[:, 0], np.abs(w).max(axis=1) / np.float32(127), rtol=1e-7)
    assert np.abs(codes).max() <= 127
    np.testing.assert_array_equal(codes, np.rint(w / scales).astype(np.int8))
    err = np.linalg.norm(codes * scales - w) / np.linalg.norm(w)
    assert err < 0.0088 * 1.1  # the doc's 0.88% for Gaussian rows (K = 5120), within 10%


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_scale_search_beats_rounding(rng, group):
    w = rng.standard_normal((64, 1024)).astype(np.float32)
    codes, scales, g = ops.quantize_weights(w, "int4", group, "bfloat16")
    assert g == group and codes.min() >= -8 and codes.max() <= 7
    np.testing.assert_array_equal(scales, bf16_exact(scales))
    deq = codes.astype(np.float32) * np.repeat(scales, group, axis=1)
    err = np.linalg.norm(deq - w) / np.linalg.norm(w)
    # Plain rounding (compressed-tensors' symmetric int4: max|w| / 7.5, codes in [-8, 7]).
    blocks = w.reshape(64, -1, group)
    s = np.abs(blocks).max(axis=2, keepdims=True) / 7.5
    rtn = np.clip(np.rint(blocks / s), -8, 7) * s
    rtn_err = np.linalg.norm(rtn.reshape(w.shape) - w) / np.linalg.norm(w)
    assert err < 0.95 * rtn_err, (err, rtn_err)
    doc = {32: 0.095, 64: 0.103, 128: 0.111}[group]  # quantization.md 2.3 (plain rounding)
    assert err < doc * 1.1, err


def test_quantized_packing_rejects_bad_input(rng):
    codes = np.zeros((8, 64), np.int8)
    with pytest.raises(_core.ShapeError, match="multiples of 32"):
        ops.pack_quantized(codes, np.ones((8, 3), np.float32), dtype="int4", group=24)
    with pytest.raises(_core.DTypeError, match="int3"):
        ops.pack_quantized(codes, np.ones((8, 2), np.float32), dtype="int3", group=32)
    with pytest.raises(_core.ShapeError, match="scales"):
        ops.pack_quantized(codes, np.ones((8, 1), np.float32), dtype="int4", group=32)


def test_pack_moe_quantized_cpu(rng):
    """pack_moe_quantized (the loader's layout of quantized experts, for moe_packed on either device)
    runs the CPU's moe as its pieces say: with every expert chosen, the shared expert's SwiGLU of x
    plus each expert's of sigmoid(router logit) * x (swiglu_packed on the same packed matrices).
    Within 1e-3: an activation code may move by one where the two compute sigmoid(logit) * x apart."""
    E, H, I = 3, 64, 96

    def glu_pair():
        g, u = (rng.standard_normal((I, H)) / 8).astype(np.float32), (rng.standard_normal((I, H)) / 8).astype(np.float32)
        (gc, gs, group), (uc, us, _) = ops.quantize_weights(g, "int8", 32), ops.quantize_weights(u, "int8", 32)
        return ops.pack_quantized(gc, gs, None, "int8", group, up=(uc, us, None))

    def down():
        c, s, group = ops.quantize_weights((rng.standard_normal((H, I)) / 8).astype(np.float32), "int8", 32)
        return ops.pack_quantized(c, s, None, "int8", group)

    router = rng.standard_normal((E, H)).astype(np.float32)
    gu, dn, shared = [glu_pair() for _ in range(E)], [down() for _ in range(E)], (glu_pair(), down())
    moe = ops.pack_moe_quantized(router, gu, dn, *shared)
    x = rng.standard_normal((5, H)).astype(np.float32)
    out, counts = ops.moe_packed(x, moe, E)
    assert counts.tolist() == [5] * E
    score = 1 / (1 + np.exp(-(x.astype(np.float64) @ router.T.astype(np.float64))))
    ref = ops.swiglu_packed(x, *shared).astype(np.float64)
    for e in range(E):
        ref += ops.swiglu_packed((score[:, e : e + 1] * x).astype(np.float32), gu[e], dn[e])
    assert np.max(np.abs(out - ref)) <= 1e-3 * np.max(np.abs(ref))
    with pytest.raises(corral.ShapeError, match="one packed matrix per expert"):
        ops.pack_moe_quantized(router, gu[:2], dn, *shared)
