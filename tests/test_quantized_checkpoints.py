"""Quantized checkpoints as published (compressed-tensors FP8 / int4 / int8, fbgemm_fp8), loaded as
they are, against compressed-tensors' own decompression and transformers on the dequantized weights.

Fixtures are built offline by quant_fixtures (compressed-tensors' own compressors). Bounds:
- weights: Corral's packed weights, unpacked, equal compressed-tensors' decompression in float32
  bit for bit (every module, every format);
- logits with float32 activations and KV cache (dtype="float32", kv_cache_dtype="float32"): the
  reference applies the same activation quantization as Corral (fp8 formats: the checkpoint's
  dynamic per-token fp8 rounding; integer weights: the products' documented per-block quantization,
  kernels/linear.h), so what remains is float32 summation order: median relative error per position
  <= 1e-4, and at most one position in 20 above 1e-3 (a near-tie of the top-1 router may pick
  another expert after a rounding difference: a whole token then differs). Integer weights multiply
  8-bit activation codes, which flip on last-bit differences of their inputs (1/127 of a block's
  max each): the reference itself moves by a median of about 1.5e-2 between float32 and float64
  arithmetic on the tiny models. There Corral is compared with the float64 reference and must stay
  within the float32 reference's own distance from it (median within 1.5x, 90th percentile within
  2x); a wrong scale, offset or code order gives far more, and the kernels are checked tightly in
  test_quantized_kernels.py;
- logits with the default bf16 activations and bf16 KV cache: within 4e-2 (median), the bf16
  noise floor of the tiny models (test_model.py).
"""

import json

import numpy as np
import pytest
import torch

import corral
import quant_fixtures as qf
from corral import _core
from checkpoint_files import edit_safetensors, read_config, write_config

ops = _core.ops
PROMPT = np.random.default_rng(7).integers(3, 380, size=40).tolist()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """fmt (and variant) -> checkpoint folder, built once per module."""
    root = tmp_path_factory.mktemp("quantized")
    cache = {}

    def get(fmt, variant="scout", **kw):
        key = (fmt, variant, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = qf.build_quantized(fmt, root / f"{fmt}-{variant}-{len(cache)}", variant=variant, **kw)
        return cache[key]

    return get


def int_activations(bits):
    """Corral's integer products' activation quantization (kernels/linear.h), per token and block
    of 32: scale max|x| / (2^(bits-1) - 1), codes round-half-even(x * (1 / scale)), in float32."""
    qmax = float(2 ** (bits - 1) - 1)

    def f(x):
        k = x.shape[-1]
        xp = torch.nn.functional.pad(x, (0, -k % 32)).unflatten(-1, (-1, 32))
        amax = xp.abs().amax(-1, keepdim=True)
        d = amax / qmax
        inv = torch.where(amax > 0, 1 / torch.where(amax > 0, d, torch.ones_like(d)), torch.zeros_like(d))
        return (torch.round(xp * inv) * d).flatten(-2)[..., :k]

    return f


def eight_bit(fmt):
    """Whether Corral's products of this fixture take 8-bit activation codes (integer weights)."""
    return fmt.startswith("int") and "actorder" not in fmt


def reference_logits(path, fmt, dtype=torch.float32):
    act_fn = int_activations(8) if eight_bit(fmt) else None
    model = qf.reference_model(path, act_quant=True, act_fn=act_fn).to(dtype)
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits[0].double().numpy()


def assert_matches_fixture(got, path, fmt):
    if eight_bit(fmt):
        assert_matches(got, reference_logits(path, fmt, torch.float64), True, reference_logits(path, fmt))
    else:
        assert_matches(got, reference_logits(path, fmt), False)


def per_position_error(got, ref):
    return np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)


def assert_matches(got, ref, eight_bit_activations, ref32=None):
    """The bounds of the module docstring on per-position relative errors. With 8-bit activation
    codes `ref` is the float64 reference and ref32 the same in float32: Corral must stay within
    the float32 reference's own spread."""
    err = per_position_error(got, ref)
    if eight_bit_activations:
        spread = per_position_error(ref32, ref)
        assert np.median(err) <= 1.5 * np.median(spread) + 2e-4, (np.median(err), np.median(spread))
        assert np.quantile(err, 0.9) <= 2 * np.quantile(spread, 0.9) + 1e-3, (np.sort(err)[-4:], np.sort(spread)[-4:])
        return
    assert np.median(err) <= 1e-4 and np.sum(err > 1e-3) <= len(err) // 20, (np.median(err), np.sort(err)[-3:])


def expert_slices(name, w):
    """fbgemm_fp8's fused experts: (module, expert, col0, width) of a per-expert reference name."""
    base, e, proj = name.rsplit(".", 2)
    I = w.shape[0] if proj != "down_proj" else w.shape[1]
    if proj == "down_proj":
        return base + ".down_proj", int(e), 0, w.shape[0]
    return base + ".gate_up_proj", int(e), 0 if proj == "gate_proj" else I, 2 * I


@pytest.mark.parametrize("fmt", qf.FORMATS)
def test_weights_equal_compressed_tensors_decompression(built, fmt):
    path = built(fmt)
    ref = qf.dequantized_reference(path)
    assert ref
    for name, w in ref.items():
        out, k = w.shape
        if fmt == "fbgemm-fp8" and ".experts." in name:
            module, e, col0, width = expert_slices(name, w)
            got, info = ops.load_quantized_linear(str(path), module, out, k, e, col0, width)
        else:
            got, info = ops.load_quantized_linear(str(path), name, out, k)
        np.testing.assert_array_equal(got, w, err_msg=name)
    # What the packed form keeps: codes as stored, except activation-order groups (decoded).
    expected = "float32" if "actorder" in fmt else fmt[:4] if fmt.startswith("int") else "float8_e4m3"
    assert info["dtype"] == expected


@pytest.mark.parametrize("fmt", qf.FORMATS)
def test_logits_match_transformers(built, fmt):
    path = built(fmt)
    llm = corral.LLM(path, dtype="float32", kv_cache_dtype="float32")
    assert_matches_fixture(llm.logits(PROMPT), path, fmt)
    ref = reference_logits(path, fmt)
    method = read_config(path)["quantization_config"]["quant_method"]
    assert llm.stats()["weight_format"].startswith(method)
    # Default precision: bf16 activations for the 16-bit modules, bf16 KV cache.
    err = per_position_error(corral.LLM(path).logits(PROMPT), ref)
    assert np.median(err) <= 4e-2, np.median(err)


@pytest.mark.parametrize("fmt", ["int4-group-sym", "int8-group-asym", "fp8-block", "fbgemm-fp8"])
def test_batch_invariance(built, fmt):
    """A prompt's logits alone equal, bit for bit, its logits inside a batch."""
    llm = corral.LLM(built(fmt))
    rng = np.random.default_rng(3)
    others = [rng.integers(3, 380, size=n).tolist() for n in (5, 70, 1)]
    alone = llm.logits(PROMPT)
    batch = llm.logits([others[0], PROMPT, others[1], others[2]])
    np.testing.assert_array_equal(batch[1], alone)


@pytest.mark.parametrize("fmt,variant,group", [("int4-group-sym", "maverick", 16), ("int8-channel-sym", "chunked", 32),
                                               ("fp8-block", "maverick", 32)])
def test_other_shapes_and_group_sizes(built, fmt, variant, group):
    """Dense MLP layers, 128 experts, chunked attention; a group of 16 (not a multiple of Corral's
    32-k block: decoded to float32 at load, exactly)."""
    path = built(fmt, variant, group_size=group)
    decoded = group % 32 != 0  # held as float32 weights: float32 activations
    got = corral.LLM(path, dtype="float32", kv_cache_dtype="float32").logits(PROMPT)
    assert_matches_fixture(got, path, "int4-group-actorder" if decoded else fmt)


def test_multimodal_layout(built):
    path = built("int4-group-sym", multimodal=True)
    assert_matches_fixture(corral.LLM(path, dtype="float32", kv_cache_dtype="float32").logits(PROMPT), path,
                           "int4-group-sym")


def copy_of(built, fmt, tmp_path):
    import shutil

    dst = tmp_path / fmt
    shutil.copytree(built(fmt), dst)
    return dst


def test_missing_companion_tensor_is_named(built, tmp_path):
    path = copy_of(built, "int4-group-sym", tmp_path)
    name = "model.layers.1.feed_forward.shared_expert.up_proj.weight_scale"
    edit_safetensors(path / "model.safetensors", lambda t: t.pop(name))
    with pytest.raises(corral.MissingTensorError, match=name.replace(".", r"\.")):
        corral.LLM(path)


def test_misshaped_companion_tensor_is_named(built, tmp_path):
    path = copy_of(built, "int4-group-asym", tmp_path)
    name = "model.layers.0.feed_forward.experts.2.down_proj.weight_zero_point"

    def edit(t):
        z = t[name]
        t[name] = type(z).from_array(np.zeros((z.shape[0] + 1, z.shape[1]), np.int32))

    edit_safetensors(path / "model.safetensors", edit)
    with pytest.raises(corral.ShapeError, match=name.replace(".", r"\.")):
        corral.LLM(path)


def test_fp8_weights_without_quantization_config_say_so(built, tmp_path):
    path = copy_of(built, "fp8-channel-dynamic", tmp_path)
    cfg = read_config(path)
    del cfg["quantization_config"]
    write_config(path, cfg)
    with pytest.raises(corral.DTypeError, match="quantization_config"):
        corral.LLM(path)


@pytest.mark.parametrize("edit,match", [
    (lambda q: q.update(quant_method="awq"), "quant_method.*awq"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=3), "num_bits 3"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="tensor_group"), "strategy.*tensor_group"),
    (lambda q: q.update(format="nvfp4-pack-quantized") or q["config_groups"]["group_0"].pop("format"), "nvfp4"),
])
def test_unsupported_quantization_config_is_named(built, tmp_path, edit, match):
    path = copy_of(built, "int4-group-sym", tmp_path)
    cfg = read_config(path)
    edit(cfg["quantization_config"])
    write_config(path, cfg)
    with pytest.raises(corral.ConfigError, match=match):
        corral.LLM(path)


def test_progress_bar_names_the_format(built):
    from corral import cli

    assert cli.weights_format(built("int4-group-sym"), None) == "compressed-tensors int4 group 32"
    assert cli.weights_format(built("fp8-block"), None) == "compressed-tensors fp8 block"


def test_quantization_at_load_is_refused_for_quantized_checkpoints(built):
    with pytest.raises(corral.InvalidInputError, match="already quantized"):
        corral.LLM(built("fp8-tensor"), quantization="int4")
