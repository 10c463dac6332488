"""Structured output on the bundled demo model (never trained on JSON): every sample, greedy or
sampled, follows its grammar and completes it (finish_reason "stop")."""

import ast
import json
import re

import jsonschema
import llguidance
import numpy as np
import pytest

import corral
from corral import SamplingParams, _core
from corral.structured_output import COMPACT_JSON, closed_objects, tool_call_grammar
from corral.tokenizer import NoTokenizerError

PROMPT = "Answer in JSON:"
MAX_TOKENS = 200  # far more than any reply below takes: "stop" means the grammar completed

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "height": {"type": "number", "minimum": 0, "maximum": 3},
        "member": {"type": "boolean"},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "height", "member", "role"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}, "minItems": 1, "maxItems": 4},
    },
    "required": ["id", "address", "scores"],
}
ITEMS = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"sku": {"type": "string", "maxLength": 8}, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"],
    },
    "minItems": 1,
    "maxItems": 3,
}

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "alerts": {"type": "boolean"},
    },
    "required": ["city", "unit"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}}, "required": ["id"]}}},
    {"type": "function", "function": {"name": "now"}},
]
TOOL_SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object", "properties": {}}) for t in TOOLS}


@pytest.fixture(scope="module")
def llm():
    return corral.LLM()


def variants(**constraint) -> list[SamplingParams]:
    """Greedy, sampled with two seeds, and n=3 sampled, all with the constraint."""
    return [
        SamplingParams(max_tokens=MAX_TOKENS, **constraint),
        SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=1, **constraint),
        SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=2, **constraint),
        SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=3, n=3, **constraint),
    ]


def texts(llm, params: list[SamplingParams], prompt: str = PROMPT) -> list[str]:
    outputs = [c for r in llm.generate([prompt] * len(params), params) for c in r.outputs]
    assert [c.finish_reason for c in outputs] == ["stop"] * len(outputs), [c.text for c in outputs]
    return [c.text for c in outputs]


def assert_compact(text: str) -> None:
    outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    assert not re.search(r"\s", outside_strings), text


@pytest.mark.parametrize("schema", [PERSON, NESTED, ITEMS], ids=["person", "nested", "items"])
def test_json_schema(llm, schema):
    outputs = texts(llm, variants(json_schema=schema))
    assert len(outputs) == 6
    for text in outputs:
        jsonschema.validate(json.loads(text), schema)
        # Objects that say nothing of other properties take none (the demo model would invent them).
        jsonschema.validate(json.loads(text), closed_objects(schema))
        assert_compact(text)


def test_json_schema_as_text(llm):
    (text,) = texts(llm, [SamplingParams(max_tokens=MAX_TOKENS, json_schema=json.dumps(PERSON))])
    jsonschema.validate(json.loads(text), PERSON)
    compiler = llm._structured_output  # the dict and its text are one spec, compiled once
    assert compiler.compile("json_schema", json.dumps(PERSON)) is compiler.compile("json_schema", PERSON)


def test_json_object(llm):
    for text in texts(llm, variants(json_object=True)[::2]):
        assert isinstance(json.loads(text), dict)
        assert_compact(text)


def test_regex(llm):
    pattern = r"[0-9]{3}-[a-z]{2,5}( [A-Z][a-z]+)?"
    for text in texts(llm, variants(regex=pattern), prompt="Code:"):
        assert re.fullmatch(pattern, text), text


def test_complete_grammar_ends_the_sample_without_stop_tokens(llm):
    # ignore_eos leaves no stop token to end on: the engine ends the sample when the grammar is done.
    (out,) = llm.generate("Code:", SamplingParams(regex="[0-9]{3}", ignore_eos=True, max_tokens=20))[0].outputs
    assert out.finish_reason == "stop" and re.fullmatch("[0-9]{3}", out.text), out


def test_choice(llm):
    choices = ["yes", "no", "maybe later", "I don't know"]
    for text in texts(llm, variants(choice=choices), prompt="Question: is it raining? Answer:"):
        assert text in choices
    streamed = "".join(llm.stream("Is it raining?", SamplingParams(choice=choices, max_tokens=MAX_TOKENS)))
    assert streamed in choices


def test_grammar(llm):
    lark = 'start: "The answer is " NUMBER "."\nNUMBER: /[1-9][0-9]{0,2}/'
    for text in texts(llm, variants(grammar=lark)[:2]):
        assert re.fullmatch(r"The answer is [1-9][0-9]{0,2}\.", text), text


def parse_json_calls(text: str) -> list[tuple[str, dict]]:
    calls, decoder, at = [], json.JSONDecoder(), 0
    while True:
        call, at = decoder.raw_decode(text, at)
        assert set(call) == {"name", "parameters"}
        calls.append((call["name"], call["parameters"]))
        if at == len(text):
            return calls
        assert text.startswith("; ", at), text
        at += 2


def parse_pythonic_calls(text: str) -> list[tuple[str, dict]]:
    tree = ast.parse(text, mode="eval").body
    assert isinstance(tree, ast.List), text
    calls = []
    for call in tree.elts:
        assert isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and not call.args, text
        calls.append((call.func.id, {k.arg: ast.literal_eval(k.value) for k in call.keywords}))
    return calls


@pytest.mark.parametrize("style", ["json", "pythonic"])
def test_tool_calls(llm, style):
    parse = parse_json_calls if style == "json" else parse_pythonic_calls
    named = {"type": "function", "function": {"name": "get_weather"}}
    cases = [("required", False, set(TOOL_SCHEMAS)), (named, True, {"get_weather"})]
    if style == "json":  # the demo model ends a list of pythonic calls only now and then
        cases.append(("required", True, set(TOOL_SCHEMAS)))
    for choice, parallel, allowed in cases:
        grammar = tool_call_grammar(TOOLS, choice, style=style, parallel_tool_calls=parallel)
        for text in texts(llm, variants(grammar=grammar), prompt="What is the weather in Paris?"):
            calls = parse(text)
            assert calls and (len(calls) == 1 or (choice == "required" and parallel)), text
            for name, arguments in calls:
                assert name in allowed, text
                jsonschema.validate(arguments, closed_objects(TOOL_SCHEMAS[name]))


def test_tool_call_formats():
    tokenizer = llguidance.LLTokenizer(open(corral.demo_model_path() / "tokenizer.json").read())
    cases = {
        ("now", "json", True): (['{"name":"now","parameters":{}}'], ['{"name": "now", "parameters": {}}']),
        ("required", "json", True): (
            ['{"name":"now","parameters":{}}; {"name":"lookup","parameters":{"id":7}}'],
            ['{"name":"lookup","parameters":{"id":7,"x":1}}', '{"name":"lookup","parameters":{}}'],
        ),
        ("required", "pythonic", True): (
            ['[lookup(id=7), now(), get_weather(city="a b", unit="c", alerts=True)]', '[get_weather(city="x", unit="f", days=2)]'],
            ["[lookup(id=7)", "[lookup(7)]", '[get_weather(unit="c", city="x")]', '[get_weather(city="x", unit="c", alerts=true)]'],
        ),
        ("required", "pythonic", False): (["[now()]"], ["[now(), now()]"]),
    }
    for (choice, style, parallel), (good, bad) in cases.items():
        grammar = llguidance.LLMatcher.grammar_from_lark(tool_call_grammar(TOOLS, choice, style, parallel))
        for text, accepted in [(t, True) for t in good] + [(t, False) for t in bad]:
            matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
            assert (matcher.consume_tokens(tokenizer.tokenize_str(text)) and matcher.is_accepting()) == accepted, text


def test_plain_request_in_a_constrained_batch_is_unaffected(llm):
    plain = SamplingParams(max_tokens=24)
    (solo,) = llm.generate([PROMPT], plain)
    batch = llm.generate([PROMPT] * 3, [plain, *variants(json_schema=PERSON)[::3]])
    assert batch[0].outputs[0].token_ids == solo.outputs[0].token_ids
    for output in batch[1].outputs + batch[2].outputs:
        jsonschema.validate(json.loads(output.text), PERSON)


def test_mask_agrees_with_llguidance(llm):
    """The engine's mask against llguidance's own verdict on single tokens, along a valid reply;
    where the object may end, exactly the request's stop tokens are allowed."""
    vocab = llm._engine.vocab_size
    eos = llm._structured_output.eos_token_id
    stops = [t for t in llm.stop_token_ids if t != eos] + [99]  # 99: a request's stop_token_ids
    matcher = llm._structured_output.constraint("json_schema", PERSON, stops)()
    tokenizer = llguidance.LLTokenizer(open(corral.demo_model_path() / "tokenizer.json").read(), n_vocab=vocab)
    reference = llguidance.LLMatcher(
        tokenizer, llguidance.LLMatcher.grammar_from_json_schema(PERSON, overrides=COMPACT_JSON), log_level=0
    )
    reply = '{"name":"Ann","age":41,"height":1.7,"member":true,"role":"user"}'
    tokens = llm._tokenizer.encode(reply, add_special_tokens=False)
    probes = np.random.default_rng(0).choice(vocab, 40, replace=False).tolist()
    mask = np.zeros((vocab + 31) // 32, np.int32)
    for token in tokens:
        matcher.fill_bitmask(mask)
        # Where the grammar forces bytes (a key's '":'), llguidance's mask keeps only their
        # canonical tokens: a subset of the tokens that fit.
        forced = bool(reference.compute_ff_bytes())
        for t in [token, *probes, *range(12)]:
            allowed = bool(mask.view(np.uint32)[t // 32] >> np.uint32(t % 32) & 1)
            fits = reference.validate_tokens([t]) == 1 and t != eos
            assert allowed <= fits if forced else allowed == fits, (reply, token, t)
        assert mask.view(np.uint32)[token // 32] >> np.uint32(token % 32) & 1
        matcher.accept_token(token)
        assert reference.consume_token(token)
    matcher.fill_bitmask(mask)
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")
    assert np.flatnonzero(bits).tolist() == sorted(stops)
    with pytest.raises(RuntimeError, match="does not fit"):
        matcher.accept_token(tokens[0])


def test_closed_objects():
    schema = {
        "type": "object",
        "properties": {"properties": {"type": "object", "properties": {"a": {}}}, "m": {"type": "object"}},
        "$defs": {"x": {"properties": {"b": {}}, "patternProperties": {"^c": {}}}},
        "anyOf": [{"properties": {"d": {}}}],
        "const": {"properties": {}},
    }
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["m"]  # no properties listed: any object
    assert "additionalProperties" not in closed["$defs"]["x"]  # patternProperties say what others may be
    assert closed["anyOf"][0]["additionalProperties"] is False
    assert closed["const"] == {"properties": {}}  # data, not a schema
    assert schema["properties"]["properties"] == {"type": "object", "properties": {"a": {}}}  # a copy


@pytest.mark.parametrize(
    "constraint, match",
    [
        ({"json_schema": "{not json"}, "json_schema: not valid JSON"),
        ({"json_schema": {"type": "foo"}}, "json_schema: .*foo"),
        ({"json_schema": {"not": {"type": "string"}}}, "json_schema: Unimplemented"),
        ({"json_schema": {"type": "string", "format": "no-such-format"}}, "json_schema: Unknown format"),
        ({"regex": "(abc"}, "regex: (.|\\n)*unclosed group"),
        ({"grammar": "start: nowhere"}, "grammar: .*unknown name"),
    ],
)
def test_invalid_specs_raise_at_compile_time(llm, constraint, match):
    with pytest.raises(_core.InvalidInputError, match=match):
        llm.generate([PROMPT], SamplingParams(max_tokens=4, **constraint))
    assert llm.generate([PROMPT], SamplingParams(max_tokens=4))[0].outputs[0].finish_reason == "length"


@pytest.mark.parametrize(
    "constraint, match",
    [
        ({"json_schema": [1]}, "json_schema must be"),
        ({"choice": []}, "choice must be a non-empty list"),
        ({"choice": ["a", 1]}, "choice must be"),
        ({"regex": 5}, "regex must be"),
        ({"grammar": " "}, "grammar must be"),
        ({"json_object": True, "regex": "a"}, "structured_output must be one of"),
    ],
)
def test_invalid_sampling_params(constraint, match):
    with pytest.raises(_core.InvalidInputError, match=match):
        SamplingParams(**constraint)


@pytest.mark.parametrize(
    "tools, choice, match",
    [
        (TOOLS, "auto", "tool_choice must be"),
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice: no tool is named 'nope'"),
        ([], "required", "tools must be a non-empty list"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "wrong"}}}], "f", r"tools\[0\].function.parameters: "),
        ([{"name": "f"}, {"name": "f"}], "required", "two tools are named 'f'"),
    ],
)
def test_invalid_tools(tools, choice, match):
    with pytest.raises(_core.InvalidInputError, match=match):
        tool_call_grammar(tools, choice)


def test_pythonic_needs_identifiers():
    tools = [{"name": "f", "parameters": {"type": "object", "properties": {"not valid": {"type": "integer"}}}}]
    with pytest.raises(_core.InvalidInputError, match="not a Python identifier"):
        tool_call_grammar(tools, "required", style="pythonic")


def test_structured_output_needs_the_tokenizer():
    llm = corral.LLM(skip_tokenizer_init=True)
    with pytest.raises(NoTokenizerError, match="structured output"):
        llm.generate([[1, 2, 3]], SamplingParams(regex="[a-z]+"))
