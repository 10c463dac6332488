"""Quantization at load (LLM(path, quantization="int8" | "int4")) of 16-bit checkpoints.

Reference: transformers in float32 on the weights Corral's quantizer produced (ops.quantize_weights,
dequantized), with the integer products' documented activation quantization applied at the same
places (8-bit codes per token and block of 32; kernels/linear.h). Corral runs with float32
activations and KV cache, so what remains is float32 summation order: the bounds of
test_quantized_checkpoints.py (held to the spread of the 8-bit activation codes). The quantizer's own accuracy is tested in
test_quantized_kernels.py (weight error vs plain rounding and the doc's figures).
"""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

import corral
import quant_fixtures as qf
import tiny_models
from corral import _core
from test_quantized_checkpoints import assert_matches, int_activations

ops = _core.ops
PROMPT = np.random.default_rng(11).integers(3, 380, size=40).tolist()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    return {v: tiny_models.build(v, "causal", torch.bfloat16, root / v) for v in ("scout", "maverick", "chunked")}


def quantized(w, mode, dtype=torch.float32):
    """w [out, in] as Corral holds it at load (dequantized), and the activation bits its product uses."""
    codes, scales, group = ops.quantize_weights(w.float().numpy(), mode, 32, "bfloat16" if mode == "int4" else "float32")
    k = w.shape[1]
    s = np.repeat(scales, group, axis=1)[:, :k]
    return torch.from_numpy(codes.astype(np.float64) * s).to(dtype), 8


def reference(path, quantization, dtype=torch.float32):
    """transformers on Corral's load-time quantization of the checkpoint at path, in dtype."""
    model = tiny_models.load_reference(path, "causal").to(dtype)
    mlp = "int4" if quantization == "int4" else "int8"
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not name.endswith("router"):
            mode = mlp if "feed_forward" in name else "int8"  # attention and lm_head: int8
            w, bits = quantized(mod.weight.data, mode, dtype)
            mod.weight.data = w
            mod.register_forward_pre_hook(lambda _m, a, f=int_activations(bits): (f(a[0]),) + tuple(a[1:]))
        elif isinstance(mod, Llama4TextExperts):
            E, H, I2 = mod.gate_up_proj.shape
            for e in range(E):
                mod.gate_up_proj.data[e] = quantized(mod.gate_up_proj.data[e].T, mlp, dtype)[0].T
                mod.down_proj.data[e] = quantized(mod.down_proj.data[e].T, mlp, dtype)[0].T
            mod.__class__ = qf._FakeQuantExperts
            mod.act_quant = int_activations(8)
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits[0].double().numpy()


@pytest.mark.parametrize("variant", ["scout", "maverick", "chunked"])
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_logits_match_transformers(checkpoints, variant, quantization):
    path = checkpoints[variant]
    llm = corral.LLM(path, quantization=quantization, dtype="float32", kv_cache_dtype="float32")
    got = llm.logits(PROMPT)
    assert_matches(got, reference(path, quantization, torch.float64), True, reference(path, quantization))


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_batch_invariance(checkpoints, quantization):
    llm = corral.LLM(checkpoints["maverick"], quantization=quantization)
    rng = np.random.default_rng(5)
    others = [rng.integers(3, 380, size=n).tolist() for n in (9, 64, 1)]
    alone = llm.logits(PROMPT)
    batch = llm.logits([others[0], others[1], PROMPT, others[2]])
    np.testing.assert_array_equal(batch[2], alone)


def test_weight_bytes(checkpoints):
    """weight_bytes counts what is held: int8 about half of bf16's matrices (k a multiple of 32 in
    scout: no padding), int4 less again."""
    path = checkpoints["scout"]
    cfg = json.loads((path / "config.json").read_text())
    embed = cfg["vocab_size"] * cfg["hidden_size"] * 2
    bf16, int8, int4 = (corral.LLM(path, quantization=q).stats() for q in (None, "int8", "int4"))
    assert bf16["weight_format"] == "bfloat16" and int4["weight_format"].startswith("int4")
    matrices = bf16["weight_bytes"] - embed
    assert 0.45 < (int8["weight_bytes"] - embed) / matrices < 0.6
    assert int4["weight_bytes"] < int8["weight_bytes"]


def test_quantization_option_is_checked(checkpoints):
    with pytest.raises(corral.InvalidInputError, match="int3"):
        corral.LLM(checkpoints["scout"], quantization="int3")


STREAM_CHECK = textwrap.dedent("""
    import json, resource, sys
    import corral
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    llm = corral.LLM(sys.argv[1], quantization="int4", kv_cache_bytes=1 << 20)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(before=before, peak=peak, weights=llm.stats()["weight_bytes"])))
""")


def test_quantization_at_load_streams_layer_by_layer(tmp_path):
    """Peak memory while quantizing is the quantized model plus about one layer, not the 16-bit
    model: 8 layers of about 19 MB (bf16) quantize to about 5 MB each."""
    path = tiny_models.build("scout", "causal", torch.bfloat16, tmp_path / "m", hidden_size=512, intermediate_size=768,
                             num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                             num_local_experts=8)
    out = subprocess.run([sys.executable, "-c", STREAM_CHECK, str(path)], capture_output=True, text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    model_bytes = (path / "model.safetensors").stat().st_size
    layer_bytes = model_bytes / 8
    grown = m["peak"] - m["before"]
    assert grown < m["weights"] + 2 * layer_bytes + (32 << 20), (grown / 2**20, m["weights"] / 2**20, model_bytes / 2**20)
    assert grown < 0.6 * model_bytes, (grown / 2**20, model_bytes / 2**20)
