"""linear and swiglu_mlp on every device against float64 numpy references.

Every test body runs on the CPU and, with the `cuda` marker, on a GPU (tools/gpu_check.sh). The
weights are rounded to their dtype first and the reference computed from the rounded values, and
from the activations as the product reads them: rounded to bfloat16 for bfloat16 weights with
activations="native", on CUDA also to float16 for float16 weights (kernels/linear.h); the tolerance
then measures float32 summation alone. On a GPU the 16-bit native products run on cuBLASLt where it
loads; test_without_cublaslt reruns this file's GPU cases on Corral's own kernels.
"""

import os

import numpy as np
import pytest

import corral
from corral import _core, cuda_libs
from numerics import FLOAT_DTYPES, from_bits, rel_err, rounded, to_bits
from without_cublaslt import rerun_without_cublaslt

ops = _core.ops
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
ACTIVATIONS = ["native", "float32"]


def read_dtype(device, dtype, activations):
    """What a product with `dtype` weights rounds its (float32) activations to on `device`."""
    native_16 = dtype == "bfloat16" or dtype == "float16" and device == "cuda"
    return dtype if activations == "native" and native_16 else "float32"


def read_as(a, read_dtype):
    """float64 values of activations `a` rounded to float32, then to read_dtype."""
    return from_bits(to_bits(np.asarray(a, np.float32), read_dtype), read_dtype)


def random_weights(rng, layout, n_in, n_out, dtype, width=None):
    """(bits for Corral, float64 [in, out] of the rounded weights). width: the matrix is the first
    n_in (out_in) or n_out (in_out) columns of a wider stored array of `width` columns."""
    shape = (n_out, width or n_in) if layout == "out_in" else (n_in, width or n_out)
    bits, w64 = rounded(rng.standard_normal(shape) / np.sqrt(n_in), dtype)
    w64 = w64[:, :n_in].T if layout == "out_in" else w64[:, :n_out]
    return bits, w64


# ---- linear --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activations", ACTIVATIONS)
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n_in, n_out", [(72, 200), (5120, 8), (37, 29)])
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_linear(device, dtype, layout, activations, rows, n_in, n_out, rng):
    """y = x . W within 1e-5 of max|y|: the GEMV (rows <= 8) and GEMM sizes, odd and tall shapes."""
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    bits, w64 = random_weights(rng, layout, n_in, n_out, dtype)
    y = ops.linear(x, bits, dtype, layout, activations, device=device)
    assert y.shape == (rows, n_out) and y.dtype == np.float32
    assert rel_err(y, read_as(x, read_dtype(device, dtype, activations)) @ w64) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("activations", ACTIVATIONS)
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_linear_strides_and_accumulate(device, dtype, layout, activations, accumulate, rows, rng):
    """W a slice of a wider matrix (ld > its width), x and y wider than in and out: y's columns
    [0, out) get x . W (added to their values with accumulate, else replaced, never read: they hold
    NaN then), the columns past out are untouched."""
    n_in, n_out = 72, 61
    bits, w64 = random_weights(rng, layout, n_in, n_out, dtype, width=(n_in if layout == "out_in" else n_out) + 9)
    x = rng.standard_normal((rows, n_in + 3)).astype(np.float32)
    y0 = rng.standard_normal((rows, n_out + 5)).astype(np.float32)
    if not accumulate:
        y0[:, :n_out] = np.nan
    width = n_in if layout == "out_in" else n_out
    y = ops.linear(x, bits, dtype, layout, activations, device=device, y=y0, accumulate=accumulate, width=width)
    ref = read_as(x[:, :n_in], read_dtype(device, dtype, activations)) @ w64
    if accumulate:
        ref = ref + y0[:, :n_out]
    assert y.shape == y0.shape
    assert rel_err(y[:, :n_out], ref) < 1e-5
    np.testing.assert_array_equal(y[:, n_out:], y0[:, n_out:])


@pytest.mark.parametrize("device", DEVICES)
def test_linear_no_rows(device):
    y = ops.linear(np.zeros((0, 5), np.float32), np.ones((4, 5), np.float32), device=device)
    assert y.shape == (0, 4)


@pytest.mark.cuda
def test_linear_packed_weights_not_supported_on_cuda(rng):
    """CUDA reads float weights unpacked: the CPU's packed float layout raises NotSupportedError
    (packed quantized matrices run: test_quantized_cuda.py)."""
    x = rng.standard_normal((3, 64)).astype(np.float32)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    with pytest.raises(corral.NotSupportedError, match="packed"):
        ops.linear_packed(x, ops.pack_linear(w), device="cuda")


# ---- swiglu_mlp ------------------------------------------------------------------------------------


def swiglu_ref(x, gate64, up64, down64, dtype):
    """((silu(x . gate) * (x . up)) . down in float64 (W as [in, out]), each product's input read
    as read_as(., dtype); and the bound that rounding the hidden rows to a 16-bit dtype adds where
    a float32 value within 1e-5 of the float64 one rounds to the neighbouring 16-bit value."""
    xr = read_as(x, dtype)
    g = xr @ gate64
    with np.errstate(over="ignore"):
        h = g / (1.0 + np.exp(-g)) * (xr @ up64)
    hr = read_as(h, dtype)
    slack = np.zeros_like(h)
    if dtype != "float32":
        slack = np.maximum(np.abs(read_as(h * (1 + 1e-5), dtype) - hr), np.abs(read_as(h * (1 - 1e-5), dtype) - hr))
    return hr @ down64, slack @ np.abs(down64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activations", ACTIVATIONS)
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("rows, hidden, inter", [(1, 40, 36), (7, 96, 130), (64, 72, 200), (300, 64, 48)])
def test_swiglu_mlp(device, dtype, layout, activations, rows, hidden, inter, rng):
    """out = (silu(x . gate) * (x . up)) . down (added to zeros) within 1e-5 of max|out| plus the
    hidden rows' rounding."""
    x = rng.standard_normal((rows, hidden)).astype(np.float32)
    (gb, g64), (ub, u64), (db, d64) = (
        random_weights(rng, layout, n_in, n_out, dtype) for n_in, n_out in [(hidden, inter), (hidden, inter), (inter, hidden)]
    )
    out = ops.swiglu_mlp(x, gb, ub, db, dtype, activations, device=device, layout=layout)
    ref, slack = swiglu_ref(x, g64, u64, d64, read_dtype(device, dtype, activations))
    assert out.shape == (rows, hidden) and out.dtype == np.float32
    excess = np.abs(out - ref) - (1e-5 * np.abs(ref).max() + slack)
    assert excess.max() <= 0, f"exceeds the bound by {excess.max():.3g}"


# ---- where cuBLASLt comes from ------------------------------------------------------------------


def test_point_to_pip_cublaslt(tmp_path, monkeypatch):
    """The nvidia-cublas package's library is found on sys.path and named in CORRAL_CUBLASLT_LIBRARY,
    unless the variable is set already."""
    lib = tmp_path / "nvidia" / "cu13" / "lib" / "libcublasLt.so.13"
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(cuda_libs.CUBLASLT_VARIABLE, raising=False)
    cuda_libs.point_to_pip_cublaslt()
    assert os.environ[cuda_libs.CUBLASLT_VARIABLE] == str(lib)
    monkeypatch.setenv(cuda_libs.CUBLASLT_VARIABLE, "/opt/mine/libcublasLt.so.13")
    cuda_libs.point_to_pip_cublaslt()
    assert os.environ[cuda_libs.CUBLASLT_VARIABLE] == "/opt/mine/libcublasLt.so.13"


@pytest.mark.cuda
def test_cublaslt_loads_from_pip():
    """With nvidia-cublas installed (as on the GPU machines), the products use its cuBLASLt."""
    status = _core.cuda_blas_status()
    lib = os.environ.get(cuda_libs.CUBLASLT_VARIABLE)
    if lib == "none":
        assert status == "cuBLASLt not loaded (CORRAL_CUBLASLT_LIBRARY=none)"
    elif lib and lib == cuda_libs.pip_cublaslt():
        assert status.startswith("cuBLASLt 13") and status.endswith(" from " + lib), status


@pytest.mark.cuda
def test_without_cublaslt():
    """This file's GPU cases again, in a process where cuBLASLt is switched off: Corral's own
    kernels (GEMV, tensor cores) serve the 16-bit native products there."""
    rerun_without_cublaslt(__file__, "-m", "cuda")
