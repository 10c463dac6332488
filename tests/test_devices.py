"""Kernels with a CUDA implementation, checked by one test body on every device.

CUDA cases carry the `cuda` marker: they run on a GPU machine (tools/gpu_check.sh) and are
reported as skipped elsewhere."""

import numpy as np
import pytest

from corral import _core
from numerics import FLOAT_DTYPES, from_bits, rel_err, rounded

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
# float32 weights: float32 arithmetic (CUDA sums in other orders: 1e-4). bfloat16 weights: CUDA
# rounds the scaled inputs and hidden rows to bfloat16 for the tensor cores.
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
