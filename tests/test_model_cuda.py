"""Whole models on a GPU (device="cuda"): the same references as the CPU's tests (transformers,
the CPU's own tokens). Every test here needs a usable CUDA device; without one they are skipped
(conftest), never passed."""

import json

import numpy as np
import pytest
import torch

import corral
from numerics import rel_err
from test_model import VARIANTS, bf16_products, prompt
from tiny_models import build, load_reference, reference_greedy, reference_logits

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    built = {}

    def get(variant, dtype, **overrides):
        key = (variant, dtype, tuple(sorted(overrides.items())))
        if key not in built:
            path = tmp_path_factory.mktemp(f"{variant}-{dtype}")
            built[key] = build(variant, "causal", getattr(torch, dtype), path, **overrides)
        return built[key]

    return get


@pytest.mark.parametrize("variant", VARIANTS)
def test_fp32_logits_cuda(checkpoints, variant):
    """fp32 weights and KV cache: logits at every prompt position within 1e-4 of transformers."""
    path = checkpoints(variant, "float32")
    ids = prompt(1)
    got = corral.LLM(path, device="cuda", kv_cache_dtype="float32").logits(ids)
    assert rel_err(got, reference_logits(load_reference(path, "causal"), ids)) <= 1e-4


def test_bf16_logits_cuda_one_expert(tmp_path):
    """bf16 weights, the default bf16 KV cache: within 2e-2 of transformers run in fp32 (one routed
    expert, so that no rounding can flip a tiny random model's routes; see test_model.py)."""
    path = build("chunked", "causal", torch.bfloat16, tmp_path, num_local_experts=1, num_experts_per_tok=1)
    ids = prompt(4)
    got = corral.LLM(path, device="cuda").logits(ids)
    assert rel_err(got, reference_logits(load_reference(path, "causal"), ids)) <= 2e-2


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_products_cuda(checkpoints, variant):
    """bf16 weights: the GPU's products round activations to bf16 as the CPU's default ones do:
    every token within 1e-2 of transformers whose product inputs are rounded the same way, in
    float32 or float64 (test_model.test_bf16_products says why two references)."""
    path = checkpoints(variant, "bfloat16")
    ids = prompt(2)
    got = corral.LLM(path, device="cuda", kv_cache_dtype="float32").logits(ids)
    model = bf16_products(load_reference(path, "causal"))
    ref32, ref64 = reference_logits(model, ids), reference_logits(model.double(), ids)
    scale = np.abs(ref32).max()
    per_token = [min(np.abs(g - a).max(), np.abs(g - b).max()) / scale for g, a, b in zip(got, ref32, ref64)]
    assert max(per_token) <= 1e-2


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_cuda_matches_transformers(checkpoints, variant):
    """fp32: 32 greedy steps (prefill, then decode steps) give transformers' greedy tokens."""
    path = checkpoints(variant, "float32")
    ids = prompt(3, 101)
    out = corral.LLM(path, device="cuda", block_size=8).generate(
        [ids], corral.SamplingParams(max_tokens=32, ignore_eos=True)
    )
    assert out[0].outputs[0].token_ids == reference_greedy(load_reference(path, "causal"), ids, 32)


def test_demo_model_greedy_cuda_equals_cpu():
    """The bundled demo model: greedy tokens on the GPU equal the CPU's, prompts batched."""
    prompts = ["The file object", "Once upon a time", "def main():", "In 1969,"]
    params = corral.SamplingParams(max_tokens=32, ignore_eos=True)
    cpu = [o.outputs[0].token_ids for o in corral.LLM().generate(prompts, params)]
    gpu = [o.outputs[0].token_ids for o in corral.LLM(device="cuda").generate(prompts, params)]
    assert gpu == cpu


def test_structured_output_and_min_tokens_cuda_equal_cpu():
    """A JSON schema's grammar and min_tokens' bans, applied on the device as bitmasks: greedy and
    seeded tokens equal the CPU's, the texts are valid JSON, and a stop token greedy would draw
    second waits for min_tokens."""
    schema = {"type": "object", "required": ["name", "age"],
              "properties": {"name": {"type": "string", "maxLength": 12},
                             "age": {"type": "integer", "minimum": 0, "maximum": 150}}}
    cpu_llm, gpu_llm = corral.LLM(), corral.LLM(device="cuda")
    second = cpu_llm.generate(["The file object"], corral.SamplingParams(max_tokens=2, ignore_eos=True))
    stop = second[0].outputs[0].token_ids[1]
    params = [
        corral.SamplingParams(max_tokens=48, json_schema=schema),
        corral.SamplingParams(max_tokens=48, temperature=1.0, seed=3, json_schema=schema),
        corral.SamplingParams(max_tokens=12, min_tokens=6, stop_token_ids=[stop]),
    ]
    prompts = ["A person as JSON:", "Another person:", "The file object"]
    cpu, gpu = cpu_llm.generate(prompts, params), gpu_llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in gpu] == [o.outputs[0].token_ids for o in cpu]
    for o in gpu[:2]:
        assert set(json.loads(o.outputs[0].text)) == {"name", "age"}
    assert len(gpu[2].outputs[0].token_ids) >= 6


@pytest.mark.parametrize("variant", VARIANTS)
def test_batched_generation_cuda_matches_alone(checkpoints, variant):
    """Prefill and decode mixed in one step on the GPU: each request's greedy tokens equal running
    it alone (different batch sizes take different product kernels; the tokens must not move)."""
    path = checkpoints(variant, "float32")
    prompts = [prompt(20 + i, n) for i, n in enumerate((5, 33, 70, 120))]
    params = corral.SamplingParams(max_tokens=12, ignore_eos=True)
    llm = corral.LLM(path, device="cuda", max_num_batched_tokens=64)
    batched = llm.generate(prompts, params)
    for p, out in zip(prompts, batched):
        assert out.outputs[0].token_ids == llm.generate([p], params)[0].outputs[0].token_ids


def test_prefix_cache_and_pieces_cuda(checkpoints):
    """A 1,000-token prompt in pieces of 128 (chunk 32), then again from the prefix cache: logits of
    its last 10 positions within 1e-4 of transformers both times (copy-on-write pages included)."""
    path = checkpoints("chunked", "float32", attention_chunk_size=32)
    ids = prompt(6, 1000)
    ref = reference_logits(load_reference(path, "causal"), ids)[-10:]
    llm = corral.LLM(path, device="cuda", max_num_batched_tokens=128, kv_cache_dtype="float32")
    assert rel_err(llm.logits(ids)[-10:], ref) <= 1e-4
    params = corral.SamplingParams(max_tokens=4, n=3, temperature=0.8, seed=1)
    first = llm.generate([ids], params)[0]
    assert llm.stats()["prefix_cache_hit_tokens"] > 0
    again = llm.generate([ids], params)[0]  # n=3 forks share the prefix copy-on-write
    assert [s.token_ids for s in again.outputs] == [s.token_ids for s in first.outputs]


def test_seeded_sampling_cuda_equals_cpu(checkpoints):
    """Seeded sampling (temperature, top-k, top-p, penalties) draws the CPU's tokens on the GPU."""
    path = checkpoints("scout", "float32")
    params = corral.SamplingParams(
        max_tokens=16, temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.2, seed=7, ignore_eos=True
    )
    ids = [prompt(30 + i, 20) for i in range(3)]
    cpu = [o.outputs[0].token_ids for o in corral.LLM(path, kv_cache_dtype="float32").generate(ids, params)]
    gpu = corral.LLM(path, device="cuda", kv_cache_dtype="float32").generate(ids, params)
    assert [o.outputs[0].token_ids for o in gpu] == cpu


@pytest.mark.parametrize("kv_dtype", ("bfloat16", "float16", "fp8"))
def test_kv_cache_dtypes_cuda(checkpoints, kv_dtype):
    """16- and 8-bit KV caches on the GPU give what the CPU's give, within 2e-2."""
    path = checkpoints("chunked", "float32")
    ids = prompt(8)
    cpu = corral.LLM(path, kv_cache_dtype=kv_dtype, dtype="float32").logits(ids)
    gpu = corral.LLM(path, device="cuda", kv_cache_dtype=kv_dtype).logits(ids)
    assert rel_err(gpu, cpu) <= 2e-2


def test_expert_statistics_cuda(checkpoints):
    """The GPU counts each MoE layer's routes as transformers' router picks them (fp32)."""
    path = checkpoints("maverick", "float32")
    ids = prompt(5, 57)
    llm = corral.LLM(path, device="cuda")
    llm.logits(ids)
    model = load_reference(path, "causal")
    with torch.no_grad():
        routers = model(input_ids=torch.tensor([ids]), output_router_logits=True).router_logits
    counts = llm.stats()["moe_expert_tokens"]
    for layer, logits in zip(sorted(counts), routers):
        chosen = torch.topk(logits.reshape(len(ids), -1), llm.config["top_k"], dim=1).indices.flatten()
        assert counts[layer] == torch.bincount(chosen, minlength=llm.config["num_experts"]).tolist()


def test_cuda_refusals(checkpoints):
    """What the GPU cannot take is a clear error: a KV budget beyond the device's memory, a prompt
    id outside the vocabulary (quantized weights run there: test_quantized_cuda.py)."""
    path = checkpoints("scout", "bfloat16")
    with pytest.raises(corral.OutOfKVCacheError, match="free on cuda:0"):
        corral.LLM(path, device="cuda", kv_cache_bytes=1 << 50)
    llm = corral.LLM(path, device="cuda")
    with pytest.raises(corral.InvalidInputError, match="vocabulary"):
        llm.generate([[1, 2, 10**6]])
    assert llm.generate([[1, 2, 3]], corral.SamplingParams(max_tokens=3))[0].outputs[0].token_ids
