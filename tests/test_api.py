"""The Python API: generation controls, limits, and bad input that must fail cleanly."""

import json
import shutil

import numpy as np
import pytest
import torch

import corral
from tiny_models import VOCAB, build


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build("scout", "causal", torch.float32, tmp_path_factory.mktemp("scout"))


@pytest.fixture(scope="module")
def llm(model_path):
    return corral.LLM(model_path, block_size=4)


def ids(seed, n):
    return np.random.default_rng(seed).integers(3, VOCAB, size=n).tolist()


def test_stop_token_ends_generation(llm):
    """A stop token id ends the request with finish_reason 'stop' and is kept in the output."""
    p = ids(0, 9)
    free_run = llm.generate([p], corral.SamplingParams(max_tokens=6, ignore_eos=True))[0].outputs[0].token_ids
    stop = free_run[3]
    out = llm.generate([p], corral.SamplingParams(max_tokens=6, stop_token_ids=[stop]))[0].outputs[0]
    first = free_run.index(stop)
    assert out.token_ids == free_run[: first + 1]
    assert out.finish_reason == "stop"


def test_eos_stops_unless_ignored(model_path, tmp_path):
    """The config's eos ids (an int or a list) stop generation; ignore_eos runs to max_tokens."""
    p = ids(4, 7)  # a prompt whose continuation does not just repeat one token
    run = corral.LLM(model_path).generate([p], corral.SamplingParams(max_tokens=8, ignore_eos=True))[0]
    run = run.outputs[0].token_ids
    first = next(i for i in range(1, len(run)) if run[i] not in run[:i])  # a token new at step i
    eos = run[first]
    copy = tmp_path / "model"
    shutil.copytree(model_path, copy)
    config = json.loads((copy / "config.json").read_text())
    config["eos_token_id"] = [VOCAB - 1, eos]
    (copy / "config.json").write_text(json.dumps(config))
    llm = corral.LLM(copy)
    out = llm.generate([p], corral.SamplingParams(max_tokens=8))[0].outputs[0]
    assert out.token_ids == run[: first + 1] and out.finish_reason == "stop"
    out = llm.generate([p], corral.SamplingParams(max_tokens=8, ignore_eos=True))[0].outputs[0]
    assert out.token_ids == run and out.finish_reason == "length"


def test_seeded_sampling_reproducible_and_batch_independent(llm):
    """With a seed, temperature sampling gives the same tokens alone, again, and inside a batch."""
    p = ids(2, 11)
    params = corral.SamplingParams(temperature=1.5, max_tokens=10, ignore_eos=True, seed=1234)
    alone = llm.generate([p], params)[0].outputs[0].token_ids
    again = llm.generate([p], params)[0].outputs[0].token_ids
    batch = llm.generate(
        [ids(3, 5), p, ids(4, 30)], [corral.SamplingParams(temperature=0.7, max_tokens=4, seed=1), params, params]
    )
    assert alone == again == batch[1].outputs[0].token_ids
    other_seed = llm.generate([p], corral.SamplingParams(temperature=1.5, max_tokens=10, ignore_eos=True, seed=99))
    assert other_seed[0].outputs[0].token_ids != alone


def test_outputs_in_prompt_order(llm):
    prompts = [ids(5, 40), ids(6, 3), ids(7, 17)]
    outs = llm.generate(prompts, corral.SamplingParams(max_tokens=3, ignore_eos=True))
    assert [o.prompt_token_ids for o in outs] == prompts
    assert all(o.finished and len(o.outputs[0].token_ids) == 3 for o in outs)


def test_generation_stops_at_max_model_len(model_path):
    llm = corral.LLM(model_path, max_model_len=20)
    out = llm.generate([ids(8, 15)], corral.SamplingParams(max_tokens=100, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_prompt_longer_than_context(model_path):
    llm = corral.LLM(model_path, max_model_len=16)
    with pytest.raises(corral.InvalidInputError, match="max_model_len 16"):
        llm.generate([ids(9, 16)])
    with pytest.raises(ValueError, match="over max_model_len 16"):
        llm.logits(ids(9, 17))


def test_bad_token_id_rejected_and_engine_unharmed(llm):
    """An out-of-vocabulary id fails the call, names the id, and leaves the engine clean."""
    baseline = llm.stats()
    with pytest.raises(corral.InvalidInputError, match=f"token id {VOCAB} at index 2"):
        llm.generate([ids(10, 4), [5, 6, VOCAB, 7]])
    with pytest.raises(corral.InvalidInputError, match="token id -1"):
        llm.logits([3, -1])
    assert llm.stats() == baseline
    p = ids(11, 6)
    assert len(llm.generate([p], corral.SamplingParams(max_tokens=2))[0].outputs[0].token_ids) >= 1


def test_out_of_kv_cache(model_path):
    """A KV budget too small for a request gives OutOfKVCacheError, frees what it took, and later
    calls work; requests that only do not fit together take turns (preemption)."""
    # The scout model's 4 layers form 4 layer groups (1 global, 3 chunked) of one layer each, so
    # a sequence takes 4 blocks (one per group) per 4 tokens: 24 blocks hold 24 tokens.
    block_bytes = corral.LLM(model_path, block_size=4).stats()["kv_block_bytes"]
    llm = corral.LLM(model_path, block_size=4, kv_cache_bytes=24 * block_bytes)
    total = llm.stats()["kv_blocks_total"]
    assert total == 24
    with pytest.raises(corral.OutOfKVCacheError, match="KV"):
        llm.logits(ids(12, 25))
    with pytest.raises(MemoryError):
        llm.generate([ids(13, 30)])
    # Two requests that fit alone but not together: one is preempted and recomputed, and both
    # give what they give alone.
    two = [ids(14, 10), ids(15, 10)]
    params = corral.SamplingParams(max_tokens=10, ignore_eos=True)
    together = [o.outputs[0].token_ids for o in llm.generate(two, params)]
    assert llm.stats()["preemptions"] > 0
    assert together == [llm.generate([p], params)[0].outputs[0].token_ids for p in two]
    assert llm.stats()["kv_blocks_free"] == total
    assert llm.logits(ids(16, 24)).shape == (24, VOCAB)
    assert llm.stats()["kv_blocks_free"] == total


def test_text_prompts_need_a_tokenizer(llm):
    with pytest.raises(NotImplementedError, match="tokenizer"):
        llm.generate(["hello"])


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(block_size=0), "block_size"),
        (dict(kv_cache_dtype="int4"), "kv_cache_dtype"),
        (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
        (dict(kv_cache_bytes=16), "cannot hold one KV block"),
        (dict(device="tpu"), "'cpu', 'cuda' or 'cuda:N'"),
    ],
)
def test_bad_options(model_path, options, match):
    with pytest.raises(corral.CorralError, match=match):
        corral.LLM(model_path, **options)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:7"], ids=["default-gpu", "gpu-0", "gpu-7"])
def test_cuda_device(model_path, device):
    """Without a usable GPU: DeviceError naming the reason, before anything loads. With one, the
    model loads there (tests/test_model_cuda.py checks what it computes)."""
    if int(device.partition(":")[2] or 0) < corral._core.cuda_device_count():
        assert corral.LLM(model_path, device=device).generate([1, 2, 3], corral.SamplingParams(max_tokens=2))
        return
    with pytest.raises(corral.DeviceError, match=device):
        corral.LLM(model_path, device=device)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda:", "cuda:-1"], ids=["gpu", "letter", "no-index", "negative"])
def test_malformed_device_names(model_path, device):
    with pytest.raises(corral.InvalidInputError, match="device"):
        corral.LLM(model_path, device=device)


def test_unknown_option_is_a_type_error(model_path):
    with pytest.raises(TypeError):
        corral.LLM(model_path, block_sise=16)


def test_sampling_params_validation():
    with pytest.raises(ValueError):
        corral.SamplingParams(temperature=-1)
    with pytest.raises(ValueError):
        corral.SamplingParams(max_tokens=0)


def test_devices_lists_cpu_first():
    assert corral.devices()[0] == "cpu"
    assert corral.devices()[1:] == [f"cuda:{i}" for i in range(corral._core.cuda_device_count())]


def test_memory_info_without_a_gpu():
    """Without a usable GPU, asking for its memory is a DeviceError naming why (the build, the
    driver's message, no device): never a crash."""
    if corral._core.cuda_device_count() > 0:
        pytest.skip("this machine has a GPU: test_memory_info_gpu checks it")
    with pytest.raises(corral.DeviceError, match="device='cuda"):
        corral.memory_info("cuda")


@pytest.mark.parametrize("name", ["cpu", "gpu:0", "cuda:x", "cuda:"], ids=["host", "gpu", "letter", "no-index"])
def test_memory_info_names(name):
    with pytest.raises(corral.InvalidInputError, match="is not 'cuda' or 'cuda:N'"):
        corral.memory_info(name)


@pytest.mark.cuda
def test_memory_info_gpu(model_path):
    """cuda-python's free/total memory; a model on the GPU takes its weights and, by default,
    85% of the memory free after them for its KV cache."""
    free, total = corral.memory_info("cuda:0")
    assert 0 < free <= total
    llm = corral.LLM(model_path, device="cuda:0")
    after, _ = corral.memory_info("cuda:0")
    assert after < free - llm.stats()["weight_bytes"] - 0.8 * (free - llm.stats()["weight_bytes"])
