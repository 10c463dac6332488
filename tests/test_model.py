"""The whole Llama 4 forward pass against transformers, on tiny random checkpoints."""

import numpy as np
import pytest
import torch

import corral
from numerics import rel_err
from tiny_models import VOCAB, build, load_reference, reference_greedy, reference_logits

VARIANTS = ("scout", "maverick", "chunked")
LAYOUTS = ("causal", "conditional")
PROMPT_LEN = 130  # crosses several chunks of the chunked variant (16), and floor_scale steps


def prompt(seed: int, n: int = PROMPT_LEN) -> list[int]:
    return np.random.default_rng(seed).integers(3, VOCAB, size=n).tolist()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """(variant, layout, dtype) -> checkpoint folder, built once per session on demand."""
    built = {}

    def get(variant, layout, dtype):
        key = (variant, layout, dtype)
        if key not in built:
            path = tmp_path_factory.mktemp(f"{variant}-{layout}-{dtype}")
            built[key] = build(variant, layout, getattr(torch, dtype), path)
        return built[key]

    return get


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_prompt_logits_fp32(checkpoints, variant, layout):
    """fp32 weights: logits at every prompt position within 1e-4 of transformers."""
    path = checkpoints(variant, layout, "float32")
    ids = prompt(1)
    got = corral.LLM(path, block_size=16).logits(ids)
    ref = reference_logits(load_reference(path, layout), ids)
    assert got.shape == (len(ids), VOCAB) and got.dtype == np.float32
    assert rel_err(got, ref) <= 1e-4


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_prompt_logits_bf16(checkpoints, variant, layout):
    """bf16 weights: within 2e-2 of transformers run in fp32 on the same bf16-valued weights.

    The KV cache and the products' activations are float32 here so that only the weights' dtype
    is under test (so the match is in fact far tighter). test_bf16_products checks the default
    bf16-rounded activations."""
    path = checkpoints(variant, layout, "bfloat16")
    ids = prompt(2)
    got = corral.LLM(path, kv_cache_dtype="float32", dtype="float32").logits(ids)
    ref = reference_logits(load_reference(path, layout), ids)
    assert rel_err(got, ref) <= 2e-2


def bf16_products(model: torch.nn.Module) -> torch.nn.Module:
    """transformers' model with every matrix product's input rounded to bf16, as Corral's default
    products take it for bf16 weights (the router's excepted: it reads its input exactly)."""
    from transformers.models.llama4.modeling_llama4 import Llama4Router, Llama4TextExperts

    def r(t):
        return t.to(torch.bfloat16).to(t.dtype)

    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) and not isinstance(mod, Llama4Router):
            mod.register_forward_pre_hook(lambda m, args: (r(args[0]), *args[1:]))
        if isinstance(mod, Llama4TextExperts):

            def experts(h, mod=mod):
                h = r(h).view(mod.gate_up_proj.shape[0], -1, mod.hidden_size)
                gate, up = torch.bmm(h, mod.gate_up_proj).chunk(2, dim=-1)
                return torch.bmm(r(up * mod.act_fn(gate)), mod.down_proj).view(-1, mod.hidden_size)

            mod.forward = experts
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_products(checkpoints, variant):
    """bf16 weights with the default products (activations rounded to bf16): every token's logits
    within 1e-2 of transformers whose product inputs are rounded the same way, run in float32 or in
    float64. Two references because the rounding makes a token's result depend on the order of
    the sums before it: an input that lies on a bf16 rounding boundary rounds one way after fp32
    sums and the other after exact ones (the chunked model has such a token: its two references
    differ by 2.8e-2 there, 1e-3 to 3e-3 elsewhere), and Corral sums in an order of its own (its
    measured error to the nearer reference: 1e-3 to 3e-3). Against plain fp32 transformers these
    random tiny models differ by more: a bf16-rounded input flips the top-1 route of some tokens
    (test_prompt_logits_bf16 checks the exact products, dtype="float32")."""
    path = checkpoints(variant, "causal", "bfloat16")
    ids = prompt(2)
    got = corral.LLM(path, kv_cache_dtype="float32").logits(ids)
    model = bf16_products(load_reference(path, "causal"))
    ref32 = reference_logits(model, ids)
    ref64 = reference_logits(model.double(), ids)
    scale = np.abs(ref32).max()
    per_token = [min(np.abs(g - a).max(), np.abs(g - b).max()) / scale for g, a, b in zip(got, ref32, ref64)]
    assert max(per_token) <= 1e-2
    # The references agree on nearly every token: allowing either hides no systematic difference.
    assert np.median(np.abs(ref32 - ref64).max(axis=1)) / scale <= 5e-3


@pytest.mark.parametrize("kv_dtype", ("bfloat16", "float16"))
def test_16bit_kv_cache(tmp_path, kv_dtype):
    """A 16-bit KV cache (the default for bf16 weights) stays within 2e-2 of fp32 transformers.

    One routed expert: with several, a tiny random model's router flips to another expert on
    some tokens under any rounding, which would hide what this test measures."""
    path = build("chunked", "causal", torch.bfloat16, tmp_path, num_local_experts=1, num_experts_per_tok=1)
    ids = prompt(4)
    llm = corral.LLM(path, kv_cache_dtype=kv_dtype)
    got = llm.logits(ids)
    ref = reference_logits(load_reference(path, "causal"), ids)
    assert rel_err(got, ref) <= 2e-2


@pytest.mark.parametrize("dtype, bytes_per_value", (("float32", 4), ("bfloat16", 2)))
def test_default_kv_dtype_follows_weights(checkpoints, dtype, bytes_per_value):
    """kv_cache_dtype='auto' stores K/V in the weights' dtype."""
    llm = corral.LLM(checkpoints("scout", "causal", dtype))
    cfg = llm.config
    values = 2 * cfg["num_layers"] * cfg["num_kv_heads"] * cfg["head_dim"]
    assert llm.stats()["kv_bytes_per_token"] == values * bytes_per_value


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_matches_transformers(checkpoints, variant):
    """fp32: 32 greedy steps give transformers' greedy generate tokens."""
    path = checkpoints(variant, "causal", "float32")
    ids = prompt(3, 101)
    out = corral.LLM(path, block_size=8).generate([ids], corral.SamplingParams(max_tokens=32, ignore_eos=True))
    ref = reference_greedy(load_reference(path, "causal"), ids, 32)
    assert out[0].outputs[0].token_ids == ref
    assert out[0].outputs[0].finish_reason == "length"


@pytest.mark.parametrize("variant", VARIANTS)
def test_batched_prompts_match_alone(checkpoints, variant):
    """4 prompts of different lengths run as one ragged batch: each gets its logits from alone."""
    path = checkpoints(variant, "causal", "float32")
    prompts = [prompt(10 + i, n) for i, n in enumerate((1, 17, 64, 131))]
    llm = corral.LLM(path, block_size=16, max_num_batched_tokens=100)  # pieces straddle prompts
    batched = llm.logits(prompts)
    for p, got in zip(prompts, batched):
        np.testing.assert_array_equal(got, llm.logits(p))


@pytest.mark.parametrize("variant", VARIANTS)
def test_batched_generation_matches_alone(checkpoints, variant):
    """Prefill and decode mixed in one step: each request's greedy tokens equal running it alone."""
    path = checkpoints(variant, "causal", "float32")
    prompts = [prompt(20 + i, n) for i, n in enumerate((5, 33, 70, 120))]
    params = corral.SamplingParams(max_tokens=12, ignore_eos=True)
    llm = corral.LLM(path, max_num_batched_tokens=64)
    batched = llm.generate(prompts, params)
    for p, out in zip(prompts, batched):
        assert out.prompt_token_ids == p
        assert out.outputs[0].token_ids == llm.generate([p], params)[0].outputs[0].token_ids


@pytest.mark.parametrize("variant", VARIANTS)
def test_expert_load_statistics(checkpoints, variant):
    """LLM.stats()['moe_expert_tokens'] counts, per MoE layer, the tokens transformers' router sends
    to each expert (its top-k of the router logits), cumulatively over calls."""
    path = checkpoints(variant, "causal", "float32")
    ids = prompt(5, 57)
    llm = corral.LLM(path)
    llm.logits(ids)
    llm.logits(ids)
    model = load_reference(path, "causal")
    with torch.no_grad():
        routers = model(input_ids=torch.tensor([ids]), output_router_logits=True).router_logits
    moe_layers = [i for i, layer in enumerate(llm.config["layers"]) if layer["moe"]]
    counts = llm.stats()["moe_expert_tokens"]
    assert sorted(counts) == moe_layers and len(routers) == len(moe_layers)
    top_k = llm.config["top_k"]
    for layer, logits in zip(moe_layers, routers):
        chosen = torch.topk(logits.reshape(len(ids), -1), top_k, dim=1).indices.flatten()
        expected = 2 * torch.bincount(chosen, minlength=llm.config["num_experts"])
        assert counts[layer] == expected.tolist()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunked_prefill_long_prompt(tmp_path, dtype):
    """A 1,000-token prompt prefilled in pieces of 128 tokens (chunk 32: 31 chunk boundaries;
    temperature tuning active on the NoPE layers) matches transformers' logits at the last 10
    positions, and generation from it starts with transformers' greedy token."""
    path = build("chunked", "causal", getattr(torch, dtype), tmp_path, attention_chunk_size=32)
    ids = prompt(6, 1000)
    llm = corral.LLM(path, max_num_batched_tokens=128, kv_cache_dtype="float32", dtype="float32")
    got = llm.logits(ids)[-10:]
    ref = reference_logits(load_reference(path, "causal"), ids)[-10:]
    assert rel_err(got, ref) <= (1e-4 if dtype == "float32" else 2e-2)
    first = llm.generate([ids], corral.SamplingParams(max_tokens=1))[0].outputs[0].token_ids
    assert first == [int(np.argmax(ref[-1]))]
    # logits() cached the prompt's 62 full blocks of 16: generate prefills only the last 8 tokens.
    assert llm.stats()["prefix_cache_hit_tokens"] == 992
    assert llm.stats()["prefill_tokens_computed"] == 1000 + 8
