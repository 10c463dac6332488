"""Kernels with a CUDA implementation, checked by one test body on every device.

CUDA cases carry the `cuda` marker: they run on a GPU machine (tools/gpu_check.sh) and are
reported as skipped elsewhere."""

import numpy as np
import pytest

from corral import _core
from numerics import FLOAT_DTYPES, from_bits, rounded

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
