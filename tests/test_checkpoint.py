"""Checkpoint loading: corral.LLM(path) on Hugging Face Llama 4 folders, valid and broken.

Valid folders (single file, sharded, the multimodal layout, every config spelling Corral accepts,
bf16/fp16 weights) must give the logits transformers gives on the same weights. Broken folders
must raise the documented corral error class, whose message names the file and the tensor or
config field at fault, and leave the process able to load models afterwards.

Base checkpoints are built once per session with transformers (seeded) and copied per test; the
copies are edited with the byte-level helpers of checkpoint_files.py.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import corral
from numerics import rel_err
from checkpoint_files import (
    DELETE,
    DTYPE_BYTES,
    REQUIRED_FIELDS,
    TEXT_KW,
    TOKENS,
    Tensor,
    build_causal,
    build_conditional,
    causal_like,
    copy_checkpoint,
    edit_safetensors,
    edit_tensor,
    edit_text_config,
    file_of,
    hf_logits,
    read_config,
    read_index,
    read_safetensors,
    safetensors_bytes,
    shard,
    tensor_files,
    text_section,
    write_config,
    write_index,
)

FP32_TOL = 1e-4
HALF_TOL = 2e-2

LAYOUTS = ("causal", "conditional")
# Prefix of the text model's tensors in each layout.
MODEL_PREFIX = {"causal": "model.", "conditional": "language_model.model."}
HEAD_PREFIX = {"causal": "", "conditional": "language_model."}
# Prefix of the text config's fields in error messages.
FIELD_PREFIX = {"causal": "", "conditional": "text_config."}


def load(path) -> corral.LLM:
    """Loads a checkpoint folder (a small KV cache: these tests run 12-token prompts)."""
    return corral.LLM(path, kv_cache_bytes=1 << 20)


def logits_of(path) -> np.ndarray:
    out = load(path).logits(TOKENS)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert out.shape == (len(TOKENS), TEXT_KW["vocab_size"])
    assert np.all(np.isfinite(out))
    return out


def expect_error(path, cls, *fragments, builtin=None) -> str:
    """Loading `path` raises `cls` (a CorralError, and `builtin` too when given) whose message
    contains every fragment. Returns the message."""
    with pytest.raises(cls) as info:
        load(path)
    err = info.value
    assert isinstance(err, corral.CorralError)
    if builtin is not None:
        assert isinstance(err, builtin), f"{type(err).__mro__} does not derive from {builtin}"
    msg = str(err)
    for f in fragments:
        assert str(f) in msg, f"{f!r} not in error message {msg!r}"
    return msg


# ----------------------------------------------------------------------------- session fixtures


@pytest.fixture(scope="session")
def causal(tmp_path_factory):
    """(folder, transformers model, reference logits) of the base Llama4ForCausalLM checkpoint."""
    model = build_causal(seed=0)
    path = tmp_path_factory.mktemp("causal")
    model.save_pretrained(path)
    assert [p.name for p in tensor_files(path)] == ["model.safetensors"]
    return path, model, hf_logits(model)


@pytest.fixture(scope="session")
def conditional(tmp_path_factory):
    """(folder, transformers model, reference logits) of the base Llama4ForConditionalGeneration checkpoint."""
    model = build_conditional(seed=0)
    path = tmp_path_factory.mktemp("conditional")
    model.save_pretrained(path)
    assert [p.name for p in tensor_files(path)] == ["model.safetensors"]
    return path, model, hf_logits(model)


@pytest.fixture(scope="session")
def base(causal, conditional):
    """layout -> (folder, reference logits)."""
    return {"causal": (causal[0], causal[2]), "conditional": (conditional[0], conditional[2])}


@pytest.fixture(scope="session")
def causal_sharded(causal, tmp_path_factory):
    """The base causal checkpoint split into 3 shards with an index."""
    path = copy_checkpoint(causal[0], tmp_path_factory.mktemp("sharded") / "ckpt")
    shard(path, 3)
    return path


@pytest.fixture
def clone(tmp_path):
    """clone(folder) -> a fresh copy of the folder for this test to edit."""
    count = [0]

    def make(src: Path) -> Path:
        count[0] += 1
        return copy_checkpoint(src, tmp_path / f"ckpt{count[0]}")

    return make


# ----------------------------------------------------------------------------- valid checkpoints


def test_causal_single_file_matches_transformers(causal):
    path, _, ref = causal
    llm = corral.LLM(path)  # default options, as a user would call it
    got = llm.logits(TOKENS)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert rel_err(got, ref) <= FP32_TOL
    cfg = llm.config
    assert cfg["multimodal"] is False
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["num_layers"]) == (64, 32, 4)
    assert [layer["moe"] for layer in cfg["layers"]] == [False, True, False, True]
    assert [layer["use_rope"] for layer in cfg["layers"]] == [True, True, True, False]


def test_causal_sharded_matches_single_file(causal, causal_sharded):
    path, _, ref = causal
    files = [p.name for p in tensor_files(causal_sharded)]
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert not (causal_sharded / "model.safetensors").exists()
    assert set(read_index(causal_sharded)["weight_map"].values()) == set(files)
    got = logits_of(causal_sharded)
    assert rel_err(got, ref) <= FP32_TOL
    np.testing.assert_array_equal(got, logits_of(path))


def test_conditional_layout_with_vision_tensors(conditional):
    path, _, ref = conditional
    tensors, _ = read_safetensors(path / "model.safetensors")
    assert any(n.startswith("vision_model.") for n in tensors)
    assert any(n.startswith("multi_modal_projector.") for n in tensors)
    assert "language_model.lm_head.weight" in tensors
    assert not any(n.startswith("model.") for n in tensors)
    llm = load(path)
    assert llm.config["multimodal"] is True
    assert rel_err(llm.logits(TOKENS), ref) <= FP32_TOL


def test_conditional_sharded(conditional, clone):
    path, _, ref = conditional
    ckpt = clone(path)
    shard(ckpt, 2)
    assert rel_err(logits_of(ckpt), ref) <= FP32_TOL


@pytest.mark.parametrize(
    "dtype",
    ["F64", "I64", "I32", "I16", "U8", "BOOL", "F8_E5M2", "F8_E4M3", "C64", "F8_E8M0", "F8_E4M3FNUZ",
     "F8_E5M2FNUZ", "F4"],
)
def test_vision_tensor_of_unsupported_dtype(conditional, clone, dtype):
    """A vision_model.* tensor of a dtype the vision encoder cannot run is refused, naming it; with
    max_images_per_prompt=0 the encoder is not loaded and the text model runs as before."""
    path, _, ref = conditional
    ckpt = clone(path)
    name = "vision_model.patch_embedding.linear.weight"

    def retype(t: Tensor) -> Tensor:
        n = int(np.prod(t.shape))
        nbytes = n // 2 if dtype == "F4" else n * DTYPE_BYTES[dtype]  # F4: two values a byte
        return Tensor(dtype, t.shape, bytes(range(256)) * (nbytes // 256) + bytes(nbytes % 256))

    edit_tensor(ckpt, name, retype)
    assert read_safetensors(ckpt / "model.safetensors")[0][name].dtype == dtype
    expect_error(ckpt, corral.DTypeError, name, "model.safetensors")
    text_only = corral.LLM(ckpt, kv_cache_bytes=1 << 20, max_images_per_prompt=0)
    assert rel_err(text_only.logits(TOKENS), ref) <= FP32_TOL


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_unaligned_data_section(causal, clone, dtype):
    """The format lets the header (padded with spaces) have any length, so tensor data need not be
    aligned; such a file loads and gives the same logits."""
    path, model, ref = causal
    ckpt = clone(path)
    tensors, meta = read_safetensors(ckpt / "model.safetensors")
    if dtype != "F32":
        for name, t in tensors.items():
            a = t.array()
            tensors[name] = Tensor.bf16(a) if dtype == "BF16" else Tensor.from_array(a.astype(np.float16))
        ref = hf_logits(causal_like({n: torch.from_numpy(t.array().astype(np.float32)) for n, t in tensors.items()}))
    (ckpt / "model.safetensors").write_bytes(safetensors_bytes(tensors, meta))
    aligned = corral.LLM(ckpt, kv_cache_bytes=1 << 20, kv_cache_dtype="float32").logits(TOKENS)
    (ckpt / "model.safetensors").write_bytes(safetensors_bytes(tensors, meta, extra_header_bytes=3))
    assert struct.unpack("<Q", (ckpt / "model.safetensors").read_bytes()[:8])[0] % 4 == 3
    got = corral.LLM(ckpt, kv_cache_bytes=1 << 20, kv_cache_dtype="float32").logits(TOKENS)
    np.testing.assert_array_equal(got, aligned)
    # bf16 weights multiply bf16-rounded activations: the file's bound for 16-bit weights.
    assert rel_err(got, ref) <= (FP32_TOL if dtype == "F32" else HALF_TOL)


def test_tied_word_embeddings_need_no_lm_head(causal, clone):
    path, model, _ = causal
    ckpt = clone(path)
    edit_text_config(ckpt, tie_word_embeddings=True)
    edit_tensor(ckpt, "lm_head.weight", lambda t: None)
    state = dict(model.state_dict())
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    ref = hf_logits(causal_like(state, tie_word_embeddings=True))
    assert rel_err(logits_of(ckpt), ref) <= FP32_TOL


def _meta_rope(ckpt: Path, type_key: str) -> dict:
    """Rewrites the config's RoPE settings in Meta's spelling: rope_scaling (without rope_theta)
    plus a top-level (text config) rope_theta, no rope_parameters."""
    cfg = read_config(ckpt)
    t = text_section(cfg)
    params = dict(t.pop("rope_parameters"))
    theta = params.pop("rope_theta")
    params[type_key] = params.pop("rope_type")
    t["rope_scaling"] = params
    t["rope_theta"] = theta
    write_config(ckpt, cfg)
    return cfg


@pytest.mark.parametrize("type_key", ["rope_type", "type"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_meta_rope_scaling_spelling(base, clone, layout, type_key):
    path, ref = base[layout]
    ckpt = clone(path)
    cfg = _meta_rope(ckpt, type_key)
    t = text_section(cfg)
    assert "rope_parameters" not in t and t["rope_theta"] == 10000.0 and t["rope_scaling"][type_key] == "llama3"
    got = logits_of(ckpt)
    # rope_theta only at the top level: a loader that missed it (default 500000) would be 6e-3 off.
    assert rel_err(got, ref) <= FP32_TOL
    assert rel_err(got, logits_of(path)) <= 1e-6


def test_rope_scaling_null_is_default_rope(causal, clone):
    path, model, llama3_ref = causal
    ckpt = clone(path)
    edit_text_config(ckpt, rope_parameters=DELETE, rope_scaling=None, rope_theta=10000.0)
    ref = hf_logits(
        causal_like(model.state_dict(), rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    )
    assert rel_err(ref, llama3_ref) > 1e-2  # the test can tell the two RoPEs apart
    assert rel_err(logits_of(ckpt), ref) <= FP32_TOL


def test_rope_parameters_default_type(causal, clone):
    """rope_parameters with rope_type "default" (transformers 5's spelling of plain RoPE)."""
    path, model, _ = causal
    ckpt = clone(path)
    edit_text_config(ckpt, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    ref = hf_logits(
        causal_like(model.state_dict(), rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    )
    assert rel_err(logits_of(ckpt), ref) <= FP32_TOL


@pytest.mark.parametrize("interval", [None, 2])
def test_empty_no_rope_layers_falls_back_to_default(causal, clone, interval):
    """no_rope_layers: [] means "derive it": a NoPE layer every no_rope_layer_interval (4) layers."""
    path, model, _ = causal
    ckpt = clone(path)
    changes = dict(no_rope_layers=[], layer_types=DELETE)
    changes["no_rope_layer_interval"] = DELETE if interval is None else interval
    edit_text_config(ckpt, **changes)
    every = interval or 4
    expected = [(i + 1) % every != 0 for i in range(4)]
    llm = load(ckpt)
    assert [layer["use_rope"] for layer in llm.config["layers"]] == expected
    ref = hf_logits(causal_like(model.state_dict(), no_rope_layers=[], no_rope_layer_interval=every))
    all_rope = hf_logits(causal_like(model.state_dict(), no_rope_layers=[1, 1, 1, 1]))
    assert rel_err(ref, all_rope) > 1e-2  # NoPE layers change the logits visibly
    assert rel_err(llm.logits(TOKENS), ref) <= FP32_TOL


@pytest.mark.parametrize("value, on", [(4, True), (True, True), (0, False), (False, False)])
def test_attn_temperature_tuning_truthy(causal, clone, value, on):
    """transformers treats any truthy attn_temperature_tuning as on (4.51-era files hold the int 4)."""
    path, model, ref_on = causal
    ckpt = clone(path)
    edit_text_config(ckpt, attn_temperature_tuning=value)
    llm = load(ckpt)
    assert [layer["temperature_tuning"] for layer in llm.config["layers"]] == [False, False, False, on]
    ref_off = hf_logits(causal_like(model.state_dict(), attn_temperature_tuning=False))
    assert rel_err(ref_on, ref_off) > 1e-3  # tuning changes the logits visibly
    got = llm.logits(TOKENS)
    assert rel_err(got, ref_on if on else ref_off) <= FP32_TOL


@pytest.mark.parametrize("dtype, stored", [("bfloat16", "BF16"), ("float16", "F16")])
def test_half_precision_weights(tmp_path, dtype, stored):
    """Weights saved in bf16/fp16 match transformers run in float32 on the same rounded weights."""
    model = build_causal(seed=1).to(getattr(torch, dtype))
    model.save_pretrained(tmp_path)
    tensors, _ = read_safetensors(tmp_path / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {stored}
    ref = hf_logits(causal_like(model.state_dict()))  # float32 model, rounded weights
    # The default KV cache (the weights' dtype) with float32 products: the KV cache's rounding.
    assert rel_err(corral.LLM(tmp_path, kv_cache_bytes=1 << 20, dtype="float32").logits(TOKENS), ref) <= HALF_TOL
    # With a float32 KV cache the only rounding left is the weights', which the reference shares:
    # the weights must be decoded exactly.
    exact = corral.LLM(tmp_path, kv_cache_bytes=1 << 20, kv_cache_dtype="float32", dtype="float32").logits(TOKENS)
    assert rel_err(exact, ref) <= FP32_TOL


def test_mixed_dtypes(causal, clone):
    """Each tensor is read in its own dtype: bf16 matrices with f32 norms and an f16 embedding."""
    path, model, _ = causal
    ckpt = clone(path)
    rounded = {}

    def convert(tensors):
        for name, t in tensors.items():
            a = t.array().astype(np.float32)
            if name.endswith("embed_tokens.weight"):
                a16 = a.astype(np.float16)
                tensors[name] = Tensor.from_array(a16)
                rounded[name] = a16.astype(np.float32)
            elif a.ndim >= 2:
                tensors[name] = Tensor.bf16(a)
                rounded[name] = tensors[name].array().copy()
            else:
                rounded[name] = a

    edit_safetensors(ckpt / "model.safetensors", convert)
    dtypes = {t.dtype for t in read_safetensors(ckpt / "model.safetensors")[0].values()}
    assert dtypes == {"F16", "BF16", "F32"}
    ref = hf_logits(causal_like({k: torch.from_numpy(v) for k, v in rounded.items()}))
    assert rel_err(logits_of(ckpt), ref) <= HALF_TOL
    # Float32 KV cache and products: the weights' own rounding only, which the reference shares.
    exact = corral.LLM(ckpt, kv_cache_bytes=1 << 20, kv_cache_dtype="float32", dtype="float32").logits(TOKENS)
    assert rel_err(exact, ref) <= FP32_TOL


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("field", REQUIRED_FIELDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_missing_required_config_field(base, clone, layout, field):
    ckpt = clone(base[layout][0])
    edit_text_config(ckpt, **{field: DELETE})
    where = f"'{FIELD_PREFIX[layout]}{field}'"
    expect_error(ckpt, corral.ConfigError, where, ckpt / "config.json", "missing", builtin=ValueError)


@pytest.mark.parametrize(
    "field, value, shown",
    [("hidden_size", "abc", '"abc"'), ("num_hidden_layers", [4], "[4]"), ("vocab_size", 64.5, "64.5"),
     ("num_attention_heads", None, "null")],
)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_config_field_of_wrong_type(base, clone, layout, field, value, shown):
    ckpt = clone(base[layout][0])
    edit_text_config(ckpt, **{field: value})
    expect_error(
        ckpt, corral.ConfigError, f"config field '{FIELD_PREFIX[layout]}{field}'", ckpt / "config.json",
        "must be an integer", shown, builtin=ValueError,
    )


def test_config_field_not_positive(causal, clone):
    ckpt = clone(causal[0])
    edit_text_config(ckpt, num_attention_heads=0)
    expect_error(ckpt, corral.ConfigError, "'num_attention_heads'", ckpt / "config.json", "positive")


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(no_rope_layers=[1, 1]), "no_rope_layers"),
        (dict(moe_layers=[1, 7]), "moe_layers"),
        (dict(layer_types=["chunked_attention"] * 3 + ["sliding_attention"]), "layer_types"),
        (dict(num_key_value_heads=3), "num_attention_heads"),
        (dict(num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(head_dim=7), "head_dim"),
        (dict(rope_parameters="llama3"), "rope_parameters"),
        (dict(attn_temperature_tuning="yes"), "attn_temperature_tuning"),
    ],
)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_inconsistent_config(base, clone, layout, changes, field):
    ckpt = clone(base[layout][0])
    edit_text_config(ckpt, **changes)
    expect_error(ckpt, corral.ConfigError, f"'{FIELD_PREFIX[layout]}{field}'", ckpt / "config.json", builtin=ValueError)


def test_text_config_not_an_object(conditional, clone):
    ckpt = clone(conditional[0])
    write_config(ckpt, dict(read_config(ckpt), text_config="llama"))
    expect_error(ckpt, corral.ConfigError, "'text_config'", ckpt / "config.json", builtin=ValueError)


@pytest.mark.parametrize("text", ['{"vocab_size": 64,', "", "not json at all"])
def test_config_not_json(causal, clone, text):
    ckpt = clone(causal[0])
    (ckpt / "config.json").write_text(text)
    expect_error(ckpt, corral.ConfigError, ckpt / "config.json", "not valid JSON", builtin=ValueError)


def test_config_not_an_object(causal, clone):
    ckpt = clone(causal[0])
    (ckpt / "config.json").write_text("[1, 2, 3]")
    expect_error(ckpt, corral.ConfigError, ckpt / "config.json", builtin=ValueError)


def test_missing_config_json(causal, clone):
    ckpt = clone(causal[0])
    (ckpt / "config.json").unlink()
    expect_error(ckpt, corral.ModelFileNotFoundError, ckpt / "config.json", builtin=FileNotFoundError)


def test_missing_model_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    expect_error(missing, corral.ModelFileNotFoundError, missing, builtin=FileNotFoundError)


def test_folder_without_weights(causal, clone):
    ckpt = clone(causal[0])
    (ckpt / "model.safetensors").unlink()
    expect_error(
        ckpt, corral.ModelFileNotFoundError, ckpt, "model.safetensors", "model.safetensors.index.json",
        builtin=FileNotFoundError,
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unsupported_rope_type(base, clone, layout):
    ckpt = clone(base[layout][0])
    cfg = read_config(ckpt)
    text_section(cfg)["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0}
    write_config(ckpt, cfg)
    expect_error(
        ckpt, corral.ConfigError, f"'{FIELD_PREFIX[layout]}rope_parameters.rope_type'", ckpt / "config.json",
        "yarn", builtin=ValueError,
    )


def test_unsupported_rope_type_meta_spelling(causal, clone):
    ckpt = clone(causal[0])
    edit_text_config(
        ckpt, rope_parameters=DELETE, rope_theta=10000.0, rope_scaling={"rope_type": "yarn", "factor": 8.0}
    )
    expect_error(ckpt, corral.ConfigError, "'rope_scaling.rope_type'", ckpt / "config.json", "yarn")


def test_unsupported_rope_type_names_the_type_key(causal, clone):
    ckpt = clone(causal[0])
    edit_text_config(ckpt, rope_parameters=DELETE, rope_theta=10000.0, rope_scaling={"type": "yarn", "factor": 8.0})
    expect_error(ckpt, corral.ConfigError, "'rope_scaling.type'", ckpt / "config.json", "yarn")


def test_llama3_rope_without_factor(causal, clone):
    ckpt = clone(causal[0])
    cfg = read_config(ckpt)
    del cfg["rope_parameters"]["factor"]
    write_config(ckpt, cfg)
    expect_error(ckpt, corral.ConfigError, "'rope_parameters.factor'", ckpt / "config.json", "missing")


# ----------------------------------------------------------------------------- missing tensors


@pytest.mark.parametrize("layout", LAYOUTS)
def test_missing_tensor_single_file(base, clone, layout):
    ckpt = clone(base[layout][0])
    name = MODEL_PREFIX[layout] + "layers.1.self_attn.k_proj.weight"
    edit_tensor(ckpt, name, lambda t: None)
    expect_error(ckpt, corral.MissingTensorError, f"'{name}'", ckpt / "model.safetensors", builtin=LookupError)


@pytest.mark.parametrize(
    "suffix", ["embed_tokens.weight", "norm.weight", "layers.3.feed_forward.experts.down_proj",
               "layers.2.feed_forward.up_proj.weight", "layers.3.feed_forward.shared_expert.gate_proj.weight"]
)
def test_missing_tensor_of_each_kind(causal, clone, suffix):
    ckpt = clone(causal[0])
    name = "model." + suffix
    edit_tensor(ckpt, name, lambda t: None)
    expect_error(ckpt, corral.MissingTensorError, f"'{name}'", ckpt / "model.safetensors", builtin=LookupError)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_missing_lm_head(base, clone, layout):
    ckpt = clone(base[layout][0])
    name = HEAD_PREFIX[layout] + "lm_head.weight"
    edit_tensor(ckpt, name, lambda t: None)
    expect_error(ckpt, corral.MissingTensorError, f"'{name}'", ckpt / "model.safetensors", builtin=LookupError)


def test_missing_tensor_sharded(causal_sharded, clone):
    """Absent from the index (and from every shard): the message names the index."""
    ckpt = clone(causal_sharded)
    name = "model.layers.1.self_attn.k_proj.weight"
    edit_tensor(ckpt, name, lambda t: None)
    index = read_index(ckpt)
    del index["weight_map"][name]
    write_index(ckpt, index["weight_map"], index["metadata"])
    expect_error(
        ckpt, corral.MissingTensorError, f"'{name}'", ckpt / "model.safetensors.index.json", builtin=LookupError
    )


def test_tensor_listed_in_index_but_absent_from_shard(causal_sharded, clone):
    ckpt = clone(causal_sharded)
    name = "model.layers.1.self_attn.k_proj.weight"
    shard_file = file_of(ckpt, name)
    edit_tensor(ckpt, name, lambda t: None)  # the index still lists it
    assert name in read_index(ckpt)["weight_map"]
    expect_error(
        ckpt, corral.MissingTensorError, f"'{name}'", shard_file, ckpt / "model.safetensors.index.json",
        builtin=LookupError,
    )


def test_missing_shard(causal_sharded, clone):
    ckpt = clone(causal_sharded)
    missing = ckpt / "model-00002-of-00003.safetensors"
    missing.unlink()
    expect_error(
        ckpt, corral.ModelFileNotFoundError, missing, ckpt / "model.safetensors.index.json", builtin=FileNotFoundError
    )


# ----------------------------------------------------------------------------- shapes and dtypes


def _drop_row(t: Tensor) -> Tensor:
    row = len(t.data) // t.shape[0]
    return Tensor(t.dtype, [t.shape[0] - 1] + t.shape[1:], t.data[:-row])


def _as_shape(shape):
    """The tensor stored with another shape (its first elements, or its data relabelled)."""

    def edit(t: Tensor) -> Tensor:
        n = int(np.prod(shape)) * DTYPE_BYTES[t.dtype]
        assert n <= len(t.data)
        return Tensor(t.dtype, shape, t.data[:n])

    return edit


@pytest.mark.parametrize(
    "layout, suffix, shape, expected",
    [
        ("causal", "layers.0.self_attn.q_proj.weight", [31, 32], [32, 32]),
        ("causal", "layers.0.self_attn.k_proj.weight", [32, 16], [16, 32]),  # stored transposed
        ("causal", "layers.1.input_layernorm.weight", [31], [32]),
        ("causal", "norm.weight", [1, 32], [32]),
        ("causal", "layers.3.feed_forward.experts.gate_up_proj", [4, 32, 30], [4, 32, 32]),
        ("causal", "layers.1.feed_forward.experts.down_proj", [4, 32, 16], [4, 16, 32]),  # transposed experts
        ("causal", "layers.1.feed_forward.router.weight", [4, 32, 1], [4, 32]),
        ("causal", "layers.2.feed_forward.down_proj.weight", [24, 32], [32, 24]),
        ("conditional", "embed_tokens.weight", [63, 32], [64, 32]),
        ("conditional", "layers.2.self_attn.o_proj.weight", [32, 31], [32, 32]),
    ],
)
def test_wrong_shape(base, clone, layout, suffix, shape, expected):
    ckpt = clone(base[layout][0])
    name = MODEL_PREFIX[layout] + suffix
    edit_tensor(ckpt, name, _as_shape(shape))
    expect_error(
        ckpt, corral.ShapeError,
        f"tensor '{name}' in {ckpt / 'model.safetensors'} has shape {shape}, expected {expected}",
        builtin=ValueError,
    )


def _retype(dtype: str):
    def edit(t: Tensor) -> Tensor:
        a = t.array()
        if dtype == "F64":
            return Tensor.from_array(a.astype(np.float64))
        if dtype in ("I32", "I64"):
            return Tensor.from_array((a * 100).astype(np.int32 if dtype == "I32" else np.int64))
        return Tensor(dtype, t.shape, a.astype(np.float16).view(np.uint16).astype(np.uint8).tobytes())  # 1-byte types

    return edit


@pytest.mark.parametrize("dtype", ["F64", "I32", "I64", "F8_E5M2", "F8_E4M3"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_unsupported_dtype_of_used_tensor(base, clone, layout, dtype):
    ckpt = clone(base[layout][0])
    name = MODEL_PREFIX[layout] + "layers.2.self_attn.v_proj.weight"
    edit_tensor(ckpt, name, _retype(dtype))
    assert read_safetensors(ckpt / "model.safetensors")[0][name].dtype == dtype
    expect_error(ckpt, corral.DTypeError, f"'{name}'", ckpt / "model.safetensors", dtype, builtin=ValueError)


@pytest.mark.parametrize("name", ["model.norm.weight", "model.layers.1.feed_forward.experts.gate_up_proj"])
def test_unsupported_dtype_in_shard(causal_sharded, clone, name):
    ckpt = clone(causal_sharded)
    edit_tensor(ckpt, name, _retype("F64"))
    expect_error(ckpt, corral.DTypeError, f"'{name}'", file_of(ckpt, name), "F64", builtin=ValueError)


# ----------------------------------------------------------------------------- corrupt files


def _header_len(raw: bytes) -> int:
    return struct.unpack("<Q", raw[:8])[0]


def _with_header(raw: bytes, header: bytes) -> bytes:
    """raw's data section behind a new header."""
    return struct.pack("<Q", len(header)) + header + raw[8 + _header_len(raw) :]


def _edit_entry(name: str, **fields):
    def f(raw: bytes) -> bytes:
        header = json.loads(raw[8 : 8 + _header_len(raw)])
        header[name].update(fields)
        return _with_header(raw, json.dumps(header).encode())

    return f


def _offsets_minus(name: str, delta: int):
    def f(raw: bytes) -> bytes:
        header = json.loads(raw[8 : 8 + _header_len(raw)])
        b, e = header[name]["data_offsets"]
        header[name]["data_offsets"] = [b, e - delta]
        return _with_header(raw, json.dumps(header).encode())

    return f


Q = "model.layers.0.self_attn.q_proj.weight"

# case id -> (raw file bytes -> corrupt bytes, fragments the message must contain)
CORRUPTIONS = {
    "empty": (lambda raw: b"", ["truncated"]),
    "5-bytes": (lambda raw: raw[:5], ["truncated"]),
    "7-bytes": (lambda raw: raw[:7], ["truncated"]),
    "header-past-end": (lambda raw: raw[: 8 + _header_len(raw) // 2], ["truncated"]),
    "header-length-only": (lambda raw: raw[:8], ["truncated"]),
    "cut-in-data": (lambda raw: raw[: 8 + _header_len(raw) + (len(raw) - 8 - _header_len(raw)) // 2], ["truncated"]),
    "last-byte-missing": (lambda raw: raw[:-1], ["truncated"]),
    "oversized": (lambda raw: struct.pack("<Q", 100_000_001) + raw[8:], ["oversized"]),
    "oversized-max": (lambda raw: b"\xff" * 8 + raw[8:], ["oversized"]),
    "at-header-limit": (lambda raw: struct.pack("<Q", 100_000_000) + raw[8:], ["truncated"]),
    "not-json": (lambda raw: _with_header(raw, b"this is not json" + b" " * 8), ["not valid JSON"]),
    "json-cut": (lambda raw: _with_header(raw, raw[8 : 8 + _header_len(raw) // 2]), ["not valid JSON"]),
    "not-object": (lambda raw: _with_header(raw, b"[1, 2, 3]"), ["not a JSON object"]),
    "offsets-short": (_offsets_minus(Q, 4), [f"'{Q}'", "data_offsets"]),
    "offsets-reversed": (_edit_entry(Q, data_offsets=[64, 0]), [f"'{Q}'", "data_offsets"]),
    "shape-disagrees": (_edit_entry(Q, shape=[32, 16]), [f"'{Q}'", "data_offsets"]),
    "dtype-disagrees": (_edit_entry(Q, dtype="F16"), [f"'{Q}'", "data_offsets"]),
    "unknown-dtype": (_edit_entry(Q, dtype="Q4_K"), [f"'{Q}'", "unknown dtype", "Q4_K"]),
    "negative-shape": (_edit_entry(Q, shape=[-32, -32]), [f"'{Q}'", "shape"]),
    "offsets-past-data": (
        _edit_entry("model.norm.weight", data_offsets=[10**9, 10**9 + 128]), ["'model.norm.weight'", "truncated"]
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_safetensors(causal, clone, case):
    corrupt, fragments = CORRUPTIONS[case]
    ckpt = clone(causal[0])
    f = ckpt / "model.safetensors"
    f.write_bytes(corrupt(f.read_bytes()))
    expect_error(ckpt, corral.CorruptCheckpointError, f, *fragments, builtin=ValueError)


@pytest.mark.parametrize("case", ["cut-in-data", "5-bytes", "oversized", "not-json", "unknown-dtype"])
def test_corrupt_shard(causal_sharded, clone, case):
    corrupt, fragments = CORRUPTIONS[case]
    ckpt = clone(causal_sharded)
    f = file_of(ckpt, Q)
    f.write_bytes(corrupt(f.read_bytes()))
    expect_error(ckpt, corral.CorruptCheckpointError, f, *fragments, builtin=ValueError)


def test_corrupt_unused_tensor_entry(conditional, clone):
    """The whole header is checked, vision entries included."""
    ckpt = clone(conditional[0])
    f = ckpt / "model.safetensors"
    f.write_bytes(_offsets_minus("vision_model.class_embedding", 4)(f.read_bytes()))
    expect_error(ckpt, corral.CorruptCheckpointError, f, "'vision_model.class_embedding'", builtin=ValueError)


@pytest.mark.parametrize("dtype, shape", [("F32", [2**62]), ("F64", [2**61]), ("I64", [2**31, 2**30])])
def test_size_overflow_in_header(conditional, clone, dtype, shape):
    ckpt = clone(conditional[0])
    f = ckpt / "model.safetensors"
    tensors, meta = read_safetensors(f)
    tensors["vision_model.huge"] = Tensor(dtype, shape, b"")
    f.write_bytes(safetensors_bytes(tensors, meta))
    expect_error(ckpt, corral.CorruptCheckpointError, f, "'vision_model.huge'", builtin=ValueError)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('{"weight_map": {"model.norm.weight": ', "not valid JSON"),
        ("", "not valid JSON"),
        ('{"metadata": {}}', "weight_map"),
        ('{"weight_map": ["model-00001-of-00003.safetensors"]}', "weight_map"),
        ('{"weight_map": {"model.norm.weight": 3}}', "model.norm.weight"),
        ('{"weight_map": {"model.norm.weight": "../elsewhere/model.safetensors"}}', "model.norm.weight"),
    ],
)
def test_corrupt_index(causal_sharded, clone, text, fragment):
    ckpt = clone(causal_sharded)
    index = ckpt / "model.safetensors.index.json"
    index.write_text(text)
    expect_error(ckpt, corral.CorruptCheckpointError, index, fragment, builtin=ValueError)


# ----------------------------------------------------------------------------- process health


def _mapped_files() -> set[str]:
    out = set()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6:
                out.add(parts[5].strip())
    return out


def test_errors_leave_process_healthy(causal, causal_sharded, clone):
    path, _, ref = causal
    first = load(path)
    before = first.logits(TOKENS)

    broken = []
    ckpt = clone(path)  # ShapeError after the file is mapped
    edit_tensor(ckpt, Q, _drop_row)
    broken.append((ckpt, corral.ShapeError))
    ckpt = clone(path)  # DTypeError after the file is mapped
    edit_tensor(ckpt, Q, _retype("F64"))
    broken.append((ckpt, corral.DTypeError))
    ckpt = clone(path)  # MissingTensorError late in the load
    edit_tensor(ckpt, "model.layers.3.feed_forward.experts.down_proj", lambda t: None)
    broken.append((ckpt, corral.MissingTensorError))
    for case in ("cut-in-data", "oversized", "not-json", "offsets-short"):
        ckpt = clone(path)
        f = ckpt / "model.safetensors"
        f.write_bytes(CORRUPTIONS[case][0](f.read_bytes()))
        broken.append((ckpt, corral.CorruptCheckpointError))
    ckpt = clone(causal_sharded)  # a shard missing after others were opened
    (ckpt / "model-00003-of-00003.safetensors").unlink()
    broken.append((ckpt, corral.ModelFileNotFoundError))
    ckpt = clone(path)
    edit_text_config(ckpt, hidden_size="abc")
    broken.append((ckpt, corral.ConfigError))
    broken.append((ckpt / "missing", corral.ModelFileNotFoundError))

    have_proc = os.path.exists("/proc/self/maps") and os.path.isdir("/proc/self/fd")
    fds = len(os.listdir("/proc/self/fd")) if have_proc else 0
    for _ in range(3):
        for folder, cls in broken:
            with pytest.raises(cls):
                load(folder)
    if have_proc:  # failed loads neither keep files mapped nor leak descriptors
        leaked = {m for m in _mapped_files() if any(m.startswith(str(folder)) for folder, _ in broken)}
        assert not leaked
        assert len(os.listdir("/proc/self/fd")) <= fds

    np.testing.assert_array_equal(first.logits(TOKENS), before)  # a model loaded before still works
    again = load(path)
    assert rel_err(again.logits(TOKENS), ref) <= FP32_TOL
    assert rel_err(load(causal_sharded).logits(TOKENS), ref) <= FP32_TOL
