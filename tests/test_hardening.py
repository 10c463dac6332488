"""Bad checkpoints, bad arguments and concurrent callers get clear exceptions or correct results,
never a crash, a hang or another request's damage."""

import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

import corral
from checkpoint_files import copy_checkpoint, edit_text_config, read_config, write_config
from corral.llm import DEMO_MODEL
from test_kv_cache import tiny_config
from tiny_models import VOCAB, build

GREEDY = corral.SamplingParams(max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def demo():
    return corral.LLM(num_threads=2)


@pytest.fixture
def demo_copy(tmp_path):
    return copy_checkpoint(DEMO_MODEL, tmp_path / "demo")


def load_error(folder, error):
    with pytest.raises(error) as e:
        corral.LLM(folder)
    return str(e.value)


# ---------------------------------------------------------------------------- checkpoint values


@pytest.mark.parametrize("eos", [10**6, -3, [2, 99999]])
def test_eos_outside_the_vocabulary_is_a_config_error(demo_copy, eos):
    """It used to be accepted, and generating with min_tokens > 0 wrote outside the logits."""
    edit_text_config(demo_copy, eos_token_id=eos)
    message = load_error(demo_copy, corral.ConfigError)
    assert "eos_token_id" in message and "outside the vocabulary" in message and "config.json" in message


def test_head_dim_derived_as_zero_is_a_config_error(demo_copy):
    edit_text_config(demo_copy, head_dim=None, hidden_size=4, num_attention_heads=8, num_key_value_heads=8)
    message = load_error(demo_copy, corral.ConfigError)
    assert "head_dim" in message and "is 0" in message


@pytest.mark.parametrize("field", ["unused_field", "rope_parameters", "vocab_size"])
def test_deeply_nested_config_is_a_config_error(demo_copy, field):
    """A config.json nested 100,000 deep (a field Corral ignores, reads as an object, or reads as a
    number) used to crash the process printing the value; error messages stay short."""
    text = json.dumps(read_config(demo_copy))
    (demo_copy / "config.json").write_text(text[:-1] + f', "{field}": ' + "[" * 100_000 + "]" * 100_000 + "}")
    message = load_error(demo_copy, corral.ConfigError)
    assert "nests JSON deeper than 64 levels" in message and len(message) < 300


def test_long_bad_values_are_cut_in_messages(demo_copy):
    edit_text_config(demo_copy, vocab_size="x" * 100_000)
    message = load_error(demo_copy, corral.ConfigError)
    assert "vocab_size" in message and len(message) < 400


@pytest.mark.parametrize(
    "content",
    ["[" * 100_000 + "]" * 100_000, '{"eos_token_id": "two"}', '{"temperature": "hot"}', '{"top_p": 7}', "[1, 2]"],
    ids=["deep", "eos-string", "temperature-string", "top_p-range", "not-object"],
)
def test_bad_generation_config_is_a_config_error(demo_copy, content):
    (demo_copy / "generation_config.json").write_text(content)
    message = load_error(demo_copy, corral.ConfigError)
    assert "generation_config.json" in message and len(message) < 400


def test_deep_safetensors_header_is_a_corrupt_checkpoint_error(demo_copy):
    path = demo_copy / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    text = json.dumps(header)[:-1] + ', "__metadata__": ' + "[" * 50_000 + "]" * 50_000 + "}"
    path.write_bytes(len(text).to_bytes(8, "little") + text.encode() + raw[8 + n :])
    message = load_error(demo_copy, corral.CorruptCheckpointError)
    assert "model.safetensors" in message and "deeper than 64" in message


# ----------------------------------------------------------------------------- request values


def test_bad_sampling_values_name_the_field():
    for kwargs, field in [
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"n": 2.5}, "n"),
        ({"max_tokens": 10**30}, "max_tokens"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"seed": "x"}, "seed"),
        ({"presence_penalty": float("inf")}, "presence_penalty"),
    ]:
        with pytest.raises(corral.InvalidInputError, match=field):
            corral.SamplingParams(**kwargs)


def test_n_is_bounded_by_max_num_seqs(demo):
    with pytest.raises(corral.InvalidInputError, match="max_num_seqs"):
        demo.generate([[1, 2, 3]], corral.SamplingParams(n=257, max_tokens=2))
    assert demo.stats()["requests_waiting"] == demo.stats()["requests_running"] == 0


# ------------------------------------------------------------------------------ concurrency


def test_threads_sharing_one_llm_get_their_solo_results(demo):
    """Three threads calling generate() at once (it used to crash) and one streaming: every
    request's greedy tokens equal its solo run's, and no KV block leaks."""
    prompts = [[1, 5 + i, 9, 13 + 2 * i, 40 + i] for i in range(7)]
    solo = [demo.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]
    free = demo.stats()["kv_blocks_free"]
    results, errors = {}, []

    def generate(i):
        try:
            out = demo.generate([prompts[2 * i], prompts[2 * i + 1]], GREEDY)
            results[i] = [o.outputs[0].token_ids for o in out]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def stream():
        try:
            gen = demo.stream(prompts[6], GREEDY)
            while True:
                next(gen)
        except StopIteration as stop:
            results["stream"] = stop.value.outputs[0].token_ids
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    for _ in range(2):
        threads = [threading.Thread(target=generate, args=(i,)) for i in range(3)] + [threading.Thread(target=stream)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors and not any(t.is_alive() for t in threads)
        assert [x for i in range(3) for x in results[i]] + [results["stream"]] == solo
        stats = demo.stats()
        assert stats["requests_running"] == stats["requests_waiting"] == 0
        assert stats["kv_blocks_free"] == free


# --------------------------------------------------------------------------------- bindings


def test_block_manager_page_indices_are_checked():
    bm = corral._core.BlockManager(8, 4, ["global"])
    for page in (-1, 8, 2**31 - 1):
        with pytest.raises(corral.InvalidInputError, match="outside"):
            bm.refcount(page)
        with pytest.raises(corral.InvalidInputError, match="outside"):
            bm.is_cached(page)
    assert bm.refcount(7) == 0 and not bm.is_cached(0)


def test_kv_write_into_a_released_local_block_is_refused(tmp_path):
    layout = corral._core.KvLayout.from_config(str(tiny_config(tmp_path, attention_chunk_size=16)), 4, "float32")
    kv = corral._core.KvCache(layout, 64 * layout.page_bytes)
    kv.blocks.add(0, [1])
    assert kv.append(0, 40)
    kv.blocks.commit(0, list(range(40)))  # the local groups release the blocks before chunk 32..
    assert kv.append(0, 1)
    rows = np.zeros((1, 8), np.float32)
    with pytest.raises(corral.InvalidInputError, match="released"):
        kv.write(0, 3, rows, rows)
    kv.write(0, 40, rows, rows)  # the current chunk is writable


def test_paged_attention_rejects_decreasing_seq_starts():
    ops = corral._core.ops
    k, v = np.zeros((4, 1, 8, 4), np.float32), np.zeros((4, 1, 4, 8), np.float32)
    q = np.zeros((3, 2, 8), np.float32)
    tables = np.zeros((2, 4), np.int32)
    with pytest.raises(corral.ShapeError, match="seq_starts must not decrease"):
        ops.paged_attention(q, k, v, "float32", np.array([0, 4, 3], np.int32), np.zeros(3, np.int32), tables, 1.0, 0)
    out = ops.paged_attention(q, k, v, "float32", np.array([0, 2, 3], np.int32), np.zeros(3, np.int32), tables, 1.0, 0)
    assert out.shape == q.shape


def test_fp8_block_first_written_past_offset_0_terminates(tmp_path):
    """A block's scale is set by its first write; a first write at a later slot used to loop
    forever growing a zero scale. It now sets the scale, and attention reads the tokens back."""
    code = textwrap.dedent(f"""
        import numpy as np, corral
        from test_kv_cache import tiny_config
        import pathlib
        layout = corral._core.KvLayout.from_config(str(tiny_config(pathlib.Path({str(tmp_path)!r}))), 16, "fp8")
        kv = corral._core.KvCache(layout, 64 * layout.page_bytes)
        kv.blocks.add(0, [1])
        assert kv.append(0, 10)
        rng = np.random.default_rng(0)
        k, v = rng.standard_normal((2, 5, 8)).astype(np.float32)
        kv.write(0, 5, k, v)
        q = rng.standard_normal((2, 8)).astype(np.float32)
        out = kv.attend(0, 3, q, 0.5)
        keys = np.concatenate([np.zeros((5, 8)), k]); values = np.concatenate([np.zeros((5, 8)), v])
        s = q.astype(np.float64) @ keys.T * 0.5
        w = np.exp(s - s.max(1, keepdims=True)); w /= w.sum(1, keepdims=True)
        err = np.abs(out - w @ values).max() / np.abs(w @ values).max()
        assert err < 0.1, err
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


# ------------------------------------------------------------------------------ memory limits


def test_default_kv_budget_stays_within_the_cgroup_limit(tmp_path, monkeypatch):
    """Under a memory cgroup (a fake v2 hierarchy here) the default KV budget is half of what the
    limit leaves, not half of the host's memory; with nothing left, loading says so."""
    usage = 3 * 2**30
    (tmp_path / "memory.current").write_text(str(usage))
    (tmp_path / "memory.max").write_text(str(usage + 64 * 2**20))
    monkeypatch.setenv("CORRAL_CGROUP_ROOT", str(tmp_path))
    stats = corral.LLM().stats()
    assert 0 < stats["kv_blocks_total"] * stats["kv_block_bytes"] <= 32 * 2**20
    (tmp_path / "memory.max").write_text(str(usage - 1))
    with pytest.raises(corral.OutOfKVCacheError, match="cgroup"):
        corral.LLM()
    (tmp_path / "memory.max").write_text("max")  # no limit: the host's memory decides
    stats = corral.LLM().stats()
    assert stats["kv_blocks_total"] * stats["kv_block_bytes"] > 64 * 2**20


def test_kv_budget_beyond_memory_is_refused_at_load():
    """Its pages would be committed as written, until the kernel killed the process."""
    with pytest.raises(corral.OutOfKVCacheError, match="kv_cache_bytes"):
        corral.LLM(kv_cache_bytes=2**50)


@pytest.fixture(scope="module")
def chunked_model(tmp_path_factory):
    return build("chunked", "causal", torch.float32, tmp_path_factory.mktemp("chunked_hardening"))


def test_prompt_logprobs_are_the_log_softmax_of_the_logits(chunked_model):
    llm = corral.LLM(chunked_model, max_num_batched_tokens=37)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, VOCAB, size=n).tolist() for n in (90, 1, 33)]
    for prompt, got, logits in zip(prompts, llm._engine.prompt_logprobs(prompts), llm.logits(prompts)):
        z = logits.astype(np.float64)
        lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
        want = z[np.arange(len(prompt) - 1), prompt[1:]] - lse[:-1]
        np.testing.assert_allclose(got[:-1], want, rtol=1e-12, atol=1e-12)
        assert np.isnan(got[-1])


def test_perplexity_holds_one_pass_of_logits():
    """A window of 3,000 tokens on the demo model (vocabulary 8,192) used to ask for all its logits
    at once, 98 MB, plus float64 copies; now one pass of max_num_batched_tokens rows at a time
    (4 MB). Measured in a fresh process: the peak RSS after loading, then after perplexity()."""
    code = textwrap.dedent("""
        import resource, numpy as np, corral
        llm = corral.LLM(max_num_batched_tokens=128, num_threads=2)
        ids = np.random.default_rng(7).integers(3, 8000, size=3000).tolist()
        llm._tokenizer = type("Ids", (), {"encode": staticmethod(lambda _: ids)})()
        corral.perplexity(llm, "", window=300)  # warm-up: buffers of one pass
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = corral.perplexity(llm, "", window=3000)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        assert result.tokens == 2999 and np.isfinite(result.perplexity), result
        print(grown * 1024)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) < 24 * 2**20
