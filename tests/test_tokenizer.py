"""The tokenizer layer against transformers: encoding, decoding, special tokens and chat templates
(rendered text and token ids), incremental detokenization and stop strings against full decodes."""

import json
import shutil

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

import corral
import tiny_tokenizer as tt
from tiny_models import VOCAB

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.\n\nReturn a new dictionary.",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nnewlines\n\n\n",
    "Ünïcödé façade — naïve café",
    "日本語のテキストです。中文字符和한국어",
    "Emoji: 🙂🎉👍🏽 and a family 👨‍👩‍👧‍👦 and flags 🇫🇷",
    "Привет, мир! Ελληνικά. العربية",
    "numbers 1234567 and 3.14159, code: def f(x): return x**2",
    "",
]
SPECIAL_TEXTS = ["a<|eot|>b", "<|begin_of_text|><|header_start|>user<|header_end|>\n\nhi<|eot|>"]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city <and> its surroundings & more",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city"}},
            "required": ["city"],
        },
    },
}
CONVERSATIONS = {
    "user": [{"role": "user", "content": "What is 2+2?"}],
    "system": [
        {"role": "system", "content": "  You are a helpful assistant.\n"},
        {"role": "user", "content": "Who are you?"},
    ],
    "multi_turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there 👋"},
        {"role": "assistant", "content": "Hello! 日本語も話せます。"},
        {"role": "user", "content": "Tell me a joke."},
    ],
    "content_parts": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this <b>image</b>."}]},
    ],
    "tool_calls": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,  # dropped, as transformers drops None values
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "22 degrees & sunny"},
        {"role": "ipython", "content": {"temperature": 22, "unit": "°C"}},
        {"role": "assistant", "content": "It is 22 °C."},
    ],
}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tt.save(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def legacy_dir(tmp_path_factory):
    return tt.save(tmp_path_factory.mktemp("tok_legacy"), legacy=True)


@pytest.fixture(scope="module", params=["jinja_file", "legacy_config"])
def pair(request, tok_dir, legacy_dir):
    """(ours, transformers') tokenizers of one saved folder: the transformers 5 layout
    (chat_template.jinja) and the older one of the published checkpoints."""
    path = tok_dir if request.param == "jinja_file" else legacy_dir
    return corral.Tokenizer(path), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return corral.Tokenizer(tok_dir)


def test_folder_layouts_differ_as_intended(tok_dir, legacy_dir):
    assert (tok_dir / "chat_template.jinja").is_file()
    assert "chat_template" not in json.loads((tok_dir / "tokenizer_config.json").read_text())
    legacy = json.loads((legacy_dir / "tokenizer_config.json").read_text())
    assert not (legacy_dir / "chat_template.jinja").exists()
    assert "header_start" in legacy["chat_template"] and len(legacy["added_tokens_decoder"]) == len(tt.SPECIAL_TOKENS)


@pytest.mark.parametrize("text", TEXTS + SPECIAL_TEXTS)
def test_encode_decode_match_transformers(pair, text):
    ours, hf = pair
    with_bos = ours.encode(text)
    assert with_bos == hf.encode(text)
    assert with_bos[0] == tt.BOS and with_bos.count(tt.BOS) == 1 + text.count("<|begin_of_text|>")
    assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    for skip in (False, True):
        assert ours.decode(with_bos, skip_special_tokens=skip) == hf.decode(with_bos, skip_special_tokens=skip)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    assert tok.decode(tok.encode(text)) == "<|begin_of_text|>" + text


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=40))
def test_round_trip_any_text(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_special_tokens(pair):
    ours, hf = pair
    assert [ours.bos_token, ours.eos_token, ours.pad_token] == ["<|begin_of_text|>", "<|eot|>", tt.SPECIAL_TOKENS[0]]
    assert [ours.bos_token_id, ours.eos_token_id, ours.pad_token_id] == [hf.bos_token_id, hf.eos_token_id, 0]
    assert hf.pad_token_id == 0
    assert ours.bos_token_id == tt.BOS and ours.eos_token_id == tt.EOT and ours.pad_token_id == tt.PAD
    assert ours.special_tokens_map == hf.special_tokens_map
    assert ours.all_special_tokens == hf.all_special_tokens and ours.all_special_ids == hf.all_special_ids
    assert len(ours) == len(hf) == VOCAB
    assert ours.convert_ids_to_tokens([tt.HEADER_START, tt.HEADER_END]) == ["<|header_start|>", "<|header_end|>"]
    assert ours.convert_tokens_to_ids("<|python_start|>") == hf.convert_tokens_to_ids("<|python_start|>")


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(pair, name, add_generation_prompt):
    ours, hf = pair
    messages = CONVERSATIONS[name]
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    expected = hf.apply_chat_template(
        messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
    )
    assert ids == expected
    assert ids[0] == tt.BOS and ids.count(tt.BOS) == 1  # the template's BOS, and no second one
    assert text.endswith("<|header_start|>assistant<|header_end|>\n\n") == add_generation_prompt


def test_chat_template_spec_example(tok):
    """The example of the Llama 4 spec (§5.2), literally."""
    messages = [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Answer who are you in the form of jeopardy?"},
    ]
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == (
        "<|begin_of_text|><|header_start|>system<|header_end|>\n\nYou are a helpful assistant<|eot|>"
        "<|header_start|>user<|header_end|>\n\nAnswer who are you in the form of jeopardy?<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n"
    )


@pytest.mark.parametrize("in_user_message", [True, False])
def test_chat_template_with_tools(pair, in_user_message):
    ours, hf = pair
    messages = CONVERSATIONS["system"] + [{"role": "user", "content": "And the weather?"}]
    kwargs = dict(tools=[WEATHER_TOOL], add_generation_prompt=True, tools_in_user_message=in_user_message)
    text = ours.apply_chat_template(messages, **kwargs)
    assert text == hf.apply_chat_template(messages, tokenize=False, **kwargs)
    assert '"name": "get_weather"' in text and "<and> its surroundings & more" in text  # tojson: no HTML escapes
    assert ours.apply_chat_template(messages, tokenize=True, **kwargs) == hf.apply_chat_template(
        messages, tokenize=True, return_dict=False, **kwargs
    )


def test_chat_template_batch_and_continue_final_message(pair):
    ours, hf = pair
    batch = [CONVERSATIONS["user"], CONVERSATIONS["multi_turn"]]
    assert ours.apply_chat_template(batch, add_generation_prompt=True) == hf.apply_chat_template(
        batch, tokenize=False, add_generation_prompt=True
    )
    assert ours.apply_chat_template(batch, tokenize=True) == hf.apply_chat_template(
        batch, tokenize=True, return_dict=False
    )
    prefill = CONVERSATIONS["user"] + [{"role": "assistant", "content": "The answer is"}]
    text = ours.apply_chat_template(prefill, continue_final_message=True)
    assert text == hf.apply_chat_template(prefill, tokenize=False, continue_final_message=True)
    assert text.endswith("The answer is")
    with pytest.raises(ValueError):
        ours.apply_chat_template(prefill, continue_final_message=True, add_generation_prompt=True)


def test_chat_template_environment(pair):
    """Custom templates see the same environment: tojson options, strftime_now, namespace, loop
    controls, raise_exception, the special tokens as variables, {% generation %}."""
    ours, hf = pair
    template = (
        "{{ bos_token }}{{ messages | tojson(indent=2, sort_keys=true) }}|{{ strftime_now('%Y') }}|"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{% generation %}{{ m.role }}{% endgeneration %}\n{% endfor %}"
        "{{ ns.n }}|{{ eos_token }}|{{ pad_token }}|{{ custom_var }}"
    )
    messages = CONVERSATIONS["multi_turn"]
    text = ours.apply_chat_template(messages, chat_template=template, custom_var="x<y>")
    assert text == hf.apply_chat_template(messages, tokenize=False, chat_template=template, custom_var="x<y>")
    assert "2|<|eot|>|<|finetune_right_pad|>|x<y>" in text
    failing = "{{ raise_exception('no ' + messages[0].role + ' allowed') }}"
    with pytest.raises(jinja2.TemplateError, match="no system allowed"):
        ours.apply_chat_template(messages, chat_template=failing)
    with pytest.raises(jinja2.TemplateError, match="no first user message"):  # the Llama 4 template's own check
        ours.apply_chat_template([{"role": "system", "content": "s"}], tools=[WEATHER_TOOL])
    with pytest.raises(jinja2.exceptions.SecurityError):  # the sandbox
        ours.apply_chat_template(messages, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(ValueError, match="empty"):
        ours.apply_chat_template([])


def test_named_chat_templates(tok_dir, tmp_path):
    """A list of named templates in tokenizer_config.json, and additional_chat_templates/*.jinja files:
    "tool_use" serves calls with tools, "default" the others, as in transformers."""
    tool_use = "{{ bos_token }}TOOLS:{{ tools | length if tools else 0 }}"
    tool_use += "{% for m in messages %}{{ m.content }}{% endfor %}"
    default = "{{ bos_token }}DEFAULT{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    named = tmp_path / "named"
    shutil.copytree(tok_dir, named)
    (named / "chat_template.jinja").unlink()
    cfg = json.loads((named / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": default}, {"name": "tool_use", "template": tool_use}]
    (named / "tokenizer_config.json").write_text(json.dumps(cfg))
    files = tmp_path / "files"
    shutil.copytree(tok_dir, files)
    (files / "chat_template.jinja").write_text(default)
    (files / "additional_chat_templates").mkdir()
    (files / "additional_chat_templates" / "tool_use.jinja").write_text(tool_use)
    messages = CONVERSATIONS["user"]
    for path in (named, files):
        ours, hf = corral.Tokenizer(path), AutoTokenizer.from_pretrained(path)
        assert ours.chat_template == {"default": default, "tool_use": tool_use}
        for kwargs in ({}, {"tools": [WEATHER_TOOL]}, {"chat_template": "tool_use"}):
            text = ours.apply_chat_template(messages, **kwargs)
            assert text == hf.apply_chat_template(messages, tokenize=False, **kwargs)
        assert ours.apply_chat_template(messages).startswith("<|begin_of_text|>DEFAULT")
        assert ours.apply_chat_template(messages, tools=[WEATHER_TOOL]).startswith("<|begin_of_text|>TOOLS:1")


@pytest.mark.parametrize("config", [dict(add_bos_token=False), dict(add_bos_token=True, add_eos_token=True)])
def test_add_bos_token_in_config_defers_to_tokenizer_json(tmp_path, config):
    """With a tokenizer.json, transformers 5 ignores tokenizer_config.json's add_bos_token and
    add_eos_token: tokenizer.json's post-processor decides (Llama 4's adds the BOS)."""
    path = tt.save(tmp_path / "tok", **config)
    ours, hf = corral.Tokenizer(path), AutoTokenizer.from_pretrained(path)
    for text in ("hello there", "日本語"):
        assert ours.encode(text) == hf.encode(text)
        assert ours.encode(text)[0] == tt.BOS and ours.encode(text)[-1] != tt.EOT
    messages = CONVERSATIONS["user"]
    ids = ours.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert ids == hf.apply_chat_template(messages, tokenize=True, return_dict=False, add_generation_prompt=True)
    assert ids.count(tt.BOS) == 1


def test_missing_special_token_is_added_like_transformers(tmp_path):
    """A special token absent from the vocabulary (the published Llama 4 configs name the pad token
    <|finetune_right_pad_id|>, which does not exist) is appended to it, as transformers does."""
    path = tt.save(tmp_path / "tok", pad_token="<|finetune_right_pad_id|>")
    ours, hf = corral.Tokenizer(path), AutoTokenizer.from_pretrained(path)
    assert ours.pad_token_id == hf.pad_token_id == VOCAB
    assert ours.encode("x<|finetune_right_pad_id|>") == hf.encode("x<|finetune_right_pad_id|>")


def test_model_specific_special_tokens(tmp_path):
    """Other `*_token` entries and a dict extra_special_tokens are named special tokens too: chat
    template variables, added to the vocabulary when absent (transformers 5)."""
    path = tt.save(tmp_path / "tok", image_token="<|image|>", extra_special_tokens={"tool_token": "<|tool|>"})
    ours, hf = corral.Tokenizer(path), AutoTokenizer.from_pretrained(path)
    assert ours.special_tokens_map == hf.special_tokens_map
    assert ours.special_tokens_map["image_token"] == "<|image|>" and ours.token_to_id("<|tool|>") == VOCAB
    assert ours.all_special_ids == hf.all_special_ids
    template = "{{ image_token }}{{ tool_token }}{{ messages[0].content }}"
    messages = CONVERSATIONS["user"]
    assert ours.apply_chat_template(messages, chat_template=template) == "<|image|><|tool|>What is 2+2?"
    assert ours.apply_chat_template(messages, chat_template=template, tokenize=True) == hf.apply_chat_template(
        messages, chat_template=template, tokenize=True, return_dict=False
    )


def test_missing_tokenizer_file(tmp_path, tok_dir):
    with pytest.raises(corral.ModelFileNotFoundError, match=str(tmp_path / "tokenizer.json")) as e:
        corral.Tokenizer(tmp_path)
    assert isinstance(e.value, FileNotFoundError)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        corral.Tokenizer(tmp_path / "nowhere")
    no_template = tmp_path / "no_template"
    shutil.copytree(tok_dir, no_template)
    (no_template / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="no chat template"):
        corral.Tokenizer(no_template).apply_chat_template(CONVERSATIONS["user"])


# Incremental detokenization.


def stream(tok, ids, **options):
    """Feeds ids one at a time: (the deltas, the detokenizer)."""
    detok = corral.IncrementalDetokenizer(tok, **options)
    deltas = []
    for t in ids:
        deltas.append(detok.add(t))
        if detok.finished:
            break
    deltas.append(detok.finish())
    return deltas, detok


@pytest.mark.parametrize("text", TEXTS)
def test_stream_matches_full_decode(tok, text):
    ids = tok.encode(text)
    deltas, detok = stream(tok, ids)
    assert "".join(deltas) == detok.text == text == tok.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in d for d in deltas)  # never half a character
    emitted = ""
    for d in deltas:  # every intermediate text is a prefix of the final one
        emitted += d
        assert text.startswith(emitted)


def test_stream_holds_back_split_characters(tok):
    """Tokens of this tokenizer end inside UTF-8 characters (e.g. '日本' plus the first byte of '語'):
    their text waits for the token that completes the character."""
    text = "日本語のテキストです。"
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the test means something
    deltas, _ = stream(tok, ids)
    for k in range(len(deltas) - 1):
        complete = tok.decode(ids[: k + 1])
        assert "".join(deltas[: k + 1]) == complete.rstrip("\ufffd")


def test_stream_of_random_tokens(tok, rng):
    """Random ids (invalid UTF-8 sequences, special tokens) still add up to the full decode."""
    for _ in range(30):
        ids = rng.integers(0, VOCAB, size=int(rng.integers(1, 40))).tolist()
        for skip in (True, False):
            deltas, _ = stream(tok, ids, skip_special_tokens=skip)
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)


def reference_stop(full: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """The text cut at the earliest occurrence of any stop string (the shortest of those that
    start there), from the full decode."""
    hits = [(full.find(s), len(s), s) for s in stops if s in full]
    if not hits:
        return full, None
    at, _, s = min(hits)
    return full[: at + len(s) if include else at], s


STOP_CASES = [
    ("The quick brown fox jumps over the lazy dog", ["fox j"]),
    ("The quick brown fox jumps over the lazy dog", ["cat"]),
    ("The quick brown fox jumped over the fox jumps", ["fox jumps"]),  # a false start first
    ("The quick brown fox jumps over the lazy dog", ["lazy", "brown f", "over"]),  # the earliest wins
    ("日本語のテキストです。", ["語のテ"]),  # spans tokens that split characters
    ("Emoji: 🙂🎉👍🏽 done", ["🎉👍"]),
    ("ends with the stop", ["stop"]),
    ("abcabcabd", ["abcabd"]),
    ("a stop string that starts first wins", ["ring", "string that starts"]),  # "ring" completes first
    ("a stop string that starts first wins", ["ring", "string that x"]),  # ... the earlier one never does
]


@pytest.mark.parametrize("text, stops", STOP_CASES)
@pytest.mark.parametrize("include", [False, True])
def test_stop_strings(tok, text, stops, include):
    ids = tok.encode(text, add_special_tokens=False)
    deltas, detok = stream(tok, ids, stop=stops, include_stop_str_in_output=include)
    expected, reason = reference_stop(text, stops, include)
    assert "".join(deltas) == detok.text == expected
    assert detok.stop_reason == reason
    emitted = ""
    for d in deltas:
        emitted += d
        assert expected.startswith(emitted)  # nothing is emitted that the stop string takes back


def test_stop_string_spanning_tokens_is_held_back(tok):
    text = "The quick brown fox jumps over the lazy dog"
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    stop = "brown fox"
    first = next(k for k in range(len(ids)) if "brown" in tok.decode(ids[: k + 1]))
    assert "fox" not in tok.decode(ids[: first + 1])  # the stop string spans tokens
    detok = corral.IncrementalDetokenizer(tok, stop=[stop])
    emitted = "".join(detok.add(t) for t in ids[: first + 1])
    assert emitted == "The quick "  # "brown" may begin the stop string: held back
    assert "".join(pieces[: first + 1]) == "The quick brown"


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_stop_strings_property(tok, data):
    text = data.draw(st.sampled_from(TEXTS[:-1]))
    n = len(text)
    stops = []
    for _ in range(data.draw(st.integers(1, 3))):
        a = data.draw(st.integers(0, n - 1))
        stops.append(text[a : data.draw(st.integers(a + 1, min(n, a + 8)))])
    stops.append(data.draw(st.text(min_size=1, max_size=3)))
    include = data.draw(st.booleans())
    ids = tok.encode(text, add_special_tokens=False)
    deltas, detok = stream(tok, ids, stop=stops, include_stop_str_in_output=include)
    expected, reason = reference_stop(text, stops, include)
    assert "".join(deltas) == expected and detok.stop_reason == reason


def test_min_tokens_delays_stop_strings(tok):
    text = "stop here, and stop there"
    ids = tok.encode(text, add_special_tokens=False)
    deltas, detok = stream(tok, ids, stop=["stop"])
    assert "".join(deltas) == ""
    k = next(k for k in range(len(ids)) if "," in tok.decode(ids[:k]))  # past the first "stop"
    deltas, detok = stream(tok, ids, stop=["stop"], min_tokens=k)
    assert "".join(deltas) == "stop here, and " and detok.stop_reason == "stop"


def test_special_tokens_in_stream(tok):
    ids = [tt.HEADER_START] + tok.encode("user", add_special_tokens=False) + [tt.HEADER_END, tt.EOT]
    assert "".join(stream(tok, ids)[0]) == "user"
    assert "".join(stream(tok, ids, skip_special_tokens=False)[0]) == "<|header_start|>user<|header_end|><|eot|>"


def test_stream_tokens_beyond_the_tokenizer(tok):
    """The model's vocabulary may be larger than the tokenizer's: such ids decode to nothing."""
    ids = tok.encode("hello", add_special_tokens=False)
    deltas, _ = stream(tok, ids[:1] + [VOCAB + 7] + ids[1:])
    assert "".join(deltas) == "hello"
    assert tok.decode([VOCAB + 7]) == ""
