"""Quantized weights on a GPU: CUDA's linear, swiglu_mlp and moe on the CPU's packed int8 / int4 /
fp8 matrices against the CPU's ops on the same packed bytes, and whole quantized models with
device="cuda" against device="cpu". Every test here needs a usable CUDA device; without one they
are skipped (conftest), never passed.

Both backends compute the same thing by contract (kernels/linear.h): integer weights multiply
activations quantized per token and per block of 32 k to int8 with one rule (scale max|x| / 127,
codes rounded to nearest even in float32), so each block's dot product is the same exact integer;
fp8 weights multiply the same float32 (or fp8-rounded) activations. What may differ is the order in
which float32 sums those block (or per-k) terms: CUDA splits k over 4 to 16 lanes per column and
adds their sums at the end. For one product that bounds the difference by a few float32 ulps of the
terms' magnitude, far below 1e-5 * max|y| for these sizes (the host emulation of the kernels
measured at most 2e-7). A product that reads another product's output (the MLP's down projection,
the experts') may see an activation code one apart where a float difference moves x * (1 / scale)
across a rounding boundary (one code is 1/127 of its block's max|x|, times one weight), hence 1e-4
there. Such a flip needs x * (1 / scale) within a float32 rounding error of a half-integer, so in
whole models it is rare but, where it happens, worth about 1e-3 of a position's logits (an element
of the tiny models' 64..80-wide rows moved by max|x| / 127): per position (relative L2 error) the
median within 1e-4, at most one position in ten above 1e-3, none above 3e-2, and equal greedy
tokens. These bounds are reasoned, not yet measured on a GPU.
"""

import numpy as np
import pytest
import torch

import corral
import quant_fixtures as qf
import tiny_models
from corral import _core
from without_cublaslt import rerun_without_cublaslt

ops = _core.ops
pytestmark = pytest.mark.cuda

FORMATS = ["int8", "int4", "int8-zp", "int4-zp", "fp8-row", "fp8-group", "fp8-row-act"]


def quantized_rows(rng, fmt, out, k):
    """(codes, scales, zero_points, dtype, group, scale_dtype, act_group) of one [out, k] matrix:
    int8 / int4 from the load-time quantizer, the others random codes in the checkpoints' formats."""
    if fmt in ("int8", "int4"):
        w = (rng.standard_normal((out, k)) / np.sqrt(k)).astype(np.float32)
        st = "bfloat16" if fmt == "int4" else "float32"
        codes, scales, group = ops.quantize_weights(w, fmt, 32, st)
        return codes, scales, None, fmt, group, st, 0
    if fmt.startswith("fp8"):
        group = 128 if fmt == "fp8-group" else k
        bits = rng.integers(0, 256, size=(out, k), dtype=np.int64)
        bits = np.where((bits & 0x78) == 0x78, bits & 0xB7, bits)  # finite codes below 256
        codes = bits.astype(np.uint8).view(np.int8)
        st = "bfloat16" if fmt == "fp8-group" else "float32"
        act = {"fp8-group": 128, "fp8-row-act": k}.get(fmt, 0)
    else:
        group = 64 if fmt == "int4-zp" else 32
        lo, hi = (-8, 8) if fmt == "int4-zp" else (-127, 128)
        codes = rng.integers(lo, hi, size=(out, k), dtype=np.int8)
        st, act = ("bfloat16" if fmt == "int8-zp" else "float32"), 0
    groups = -(-k // group)
    scales = (rng.uniform(0.5, 1.5, size=(out, groups)) / 64 / np.sqrt(k)).astype(np.float32)
    if st == "bfloat16":
        scales = torch.from_numpy(scales).bfloat16().float().numpy()  # exact in the stored dtype
    zp = None
    if not fmt.startswith("fp8"):
        zlo, zhi = (-8, 8) if fmt == "int4-zp" else (-20, 21)
        zp = rng.integers(zlo, zhi, size=(out, groups), dtype=np.int8)
    dtype = "float8_e4m3" if fmt.startswith("fp8") else "int4" if fmt.startswith("int4") else "int8"
    return codes, scales, zp, dtype, group, st, act


def packed(rng, fmt, out, k, glu=False):
    c, s, z, dtype, group, st, act = quantized_rows(rng, fmt, out, k)
    up = quantized_rows(rng, fmt, out, k)[:3] if glu else None
    return ops.pack_quantized(c, s, z, dtype, group, st, act, up)


def close(got, ref, tol):
    return np.max(np.abs(got - ref)) <= tol * np.max(np.abs(ref)) + 1e-30


# fp8 products with a scale per output and activations rounded per token ("fp8-row-act", the
# published Llama 4 FP8 checkpoints' scheme) run on fp8 tensor cores from 64 rows on where cuBLASLt
# can (cuda_fp8_tensor_products): the same rounded values, but the tensor cores add the exact
# products in a narrower accumulator between cuBLASLt's float32 promotions (about 2^-13 of a
# partial sum each time), so those results are held to 2e-3 of max|y|.
TENSOR_TOL = 2e-3


def tol_for(tol, *products):
    """tol, or TENSOR_TOL where one of the (rows, in, out) products runs on fp8 tensor cores."""
    return TENSOR_TOL if any(_core.cuda_fp8_tensor_products(*p) for p in products) else tol


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n_in, n_out", [(72, 200), (37, 29), (256, 64), (5120, 8)])
@pytest.mark.parametrize("rows", [1, 7, 64, 65, 300])
def test_linear_quantized_cuda(fmt, rows, n_in, n_out, rng):
    """CUDA's quantized linear equals the CPU's on the same packed matrix up to float32 order:
    decode (1 row), a row tile's edge (64, 65), many tiles; k not a multiple of the group, out not
    a multiple of the panel."""
    p = packed(rng, fmt, n_out, n_in)
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    cpu = ops.linear_packed(x, p, device="cpu")
    gpu = ops.linear_packed(x, p, device="cuda")
    tol = tol_for(1e-5, (rows, n_in, n_out)) if fmt == "fp8-row-act" else 1e-5
    assert gpu.shape == cpu.shape and close(gpu, cpu, tol)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 7, 70])
def test_swiglu_quantized_cuda(fmt, rows, rng):
    """gate and up PackedGlu (SwiGLU in the product's epilogue), then down: as the CPU."""
    hidden, inter = 128, 96
    gu, dn = packed(rng, fmt, inter, hidden, glu=True), packed(rng, fmt, hidden, inter)
    x = rng.standard_normal((rows, hidden)).astype(np.float32)
    cpu = ops.swiglu_packed(x, gu, dn, device="cpu")
    tol = tol_for(1e-4, (rows, hidden, 2 * inter), (rows, inter, hidden)) if fmt == "fp8-row-act" else 1e-4
    assert close(ops.swiglu_packed(x, gu, dn, device="cuda"), cpu, tol)


@pytest.mark.parametrize("rows", [64, 300])
def test_fp8_prefill_on_tensor_cores_cuda(rows, rng):
    """Prefill of Llama 4's FP8 scheme (fbgemm_fp8: per-output weight scales, per-token activations)
    on a shared expert's shape runs on fp8 tensor cores when cuBLASLt 12.9+ is loaded on a Hopper
    (or newer) GPU, and equals the CPU's within TENSOR_TOL; elsewhere on Corral's kernels (1e-4)."""
    hidden, inter = 1024, 512
    from cuda.bindings import runtime

    major = runtime.cudaDeviceGetAttribute(runtime.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, 0)[1]
    blas = _core.cuda_blas_status()
    version = int(blas.split()[1]) if blas.startswith("cuBLASLt ") else 0
    on_tensor = _core.cuda_fp8_tensor_products(rows, hidden, 2 * inter)
    if version >= 120900 and major >= 9:
        assert on_tensor and _core.cuda_fp8_tensor_products(rows, inter, hidden), (blas, major)
    gu, dn = packed(rng, "fp8-row-act", inter, hidden, glu=True), packed(rng, "fp8-row-act", hidden, inter)
    x = rng.standard_normal((rows, hidden)).astype(np.float32)
    cpu = ops.swiglu_packed(x, gu, dn, device="cpu")
    assert close(ops.swiglu_packed(x, gu, dn, device="cuda"), cpu, TENSOR_TOL if on_tensor else 1e-4)


def test_quantized_products_without_cublaslt_cuda():
    """This file's product tests again in a process where cuBLASLt is switched off: fp8 prefill on
    Corral's own kernels, at their tighter bounds."""
    rerun_without_cublaslt(__file__, "-k", "linear_quantized or swiglu_quantized or moe_quantized or tensor_cores")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tokens", [1, 6, 90])
def test_moe_quantized_cuda(fmt, tokens, rng):
    """Quantized experts (and shared expert) through CUDA's routing and grouped quantized
    products: the CPU's output and per-expert token counts."""
    E, H, I, top_k = 4, 128, 96, 2
    router = (rng.standard_normal((E, H)) / np.sqrt(H)).astype(np.float32)
    gate_up = [packed(rng, fmt, I, H, glu=True) for _ in range(E)]
    down = [packed(rng, fmt, H, I) for _ in range(E)]
    moe = ops.pack_moe_quantized(router, gate_up, down, packed(rng, fmt, I, H, glu=True), packed(rng, fmt, H, I))
    x = rng.standard_normal((tokens, H)).astype(np.float32)
    out_cpu, counts_cpu = ops.moe_packed(x, moe, top_k, device="cpu")
    out_gpu, counts_gpu = ops.moe_packed(x, moe, top_k, device="cuda")
    assert counts_gpu.tolist() == counts_cpu.tolist()
    # The shared expert is a dense SwiGLU MLP over every token (fp8 tensor cores from 64 on).
    tol = tol_for(1e-4, (tokens, H, 2 * I), (tokens, I, H)) if fmt == "fp8-row-act" else 1e-4
    assert close(out_gpu, out_cpu, tol)


def test_quantized_refusals_cuda(rng):
    """A GLU pair is not a plain product's matrix on CUDA either: a clear error, no crash."""
    gu = packed(rng, "int8", 64, 64, glu=True)
    with pytest.raises(corral.NotSupportedError, match="linear"):
        ops.linear_packed(np.zeros((1, 64), np.float32), gu, device="cuda")


def model_pair(path, **kw):
    return (corral.LLM(path, device="cpu", kv_cache_dtype="float32", **kw),
            corral.LLM(path, device="cuda", kv_cache_dtype="float32", **kw))


def assert_same_model(cpu, gpu):
    ids = np.random.default_rng(5).integers(3, 380, size=24).tolist()
    assert gpu.stats()["weight_format"] == cpu.stats()["weight_format"]
    got, ref = gpu.logits(ids), cpu.logits(ids)
    err = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert np.median(err) <= 1e-4 and np.sum(err > 1e-3) <= len(err) // 10 and err.max() <= 3e-2, np.sort(err)[-3:]
    params = corral.SamplingParams(max_tokens=16, ignore_eos=True)
    assert gpu.generate([ids], params)[0].outputs[0].token_ids == cpu.generate([ids], params)[0].outputs[0].token_ids


@pytest.mark.parametrize("fmt", qf.FORMATS)
def test_quantized_checkpoint_cuda(fmt, tmp_path):
    """Every published quantized format (tests/quant_fixtures.py) on the GPU: the CPU's logits and
    greedy tokens."""
    assert_same_model(*model_pair(qf.build_quantized(fmt, tmp_path / fmt)))


@pytest.mark.parametrize("variant", ["scout", "maverick", "chunked"])
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantization_at_load_cuda(variant, quantization, tmp_path):
    """quantization="int8" / "int4" of a bf16 checkpoint (attention, MLPs, experts, lm_head) on
    the GPU: the CPU's logits and greedy tokens."""
    path = tiny_models.build(variant, "causal", torch.bfloat16, tmp_path / variant)
    assert_same_model(*model_pair(path, quantization=quantization))
