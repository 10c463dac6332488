"""Text generation end to end on a tiny random model with the tiny Llama 4 tokenizer in its folder:
text and chat prompts, streaming, stop strings and stop tokens, n samples, and the token-id API
without a tokenizer. References: transformers' tokenizer and chat template, the full decode of
the generated tokens, and greedy runs."""

import json
import shutil

import pytest
import torch
from transformers import AutoTokenizer

import corral
import tiny_tokenizer as tt
from tiny_models import VOCAB, build

GREEDY = dict(max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = build("scout", "causal", torch.float32, tmp_path_factory.mktemp("scout_text"))
    return tt.save(path)


@pytest.fixture(scope="module")
def llm(model_dir):
    return corral.LLM(model_dir, block_size=4)


@pytest.fixture(scope="module")
def hf_tok(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def no_requests_left(llm):
    stats = llm.stats()
    return stats["requests_waiting"] == 0 and stats["requests_running"] == 0


def test_generate_from_text(llm, hf_tok):
    prompt = "The quick brown fox"
    out = llm.generate(prompt, corral.SamplingParams(**GREEDY))[0]
    assert out.prompt == prompt
    assert out.prompt_token_ids == hf_tok.encode(prompt) and out.prompt_token_ids.count(tt.BOS) == 1
    by_ids = llm.generate([out.prompt_token_ids], corral.SamplingParams(**GREEDY))[0].outputs[0]
    completion = out.outputs[0]
    assert completion.token_ids == by_ids.token_ids and len(completion.token_ids) == 10
    assert completion.text == hf_tok.decode(completion.token_ids, skip_special_tokens=True)
    assert (completion.finish_reason, completion.stop_reason) == ("length", None)
    assert by_ids.text == completion.text and out.finished


def test_prompt_forms_and_order(llm, hf_tok):
    ids = hf_tok.encode("Return a list")
    prompts = ["Hello there", {"prompt": "Return a list"}, {"prompt_token_ids": ids}, ids, "<|begin_of_text|>Hi"]
    outs = llm.generate(prompts, corral.SamplingParams(max_tokens=3, ignore_eos=True))
    assert [o.prompt for o in outs] == ["Hello there", "Return a list", None, None, "<|begin_of_text|>Hi"]
    assert outs[1].prompt_token_ids == outs[2].prompt_token_ids == outs[3].prompt_token_ids == ids
    assert outs[1].outputs[0].token_ids == outs[2].outputs[0].token_ids == outs[3].outputs[0].token_ids
    assert outs[4].prompt_token_ids == hf_tok.encode("Hi")  # a prompt that starts with the BOS gets no second one
    alone = llm.generate("Hello there", corral.SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert alone.outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_chat(llm, hf_tok):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
    ]
    out = llm.chat(messages, corral.SamplingParams(**GREEDY))[0]
    expected = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert out.prompt_token_ids == expected and expected.count(tt.BOS) == 1
    assert out.prompt == hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert out.outputs[0].token_ids == llm.generate([expected], corral.SamplingParams(**GREEDY))[0].outputs[0].token_ids
    other = [{"role": "user", "content": "Hi"}]
    both = llm.chat([messages, other], corral.SamplingParams(**GREEDY))
    assert [o.prompt_token_ids for o in both] == [
        expected,
        hf_tok.apply_chat_template(other, add_generation_prompt=True, tokenize=True, return_dict=False),
    ]
    assert both[0].outputs[0].token_ids == out.outputs[0].token_ids


def test_stream_adds_up_to_the_text(llm, hf_tok):
    params = corral.SamplingParams(max_tokens=16, ignore_eos=True)
    prompt = "日本語のテキスト"
    stream = llm.stream(prompt, params)
    deltas = []
    while True:
        try:
            deltas.append(next(stream))
        except StopIteration as stop:
            final = stop.value
            break
    assert all(deltas)
    reference = llm.generate(prompt, params)[0].outputs[0]
    assert final.outputs[0].token_ids == reference.token_ids
    assert "".join(deltas) == final.outputs[0].text == reference.text
    assert reference.text == hf_tok.decode(reference.token_ids, skip_special_tokens=True)
    assert no_requests_left(llm)


def test_stream_interleaved_with_generate_and_closed_early(llm):
    params = corral.SamplingParams(max_tokens=12, ignore_eos=True)
    alone = llm.generate("Hello", params)[0].outputs[0].text
    stream = llm.stream("Hello", params)
    first = next(stream)
    # A generate call while the stream is open advances both; the stream's text is not lost.
    other = llm.generate("Return", corral.SamplingParams(max_tokens=20, ignore_eos=True))[0]
    assert len(other.outputs[0].token_ids) == 20
    assert first + "".join(stream) == alone
    closed = llm.stream("Hello", params)
    next(closed)
    closed.close()
    assert no_requests_left(llm)


def stop_string_of(llm, prompt, params):
    """A free run and a stop string in its text that spans a token boundary."""
    tok = llm.get_tokenizer()
    run = llm.generate(prompt, params)[0].outputs[0]
    text = run.text
    bounds = {len(tok.decode(run.token_ids[:k], skip_special_tokens=True)) for k in range(1, len(run.token_ids))}
    for at in range(1, len(text) - 3):
        stop = text[at : at + 3]
        if "\ufffd" not in stop and text.find(stop) == at and any(at < b < at + 3 for b in bounds):
            return run, stop
    pytest.skip("no stop string candidate in this run")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string(llm, include):
    params = corral.SamplingParams(max_tokens=24, ignore_eos=True)
    prompt = "The lazy dog"
    run, stop = stop_string_of(llm, prompt, params)
    at = run.text.find(stop)
    stopped = corral.SamplingParams(max_tokens=24, ignore_eos=True, stop=["never in the text", stop])
    stopped.include_stop_str_in_output = include
    out = llm.generate(prompt, stopped)[0].outputs[0]
    assert out.text == run.text[: at + len(stop) if include else at]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    assert out.token_ids == run.token_ids[: len(out.token_ids)] and len(out.token_ids) < len(run.token_ids)
    assert "".join(llm.stream(prompt, stopped)) == out.text
    assert no_requests_left(llm)
    absent = llm.generate(prompt, corral.SamplingParams(max_tokens=24, ignore_eos=True, stop=["never in the text"]))
    assert absent[0].outputs[0].text == run.text and absent[0].outputs[0].finish_reason == "length"


def free_run_and_new_token(llm, prompt):
    run = llm.generate(prompt, corral.SamplingParams(max_tokens=10, ignore_eos=True))[0].outputs[0].token_ids
    first = next(i for i in range(1, len(run)) if run[i] not in run[:i])  # a token new at step i
    return run, first


def test_generation_config_eos_is_honored(model_dir, tmp_path):
    llm = corral.LLM(model_dir)
    prompt = "Hello there"
    run, first = free_run_and_new_token(llm, prompt)
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "generation_config.json").read_text())
    config["eos_token_id"] = [tt.END_OF_TEXT, run[first]]
    (copy / "generation_config.json").write_text(json.dumps(config))
    llm = corral.LLM(copy)
    assert run[first] in llm.stop_token_ids
    out = llm.generate(prompt, corral.SamplingParams(max_tokens=10))[0].outputs[0]
    assert out.token_ids == run[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", None)
    tok = llm.get_tokenizer()
    assert out.text == tok.decode(run[:first], skip_special_tokens=True)  # the stop token's text is left out
    kept = llm.generate(prompt, corral.SamplingParams(max_tokens=10, include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == tok.decode(run[: first + 1], skip_special_tokens=True)
    assert llm.generate(prompt, corral.SamplingParams(max_tokens=10, ignore_eos=True))[0].outputs[0].token_ids == run


def test_tokenizer_eos_token_is_honored(model_dir, tmp_path):
    """The tokenizer's eos_token stops generation (a base tokenizer's <|end_of_text|>, an instruct
    one's <|eot|>; here an ordinary token the model is known to produce)."""
    llm = corral.LLM(model_dir)
    prompt = "Return a list"
    run, first = free_run_and_new_token(llm, prompt)
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    tt.save(copy, eos_token=llm.get_tokenizer().id_to_token(run[first]))
    llm = corral.LLM(copy)
    assert llm.get_tokenizer().eos_token_id == run[first]
    assert set(llm.stop_token_ids) == {tt.END_OF_TEXT, tt.EOM, tt.EOT, run[first]}
    out = llm.generate(prompt, corral.SamplingParams(max_tokens=10))[0].outputs[0]
    assert out.token_ids == run[: first + 1] and out.finish_reason == "stop"


def test_stop_token_ids_give_stop_reason(llm):
    prompt = "Hello there"
    run, first = free_run_and_new_token(llm, prompt)
    out = llm.generate(prompt, corral.SamplingParams(max_tokens=10, stop_token_ids=[run[first]]))[0].outputs[0]
    assert out.token_ids == run[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", run[first])


def test_end_of_turn_tokens_reach_the_engine(llm):
    """<|eot|>, <|eom|> and <|end_of_text|> end generation; ignore_eos keeps going past them."""
    assert {tt.END_OF_TEXT, tt.EOM, tt.EOT} <= set(llm.stop_token_ids)


def test_n_samples(llm):
    params = corral.SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    out = llm.generate(["Hello", "The quick brown"], params)
    tok = llm.get_tokenizer()
    for request in out:
        assert [c.index for c in request.outputs] == [0, 1, 2]
        for c in request.outputs:
            assert len(c.token_ids) == 8 and c.finish_reason == "length"
            assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
        assert len({tuple(c.token_ids) for c in request.outputs}) > 1
    again = llm.generate(["Hello", "The quick brown"], params)
    assert [[c.token_ids for c in r.outputs] for r in again] == [[c.token_ids for c in r.outputs] for r in out]
    greedy = llm.generate("Hello", corral.SamplingParams(n=2, max_tokens=6, ignore_eos=True))[0].outputs
    single = llm.generate("Hello", corral.SamplingParams(max_tokens=6, ignore_eos=True))[0].outputs[0]
    assert greedy[0].token_ids == greedy[1].token_ids == single.token_ids


def test_n_samples_with_a_stop_string(llm):
    """A stop string ends the sample that produced it; the others run on."""
    params = corral.SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=16, ignore_eos=True)
    free = llm.generate("Hello", params)[0].outputs
    text = free[0].text
    stop = next(text[a : a + 2] for a in range(len(text) - 2) if "\ufffd" not in text[a : a + 2])
    stopped = llm.generate("Hello", corral.SamplingParams(**{**params.__dict__, "stop": [stop]}))[0].outputs
    for f, s in zip(free, stopped, strict=True):
        if stop in f.text:
            assert s.text == f.text[: f.text.find(stop)] and s.stop_reason == stop and s.finish_reason == "stop"
        else:
            assert s.text == f.text and s.finish_reason == "length"
    assert stopped[0].stop_reason == stop
    assert no_requests_left(llm)


@pytest.mark.parametrize(
    "params",
    [dict(top_k=1), dict(top_k=-1, top_p=1e-6), dict(min_p=1.0)],
    ids=["top_k_1", "top_p_tiny", "min_p_1"],
)
def test_sampling_filters_that_leave_the_most_likely_token(llm, params):
    """Sampling at temperature 1 from a filter that keeps only the most likely token is greedy."""
    greedy = llm.generate("The quick brown", corral.SamplingParams(max_tokens=8, ignore_eos=True))[0].outputs[0]
    sampled = llm.generate(
        "The quick brown", corral.SamplingParams(temperature=1.0, seed=5, max_tokens=8, ignore_eos=True, **params)
    )[0].outputs[0]
    assert sampled.token_ids == greedy.token_ids


def test_logprobs_with_text(llm):
    out = llm.generate("Hello", corral.SamplingParams(max_tokens=4, ignore_eos=True, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == 4
    for token, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert token in entry and all(lp <= 0 for lp in entry.values())


def test_detokenize_off_and_special_tokens_kept(llm):
    params = corral.SamplingParams(max_tokens=6, ignore_eos=True)
    text = llm.generate("Hello", params)[0].outputs[0]
    off = llm.generate("Hello", corral.SamplingParams(max_tokens=6, ignore_eos=True, detokenize=False))[0].outputs[0]
    assert off.token_ids == text.token_ids and off.text == ""
    tok = llm.get_tokenizer()
    runs = {
        skip: llm.generate(
            "Return a list", corral.SamplingParams(max_tokens=16, ignore_eos=True, skip_special_tokens=skip)
        )[0].outputs[0]
        for skip in (True, False)
    }
    assert tt.SPECIAL_TOKENS.index("<|python_end|>") in runs[True].token_ids  # this model writes it here
    assert runs[True].token_ids == runs[False].token_ids
    assert "<|python_end|>" in runs[False].text and "<|python_end|>" not in runs[True].text
    for skip, out in runs.items():
        assert out.text == tok.decode(out.token_ids, skip_special_tokens=skip)


def test_failed_call_aborts_its_requests(llm):
    with pytest.raises(corral.InvalidInputError, match=f"token id {VOCAB + 5}"):
        llm.generate(["Hello", [5, 6, VOCAB + 5]], corral.SamplingParams(max_tokens=4, stop=["x"]))
    assert no_requests_left(llm)
    assert len(llm.generate("Hello", corral.SamplingParams(max_tokens=2, ignore_eos=True))[0].outputs[0].token_ids) == 2


def test_without_tokenizer(model_dir, tmp_path):
    ids_only = tmp_path / "ids_only"
    ids_only.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(model_dir / name, ids_only / name)
    for llm in (corral.LLM(ids_only), corral.LLM(model_dir, skip_tokenizer_init=True)):
        assert llm.get_tokenizer() is None
        out = llm.generate([[1, 61, 81]], corral.SamplingParams(max_tokens=3, ignore_eos=True))[0].outputs[0]
        assert len(out.token_ids) == 3 and out.text == ""
        calls = (
            (llm.generate, "hello"),
            (llm.generate, [[1, 2]], corral.SamplingParams(stop=["x"])),
            (llm.chat, [{"role": "user", "content": "hi"}]),
            (llm.stream, [1, 61, 81]),
        )
        for call, *args in calls:
            with pytest.raises(corral.NoTokenizerError, match="tokenizer") as e:
                call(*args)
            assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, NotImplementedError)
    with pytest.raises(FileNotFoundError, match=str(ids_only / "tokenizer.json")):
        corral.LLM(model_dir, tokenizer=ids_only)


def test_default_sampling_params_from_generation_config(model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "generation_config.json").read_text())
    config.update(temperature=0.6, top_p=0.9, top_k=20, max_new_tokens=7, do_sample=True)
    (copy / "generation_config.json").write_text(json.dumps(config))
    llm = corral.LLM(copy)
    params = llm.get_default_sampling_params()
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (0.6, 0.9, 20, 7)
    out = llm.generate("Hello")[0].outputs[0]
    assert len(out.token_ids) <= 7
    assert corral.LLM(model_dir).get_default_sampling_params() == corral.SamplingParams()


def test_sampling_params_validation():
    assert corral.SamplingParams(stop="x").stop == ["x"]
    assert corral.SamplingParams(top_k=-1).top_k == 0
    for bad in (
        dict(n=0),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(min_p=-0.1),
        dict(top_k=-2),
        dict(repetition_penalty=0.0),
        dict(presence_penalty=3.0),
        dict(min_tokens=20, max_tokens=10),
        dict(stop=[""]),
        dict(stop=["x"], detokenize=False),
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            corral.SamplingParams(**bad)
