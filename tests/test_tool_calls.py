"""Llama 4 tool-call parsing (corral.tool_calls): goldens written from the formats, streaming equal
to non-streaming for every split, and the tool-call history rendered as transformers renders it."""

import itertools
import json
import keyword
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.tool_calls import ToolCallDelta, ToolCallStreamParser, parse_tool_calls, prepare_messages

DEMO_MODEL = Path(__file__).resolve().parents[1] / "python" / "corral" / "demo_model"

# (model output, content, [(name, arguments JSON text)]); the expectations are written by hand.
GOLDENS = [
    # pythonic
    ('[get_weather(city="San Francisco")]', None, [("get_weather", '{"city": "San Francisco"}')]),
    (
        "[get_weather(city='San Francisco', unit=\"celsius\"), get_time(tz='PST'), ping()]",
        None,
        [
            ("get_weather", '{"city": "San Francisco", "unit": "celsius"}'),
            ("get_time", '{"tz": "PST"}'),
            ("ping", "{}"),
        ],
    ),
    ("[ f (x=1) , g( y = 2 ) , ]", None, [("f", '{"x": 1}'), ("g", '{"y": 2}')]),
    (
        "I'll look that up.\n\n[get_weather(city=\"Paris\")]",
        "I'll look that up.\n\n",
        [("get_weather", '{"city": "Paris"}')],
    ),
    (
        "[f(a=true, b=false, c=null, d=True, e=None, n=-3, x=+2.5, big=12345678901234567890)]",
        None,
        [("f", '{"a": true, "b": false, "c": null, "d": true, "e": null, "n": -3, "x": 2.5, '
               '"big": 12345678901234567890}')],
    ),
    (
        '[create(spec={"tags": ["a", \'b\'], "size": {"w": 1, "h": [2.5, (3, 4)]}}, ids=[[1], []], empty={})]',
        None,
        [("create", '{"spec": {"tags": ["a", "b"], "size": {"w": 1, "h": [2.5, [3, 4]]}}, '
                    '"ids": [[1], []], "empty": {}}')],
    ),
    # quotes, brackets and escapes inside strings
    (
        "[echo(text=\"a ] b [ c ) ( } { , ]\", other='it\\'s \"quoted\"', path=\"C:\\\\dir\\n\")]",
        None,
        [("echo", '{"text": "a ] b [ c ) ( } { , ]", "other": "it\'s \\"quoted\\"", "path": "C:\\\\dir\\n"}')],
    ),
    (
        '[run(code="""print("]")\nx = \'[\'""", empty="", e2=\'\')]',
        None,
        [("run", '{"code": "print(\\"]\\")\\nx = \'[\'", "empty": "", "e2": ""}')],
    ),
    # non-ASCII stays unescaped
    ('[search(q="Zürich 東京 😀", lang=\'ñ\')]', None, [("search", '{"q": "Zürich 東京 😀", "lang": "ñ"}')]),
    ('{"name": "search", "parameters": {"q": "caf\\u00e9 ☕"}}', None, [("search", '{"q": "café ☕"}')]),
    ('[f(a="\\ud83d\\ude00", b="\\udc00")]', None, [("f", '{"a": "😀", "b": "\ufffd"}')]),  # escaped surrogates
    # JSON
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", '{"city": "Paris"}')]),
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', None, [("get_weather", '{"city": "Paris"}')]),
    ('{"name": "f", "arguments": "{\\"a\\": [1]}"}', None, [("f", '{"a": [1]}')]),
    (
        '{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {"s": "x;]}"}}',
        None,
        [("f", '{"a": 1}'), ("g", '{"s": "x;]}"}')],
    ),
    (
        '{"name": "f", "parameters": {}}\n{"name": "g", "parameters": {"b": null}}\n',
        None,
        [("f", "{}"), ("g", '{"b": null}')],
    ),
    (
        '[{"name": "f", "parameters": {"a": true}}, {"name": "g", "arguments": {"b": [1, {"c": 2}]}}]',
        None,
        [("f", '{"a": true}'), ("g", '{"b": [1, {"c": 2}]}')],
    ),
    ('Calling it now: {"name": "f", "parameters": {"x": 1}}', "Calling it now: ", [("f", '{"x": 1}')]),
    # <|python_start|> wrappers (dropped, as skip_special_tokens would)
    ('<|python_start|>[get_weather(city="Paris")]<|python_end|>', None, [("get_weather", '{"city": "Paris"}')]),
    (
        '<|python_start|>{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {}}<|python_end|>',
        None,
        [("f", '{"a": 1}'), ("g", "{}")],
    ),
    ('<|python_start|>\n[f(x="y")]', None, [("f", '{"x": "y"}')]),
    # the form the HF template renders past calls in
    ('<|python_start|><|python_end|>{"name": "f", "parameters": {"a": 1}}', None, [("f", '{"a": 1}')]),
    ("Let me check. <|python_start|>[f()]<|python_end|>", "Let me check. ", [("f", "{}")]),
    ("See [note] then [f(x=1)]\n[g()]", "See [note] then ", [("f", '{"x": 1}'), ("g", "{}")]),
    # truncated output: content, no calls
    ('[get_weather(city="Paris")', '[get_weather(city="Paris")', []),
    ('[get_weather(city="Paris"), get_time(tz="', '[get_weather(city="Paris"), get_time(tz="', []),
    ('Sure. [f(x="a ] b")', 'Sure. [f(x="a ] b")', []),
    ('{"name": "f", "parameters": {"a": 1}', '{"name": "f", "parameters": {"a": 1}', []),
    ("<|python_start|>[f(x=1", "[f(x=1", []),
    ("[f(x=1)] and", "and", [("f", '{"x": 1}')]),  # separators after a call are dropped
    # prose, and brackets that are not calls
    ("The answer is 42.", "The answer is 42.", []),
    (
        "Arrays look like [1, 2], sets like {1, 2}, links like [a](b), and a < b > c; see [note] {x}.",
        "Arrays look like [1, 2], sets like {1, 2}, links like [a](b), and a < b > c; see [note] {x}.",
        [],
    ),
    ("[f(1)]", "[f(1)]", []),  # positional arguments
    ("[f(x=y)]", "[f(x=y)]", []),  # a variable
    ("[f(x=1+2)]", "[f(x=1+2)]", []),
    ("[f(x=1, x=2)]", "[f(x=1, x=2)]", []),
    ("[f(**kw)]", "[f(**kw)]", []),
    ("[os.system(c='ls')]", "[os.system(c='ls')]", []),
    ("[f(x=1) g(y=2)]", "[f(x=1) g(y=2)]", []),
    ("[f(x=1]", "[f(x=1]", []),
    ("[f(x=float('nan'))]", "[f(x=float('nan'))]", []),
    ("[f(x=1e999)]", "[f(x=1e999)]", []),
    ("[]", "[]", []),
    ('{"name": "Bob", "age": 3}', '{"name": "Bob", "age": 3}', []),
    ('{"name": "f", "parameters": [1]}', '{"name": "f", "parameters": [1]}', []),
    ('{"name": "f", "parameters": {"x": NaN}}', '{"name": "f", "parameters": {"x": NaN}}', []),
    ("", None, []),
    ("  \n", None, []),
]


def _names_args(calls):
    return [(c.name, c.arguments) for c in calls]


@pytest.mark.parametrize("text, content, calls", GOLDENS)
def test_goldens(text, content, calls):
    got_content, got_calls = parse_tool_calls(text)
    assert got_content == content
    assert _names_args(got_calls) == calls
    for call in got_calls:
        assert re.fullmatch(r"chatcmpl-tool-[0-9a-f]{32}", call.id)
        assert isinstance(json.loads(call.arguments), dict)
    assert len({c.id for c in got_calls}) == len(got_calls)


TOOLS = {"get_weather", "get_time"}


@pytest.mark.parametrize(
    "text, calls",
    [
        (
            '[get_weather(city="Paris"), get_time(tz="CET")]',
            [("get_weather", '{"city": "Paris"}'), ("get_time", '{"tz": "CET"}')],
        ),
        ('[delete_everything(confirm=true)]', []),
        ('Sure: [get_weather(city="Paris"), rm(path="/")]', []),
        ("[get(x=1)]", []),  # a prefix of a tool's name
        ('{"name": "rm", "parameters": {"path": "/"}}', []),
    ],
)
def test_tool_names(text, calls):
    content, got = parse_tool_calls(text, tool_names=TOOLS)
    assert _names_args(got) == calls
    assert content == (None if calls else text)


def _stream(pieces, tool_names=None):
    """Feeds the pieces; returns (content, {index: [name, id, arguments]}, parser, items)."""
    parser = ToolCallStreamParser(tool_names)
    items = [x for piece in pieces for x in parser.feed(piece)] + parser.finish()
    content, calls = "", {}
    for item in items:
        if isinstance(item, str):
            content += item
        elif item.index not in calls:
            assert isinstance(item, ToolCallDelta) and item.id and item.name and item.index == len(calls)
            calls[item.index] = [item.name, item.id, item.arguments]
        else:
            assert item.id is None and item.name is None
            calls[item.index][2] += item.arguments
    return content, calls, parser, items


def _assert_stream_matches(text, pieces, tool_names=None):
    want_content, want_calls = parse_tool_calls(text, tool_names)
    content, calls, parser, _ = _stream(pieces, tool_names)
    assert (content == want_content) if want_content is not None else not content.strip()
    assert [(n, a) for n, _, a in calls.values()] == _names_args(want_calls)
    assert [(c.id, c.name, c.arguments) for c in parser.calls] == [(i, n, a) for n, i, a in calls.values()]


@pytest.mark.parametrize("text", [g[0] for g in GOLDENS])
def test_streaming_matches_every_split(text):
    _assert_stream_matches(text, list(text))
    for i in range(len(text) + 1):
        _assert_stream_matches(text, [text[:i], text[i:]])
    if len(text) <= 60:  # every split in three, where that stays quick
        for i, j in itertools.combinations(range(1, len(text)), 2):
            _assert_stream_matches(text, [text[:i], text[i:j], text[j:]])


def _split(draw, text):
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


# Text made of pieces of call syntax, prose and markers, in any order.
_PIECES = st.sampled_from(
    ["[", "]", "{", "}", "(", ")", '"', "'", '"""', "\\", ",", ";", "=", " ", "\n", "<", "|", "<|python_start|>",
     "<|python_end|>", "<|pyth", "f", "get_time", "x", "1", "true", "null", '"name": ', '"parameters": ', "ü", "é"]
)  # fmt: skip
_FRAGMENTS = st.one_of(_PIECES, st.sampled_from([g[0] for g in GOLDENS]), st.text(max_size=5))


@settings(max_examples=500, deadline=None)
@given(st.data(), st.lists(_FRAGMENTS, max_size=12))
def test_streaming_matches_random_text(data, fragments):
    text = "".join(fragments)
    _assert_stream_matches(text, _split(data.draw, text))
    _assert_stream_matches(text, _split(data.draw, text), tool_names=TOOLS)


_KEYS = st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True).filter(lambda k: not keyword.iskeyword(k))
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
_CALLS = st.lists(st.tuples(_KEYS, st.dictionaries(_KEYS, _JSON, max_size=4)), min_size=1, max_size=3)


@settings(max_examples=300, deadline=None)
@given(st.data(), _CALLS, st.sampled_from(["python", "python-json-literals", "json"]), st.booleans())
def test_round_trip(data, calls, form, wrapped):
    # Calls written out by independent serializers (repr, json.dumps) parse back to their arguments.
    if form.startswith("python"):
        value = repr if form == "python" else json.dumps
        written = (f"{n}(" + ", ".join(f"{k}={value(v)}" for k, v in a.items()) + ")" for n, a in calls)
        text = "[" + ", ".join(written) + "]"
    else:
        text = "; ".join(json.dumps({"name": n, "parameters": a}, ensure_ascii=False) for n, a in calls)
    if wrapped:
        text = f"<|python_start|>{text}<|python_end|>"
    content, got = parse_tool_calls(text)
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert all(c.arguments == json.dumps(json.loads(c.arguments), ensure_ascii=False) for c in got)
    _assert_stream_matches(text, _split(data.draw, text))


def test_calls_go_out_when_complete():
    parser = ToolCallStreamParser()
    assert parser.feed("Let me check") == ["Let me check"]  # prose is not held
    assert parser.feed(" the [docs] now, [") == [" the [docs] now, "]  # only a possible call is held
    assert parser.feed('get_weather(city="Paris")') == []
    assert parser.feed(", get_time(") == []  # a pythonic call is certain only when its list closes
    out = parser.feed(')]\n')
    assert [(d.index, d.name, d.arguments) for d in out] == [
        (0, "get_weather", '{"city": "Paris"}'),
        (1, "get_time", "{}"),
    ]
    assert [c.name for c in parser.calls] == ["get_weather", "get_time"]
    assert parser.finish() == []

    parser = ToolCallStreamParser()
    out = parser.feed('<|python_start|>{"name": "f", "parameters": {"a": 1}}; {"name": "g", ')
    assert [(d.index, d.name, d.arguments) for d in out] == [(0, "f", '{"a": 1}')]
    assert parser.feed('"parameters": {}}') == [ToolCallDelta(1, parser.calls[1].id, "g", "{}")]
    assert parser.feed("<|python_end|>") == []
    assert parser.finish() == []

    parser = ToolCallStreamParser()
    assert parser.feed("a <|pyth") == ["a "]
    assert parser.feed("on_end|>b <|py!") == ["b <|py!"]


def test_prepare_messages():
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}], "name": None},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"city": "Zürich", "n": 1}'}},
                {"id": "b", "type": "function", "function": {"name": "g", "arguments": "not json"}},
                {"id": "c", "type": "function", "function": {"name": "h", "arguments": ""}},
                {"id": "d", "type": "function", "function": {"name": "k", "arguments": {"already": "dict"}}},
            ],
        },
        {"role": "tool", "tool_call_id": "a", "content": "21 C"},
    ]
    original = json.loads(json.dumps(messages))
    assert prepare_messages(messages) == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": {"city": "Zürich", "n": 1}}},
                {"id": "b", "type": "function", "function": {"name": "g", "arguments": "not json"}},
                {"id": "c", "type": "function", "function": {"name": "h", "arguments": {}}},
                {"id": "d", "type": "function", "function": {"name": "k", "arguments": {"already": "dict"}}},
            ],
        },
        {"role": "tool", "tool_call_id": "a", "content": "21 C"},
    ]
    assert messages == original  # the caller's messages are left alone


def test_tool_history_renders_like_transformers():
    transformers = pytest.importorskip("transformers")
    from corral.tokenizer import Tokenizer

    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    def call(arguments):
        return {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}

    # As an OpenAI client sends it: content null, arguments as JSON text.
    openai_messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": None, "tool_calls": [call('{"city": "Zürich"}')]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    hf_messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "tool_calls": [call({"city": "Zürich"})]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    ours = Tokenizer(DEMO_MODEL).apply_chat_template(
        prepare_messages(openai_messages), tools=tools, add_generation_prompt=True
    )
    hf = transformers.AutoTokenizer.from_pretrained(DEMO_MODEL)
    theirs = hf.apply_chat_template(hf_messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert ours == theirs
    assert '<|python_start|><|python_end|>{"name": "get_weather", "parameters": {"city": "Zürich"}}<|eot|>' in ours
    tail = '<|header_start|>ipython<|header_end|>\n\n"{\\"temp_c\\": 21}"<|eot|>'
    tail += "<|header_start|>assistant<|header_end|>\n\n"
    assert ours.endswith(tail)
