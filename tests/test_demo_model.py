"""The bundled demo model (python/corral/demo_model, trained by tools/train_demo_model.py).

Its held-out text (tests/data/heldout.txt: standard-library modules the training never saw) has the
same perplexity through Corral as through transformers, far below a uniform model's; greedy
generation matches transformers'; `corral generate` with no model generates from it."""

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, Llama4ForCausalLM

import corral
from test_cli import corral_cli
from test_perplexity import transformers_perplexity

DEMO = corral.demo_model_path()
HELDOUT = Path(__file__).parent / "data" / "heldout.txt"
WINDOW = 512  # the length of the training sequences
PROMPT = "The file object"


@pytest.fixture(scope="module")
def reference():
    """transformers' model in float32 on the checkpoint's bf16 weights, and its tokenizer."""
    return Llama4ForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(DEMO)


def test_demo_model_is_a_small_llama4_moe():
    config = json.loads((DEMO / "config.json").read_text())
    config = config.get("text_config", config)
    assert config["num_local_experts"] == 16 and config["num_experts_per_tok"] == 1
    assert config["interleave_moe_layer_step"] > 1  # dense layers between the MoE ones
    assert 0 < config["attention_chunk_size"] and 0 in config["no_rope_layers"]  # chunked + NoPE layers
    assert (DEMO / "model.safetensors").stat().st_size <= 30e6


def test_heldout_perplexity_matches_transformers(reference):
    model, tokenizer = reference
    text = HELDOUT.read_text(encoding="utf-8")
    ids = tokenizer(text).input_ids
    assert corral.Tokenizer(DEMO).encode(text) == ids
    want, count = transformers_perplexity(model, ids, WINDOW)

    got = corral.perplexity(corral.LLM(), text, window=WINDOW)  # LLM(): the demo model, bf16 KV cache
    print(f"held-out perplexity: corral {got.perplexity:.3f}, transformers {want:.3f}, {count} tokens")
    assert got.tokens == count > 10_000
    assert got.perplexity == pytest.approx(want, rel=5e-3)
    assert want < model.config.vocab_size / 10  # a uniform model's perplexity is the vocabulary size


def test_greedy_generation_matches_transformers(reference):
    model, tokenizer = reference
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, min_new_tokens=24, do_sample=False)  # stop ids banned
    want = out[0, inputs.input_ids.shape[1] :].tolist()
    llm = corral.LLM(kv_cache_dtype="float32")
    got = llm.generate(PROMPT, corral.SamplingParams(temperature=0.0, max_tokens=24, min_tokens=24))[0]
    assert got.prompt_token_ids == inputs.input_ids[0].tolist()
    assert list(got.outputs[0].token_ids) == want


def test_cli_generates_from_the_demo_model_by_default():
    r = corral_cli("generate", PROMPT, "--max-tokens", 40, "--temperature", 0)
    assert r.returncode == 0, r.stderr
    words = re.findall(r"[A-Za-z]+", r.stdout)
    assert len(words) >= 5, r.stdout  # text, not special tokens or an empty completion
