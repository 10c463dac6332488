"""The vision encoder's kernels (layer_norm, gelu, add_rows, rope_2d, attention_dense, unfold_patches,
pixel_shuffle) against independent float64 numpy references, and where there is one against torch /
transformers (Llama 4's own pixel shuffle and 2-D RoPE).

Every test body runs on the CPU and, with the `cuda` marker, on a GPU (tools/gpu_check.sh runs
`pytest -m cuda`; elsewhere those cases are reported as skipped). 16-bit weights are compared with a
reference computed from the ROUNDED values (numerics.rounded), so the tolerances measure the
kernels' float32 arithmetic alone.
"""

import math
import types

import numpy as np
import pytest
import torch

from corral import _core
from numerics import FLOAT_DTYPES, rel_err, rounded

ops = _core.ops
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


# ---- references (float64 numpy) -----------------------------------------------------------------


def layer_norm_ref(x, w, b, eps):
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps) * w
    return y if b is None else y + b


_erf = np.frompyfunc(math.erf, 1, 1)


def gelu_ref(x):
    x = np.asarray(x, np.float64)
    return x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64)) / 2.0


def vision_inv_freq(head_dim, theta=10000.0):
    """Llama 4's vision RoPE frequencies (head_dim / 4 of them) as float32."""
    freq_dim = head_dim // 2
    return (1.0 / theta ** (np.arange(0, freq_dim, 2)[: freq_dim // 2] / freq_dim)).astype(np.float32)


def rope_2d_ref(x, heads, head_dim, pos_x, pos_y, inv_freq):
    """Pair i < head_dim / 4 of each head turns by the fp32 angle float(pos_x) * inv_freq[i], pair
    head_dim / 4 + i by float(pos_y) * inv_freq[i]; cos / sin of that angle and the rotation in float64."""
    out = np.asarray(x, np.float64).copy()
    ax = (pos_x.astype(np.float32)[:, None] * inv_freq[None, :]).astype(np.float64)  # float32 products
    ay = (pos_y.astype(np.float32)[:, None] * inv_freq[None, :]).astype(np.float64)
    angle = np.concatenate([ax, ay], axis=1)  # [tokens, head_dim / 2]
    c, s = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    t = out[:, : heads * head_dim].reshape(len(x), heads, head_dim // 2, 2)
    a, b = t[..., 0].copy(), t[..., 1].copy()
    t[..., 0], t[..., 1] = a * c - b * s, a * s + b * c
    out[:, : heads * head_dim] = t.reshape(len(x), heads * head_dim)
    return out


def attention_dense_ref(q, k, v, seqs, heads, head_dim, scale):
    rows = q.shape[0]
    n = rows // seqs
    w = heads * head_dim
    shape = (seqs, n, heads, head_dim)
    q4, k4, v4 = (np.asarray(a[:, :w], np.float64).reshape(shape) for a in (q, k, v))
    s = np.einsum("snhd,smhd->shnm", q4, k4) * scale
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("shnm,smhd->snhd", p, v4).reshape(rows, w), s


def unfold_ref(pixels, patch):
    t, c, size, _ = pixels.shape
    g = size // patch
    # [t, c, gy, ky, gx, kx] -> [t, gy, gx, c, ky, kx]
    return pixels.reshape(t, c, g, patch, g, patch).transpose(0, 2, 4, 1, 3, 5).reshape(t * g * g, c * patch * patch)


def pixel_shuffle_ref(x, tiles, grid, s):
    tile_rows, dim = x.shape[0] // tiles, x.shape[1]
    g = grid // s
    out = []
    for t in range(tiles):
        tok = x[t * tile_rows : t * tile_rows + grid * grid]
        # [r, dy, c, dx, ch] -> [r, c, dy, dx, ch]
        out.append(tok.reshape(g, s, g, s, dim).transpose(0, 2, 1, 3, 4).reshape(g * g, s * s * dim))
    return np.concatenate(out, axis=0).reshape(tiles * g * g, s * s * dim)


# ---- layer_norm ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows, dim", [(1, 1), (3, 7), (5, 1408), (17, 33), (2, 5000)])
def test_layer_norm(device, w_dtype, bias, rows, dim, rng):
    x = (rng.standard_normal((rows, dim)) * 3 + 5).astype(np.float32)
    w_bits, w = rounded(rng.standard_normal(dim), w_dtype)
    b_bits, b = rounded(rng.standard_normal(dim), w_dtype) if bias else (None, None)
    y = ops.layer_norm(x, w_bits, b_bits, 1e-5, w_dtype=w_dtype, device=device)
    ref = layer_norm_ref(x, w, b, 1e-5)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # torch.nn.LayerNorm on the same float32 inputs
    t = torch.nn.functional.layer_norm(torch.from_numpy(x), (dim,), torch.from_numpy(w.astype(np.float32)),
                                       None if b is None else torch.from_numpy(b.astype(np.float32)), eps=1e-5)
    np.testing.assert_allclose(y, t.numpy(), rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("device", DEVICES)
def test_layer_norm_in_place_and_hard_statistics(device, rng):
    """y over x's buffer; rows with a large mean and a small spread, and a constant row (var 0)."""
    dim = 1408
    x = np.stack([1e3 + rng.standard_normal(dim), 1e-3 * rng.standard_normal(dim), np.full(dim, 7.0),
                  rng.standard_normal(dim) * 1e4]).astype(np.float32)
    w = rng.standard_normal(dim).astype(np.float32)
    b = rng.standard_normal(dim).astype(np.float32)
    y = ops.layer_norm(x, w, b, 1e-6, in_place=True, device=device)
    np.testing.assert_array_equal(y, ops.layer_norm(x, w, b, 1e-6, device=device))
    ref = layer_norm_ref(x, w, b, 1e-6)
    # Row 0: the mean (1000) is used in float32, as torch does: ~|mean| * 2^-24 / std absolute error.
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=2e-4 * np.abs(ref).max())
    np.testing.assert_allclose(y[1:], ref[1:], rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_array_equal(y[2], b)  # (7 - 7) * inv * w + b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows, dim", [(0, 8), (4, 0), ((1 << 20) + 5, 3)])
def test_layer_norm_empty_and_many_rows(device, rows, dim, rng):
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    w = rng.standard_normal(dim).astype(np.float32)
    y = ops.layer_norm(x, w, None, 1e-5, device=device)
    assert y.shape == (rows, dim)
    if x.size:
        ref = layer_norm_ref(x, w, None, 1e-5)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


# ---- gelu ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows, ld, n", [(1, 1, 1), (3, 7, 7), (5, 20, 17), (17, 5632, 5632), (70000, 5, 3), (0, 4, 4)])
def test_gelu(device, rows, ld, n, rng):
    x = (rng.standard_normal((rows, ld)) * 4).astype(np.float32)
    if x.size:
        x.flat[:6] = [0.0, -0.0, 10.0, -10.0, -30.0, 1e-20][: x.size]
    y = ops.gelu(x, n, device=device)
    assert y.shape == x.shape
    np.testing.assert_array_equal(y[:, n:], x[:, n:])  # columns beyond n untouched
    if not x.size:
        return
    ref = gelu_ref(x[:, :n])
    np.testing.assert_allclose(y[:, :n], ref, rtol=2e-6, atol=2e-7 * max(1.0, np.abs(x).max()))
    t = torch.nn.functional.gelu(torch.from_numpy(np.ascontiguousarray(x[:, :n])))  # approximate='none'
    np.testing.assert_allclose(y[:, :n], t.numpy(), rtol=1e-5, atol=1e-6 * max(1.0, np.abs(x).max()))


# ---- add_rows -----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("rows, ldy, n, src_rows", [(1, 1, 1, 1), (5, 9, 7, 1), (12, 33, 33, 4), (34, 21, 17, 17),
                                                    (70000, 4, 3, 7), (0, 5, 5, 1)])
def test_add_rows(device, dtype, rows, ldy, n, src_rows, rng):
    y = rng.standard_normal((rows, ldy)).astype(np.float32)
    src_bits, src = rounded(rng.standard_normal((src_rows, n)), dtype)
    out = ops.add_rows(y, src_bits, dtype, device=device)
    assert out.shape == y.shape
    ref = y.astype(np.float64)
    ref[:, :n] += src[np.arange(rows) % src_rows]
    # One float32 rounding of the exact sum (columns beyond n untouched).
    np.testing.assert_array_equal(out, ref.astype(np.float32))


# ---- rope_2d ------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens, heads, head_dim, pad", [(1, 1, 4, 0), (5, 3, 8, 3), (17, 2, 16, 0), (577, 16, 88, 0),
                                                          (7, 2, 88, 5), (3, 2, 1032, 1), (0, 2, 8, 0)])
def test_rope_2d(device, tokens, heads, head_dim, pad, rng):
    ld = heads * head_dim + pad
    x = rng.standard_normal((tokens, ld)).astype(np.float32)
    pos_x = rng.integers(0, 24, tokens).astype(np.int32)
    pos_y = rng.integers(0, 24, tokens).astype(np.int32)
    if tokens >= 3:
        pos_x[0], pos_y[0] = 0, 0  # the class token: unrotated
        pos_x[1], pos_y[2] = 100000, 7654321  # long range: the fp32 angle, accurate cos / sin
    inv_freq = vision_inv_freq(head_dim)
    y = ops.rope_2d(x, pos_x, pos_y, inv_freq, heads, device=device)
    assert y.shape == x.shape
    np.testing.assert_array_equal(y[:, heads * head_dim :], x[:, heads * head_dim :])
    if not tokens:
        return
    ref = rope_2d_ref(x, heads, head_dim, pos_x, pos_y, inv_freq)
    np.testing.assert_allclose(y, ref, rtol=0, atol=6e-7 * np.abs(x).max())
    if tokens >= 3:
        np.testing.assert_array_equal(y[0], x[0])


@pytest.mark.parametrize("device", DEVICES)
def test_rope_2d_matches_transformers(device, rng):
    """Llama 4's vision RoPE (transformers): grid positions x + 1, y + 1 of each patch, 0 for the
    class token (last), frequencies of theta 10000 over head_dim / 2."""
    from transformers.models.llama4.modeling_llama4 import Llama4VisionRotaryEmbedding, vision_apply_rotary_emb

    grid, heads, head_dim = 6, 3, 88
    cfg = types.SimpleNamespace(image_size=grid * 14, patch_size=14, hidden_size=heads * head_dim,
                                num_attention_heads=heads, rope_parameters={"rope_theta": 10000.0})
    freqs = Llama4VisionRotaryEmbedding._compute_freqs_ci(cfg)
    tokens = grid * grid + 1
    x = rng.standard_normal((tokens, heads * head_dim)).astype(np.float32)
    ref, _ = vision_apply_rotary_emb(torch.from_numpy(x).reshape(1, tokens, heads, head_dim),
                                     torch.zeros(1, tokens, heads, head_dim), freqs)
    idx = np.arange(grid * grid)
    pos_x = np.append(idx % grid + 1, 0).astype(np.int32)
    pos_y = np.append(idx // grid + 1, 0).astype(np.int32)
    y = ops.rope_2d(x, pos_x, pos_y, vision_inv_freq(head_dim), heads, device=device)
    np.testing.assert_allclose(y, ref.reshape(tokens, -1).numpy(), rtol=0, atol=1e-6 * np.abs(x).max())


@pytest.mark.parametrize("device", DEVICES)
def test_rope_2d_many_tokens(device, rng):
    tokens = (1 << 20) + 3
    x = rng.standard_normal((tokens, 4)).astype(np.float32)
    pos_x = rng.integers(0, 1000, tokens).astype(np.int32)
    pos_y = rng.integers(0, 1000, tokens).astype(np.int32)
    inv_freq = vision_inv_freq(4)
    y = ops.rope_2d(x, pos_x, pos_y, inv_freq, 1, device=device)
    np.testing.assert_allclose(y, rope_2d_ref(x, 1, 4, pos_x, pos_y, inv_freq), rtol=0, atol=6e-7 * np.abs(x).max())


# ---- attention_dense ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "seqs, length, heads, head_dim, pad",
    [(1, 1, 1, 8, 0), (2, 5, 3, 16, 0), (3, 17, 2, 88, 4), (1, 577, 4, 88, 0), (2, 33, 2, 13, 3), (1, 40, 1, 128, 0),
     (2, 19, 2, 200, 1), (1, 65, 1, 256, 0), (1, 9, 2, 1, 0)])
@pytest.mark.parametrize("peaked", [False, True])
def test_attention_dense(device, seqs, length, heads, head_dim, pad, peaked, rng):
    rows, ld = seqs * length, heads * head_dim + pad
    q, k, v = (rng.standard_normal((rows, ld)).astype(np.float32) for _ in range(3))
    if peaked:  # large scores: the softmax's running max must follow them
        q *= 12
    scale = 1 / math.sqrt(head_dim)
    out = ops.attention_dense(q, k, v, seqs, heads, head_dim, scale, device=device)
    ref, scores = attention_dense_ref(q, k, v, seqs, heads, head_dim, scale)
    assert out.shape == (rows, heads * head_dim) and np.all(np.isfinite(out))
    # float32 scores carry ~head_dim * 2^-24 * |q| |k| error, which exp turns into relative error.
    assert rel_err(out, ref) < 5e-7 * (1 + np.abs(scores).max())


@pytest.mark.parametrize("device", DEVICES)
def test_attention_dense_sequences_are_independent(device, rng):
    """A sequence's rows attend to their own sequence only: the same rows alone give the same output."""
    seqs, length, heads, head_dim = 3, 21, 2, 88
    q, k, v = (rng.standard_normal((seqs * length, heads * head_dim)).astype(np.float32) for _ in range(3))
    out = ops.attention_dense(q, k, v, seqs, heads, head_dim, 0.1, device=device)
    rows = slice(length, 2 * length)
    alone = ops.attention_dense(q[rows], k[rows], v[rows], 1, heads, head_dim, 0.1, device=device)
    np.testing.assert_array_equal(out[rows], alone)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seqs, length, heads", [(1, 0, 2), ((1 << 19) + 1, 1, 2)])
def test_attention_dense_empty_and_many_sequences(device, seqs, length, heads, rng):
    """No rows; and more (sequence, head, query tile) items than one launch's blocks."""
    head_dim = 4
    q, k, v = (rng.standard_normal((seqs * length, heads * head_dim)).astype(np.float32) for _ in range(3))
    out = ops.attention_dense(q, k, v, seqs, heads, head_dim, 0.5, device=device)
    assert out.shape == (seqs * length, heads * head_dim)
    np.testing.assert_array_equal(out, v)  # one key per sequence: its value


# ---- unfold_patches -----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tiles, channels, size, patch", [(1, 1, 4, 2), (3, 3, 28, 14), (2, 3, 15, 5), (1, 2, 7, 7),
                                                          (3, 2, 6, 1), (0, 3, 8, 4), (1100, 1, 16, 2)])
def test_unfold_patches(device, tiles, channels, size, patch, rng):
    pixels = rng.standard_normal((tiles, channels, size, size)).astype(np.float32)
    out = ops.unfold_patches(pixels, patch, device=device)
    np.testing.assert_array_equal(out, unfold_ref(pixels, patch))
    if tiles:  # torch.nn.Unfold(kernel_size=patch, stride=patch), as Llama 4's patch embedding
        t = torch.nn.functional.unfold(torch.from_numpy(pixels), patch, stride=patch)  # [tiles, c * p^2, grid^2]
        np.testing.assert_array_equal(out, t.transpose(1, 2).reshape(out.shape).numpy())


# ---- pixel_shuffle ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tiles, grid, s, extra, dim", [(1, 4, 2, 0, 5), (3, 6, 2, 1, 7), (1, 6, 3, 1, 4), (3, 9, 3, 0, 2),
                                                        (2, 3, 3, 2, 3), (2, 5, 1, 1, 3), (4200, 8, 2, 0, 2)])
def test_pixel_shuffle(device, tiles, grid, s, extra, dim, rng):
    tile_rows = grid * grid + extra  # extra rows (a class token) follow each tile's patches
    x = rng.standard_normal((tiles * tile_rows, dim)).astype(np.float32)
    out = ops.pixel_shuffle(x, tiles, grid, s, device=device)
    np.testing.assert_array_equal(out, pixel_shuffle_ref(x, tiles, grid, s))


@pytest.mark.parametrize("device", DEVICES)
def test_pixel_shuffle_matches_transformers(device, rng):
    """Llama 4's pixel_shuffle (transformers, shuffle ratio 0.5) on each tile's patch rows."""
    from transformers.models.llama4.modeling_llama4 import pixel_shuffle

    tiles, grid, dim = 3, 8, 6
    x = rng.standard_normal((tiles * grid * grid, dim)).astype(np.float32)
    ref = pixel_shuffle(torch.from_numpy(x).reshape(tiles, grid * grid, dim), 0.5)
    out = ops.pixel_shuffle(x, tiles, grid, 2, device=device)
    np.testing.assert_array_equal(out, ref.reshape(out.shape).numpy())


# ---- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise(device):
    with pytest.raises(_core.ShapeError, match="multiple of"):
        ops.unfold_patches(np.zeros((1, 1, 6, 6), np.float32), 4, device=device)
    with pytest.raises(_core.ShapeError, match="cannot fold"):
        ops.pixel_shuffle(np.zeros((16, 2), np.float32), 1, 4, 3, device=device)
    with pytest.raises(_core.DTypeError):  # bfloat16 weights travel as uint16 bits
        ops.layer_norm(np.zeros((2, 4), np.float32), np.zeros(4, np.float32), None, 1e-5, w_dtype="bfloat16",
                       device=device)


@pytest.mark.cuda
def test_attention_dense_head_dim_limit_on_cuda():
    q = np.zeros((2, 264), np.float32)
    with pytest.raises(_core.NotSupportedError, match="head_dim 264"):
        ops.attention_dense(q, q, q, 1, 1, 264, 1.0, device="cuda")
