"""Structured output (constrained decoding) with llguidance.

A request's JSON schema, JSON object, regex, choice or grammar (SamplingParams fields of those
names; tool calls come as a grammar from tool_call_grammar) is compiled once per model and spec
into an llguidance grammar. Each sample then gets its own matcher, which the engine asks for a
bitmask of the tokens that may come next and tells each token it drew (the engine's
SamplingParams.constraint hook).
"""

from __future__ import annotations

import json
import keyword
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import llguidance
import numpy as np
from llguidance import LLMatcher

from corral import _core

# Compact JSON: exactly these separators and no whitespace between tokens. A grammar with free
# whitespace lets a weak model emit whitespace until max_tokens.
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}

# Compiled grammars kept per model (the least recently used go first).
_CACHE_SIZE = 256
# Longest grammar error quoted in an InvalidInputError (llguidance quotes the grammar around it).
_MAX_ERROR = 2000


def _invalid(field: str, message: str) -> _core.InvalidInputError:
    return _core.InvalidInputError(f"{field}: {message.strip()[:_MAX_ERROR]}")


def grammar_for(field: str, value: Any) -> str:
    """The llguidance grammar of one structured-output field of SamplingParams (json_schema: a
    dict or its JSON text, read with closed_objects; json_object: True; regex; choice: a list of
    strings; grammar: Lark or GBNF text), JSON compact. Raises InvalidInputError naming the field
    where the spec cannot be read; StructuredOutputCompiler.compile finds what llguidance
    rejects."""
    if field == "json_schema":
        return LLMatcher.grammar_from_json_schema(closed_objects(_schema(value, field)), overrides=COMPACT_JSON)
    if field == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=COMPACT_JSON)
    if field == "regex":
        if not isinstance(value, str):
            raise _invalid(field, f"must be a string, got {type(value).__name__}")
        return LLMatcher.grammar_from_regex(value)
    if field == "choice":
        strings = not isinstance(value, str) and isinstance(value, Sequence) and all(isinstance(c, str) for c in value)
        if not strings or not value:
            raise _invalid(field, "must be a non-empty list of strings")
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
    if field == "grammar":
        if not isinstance(value, str) or not value.strip():
            raise _invalid(field, "must be a non-empty Lark or GBNF grammar")
        try:
            return llguidance.grammar_from("grammar", value)  # Lark as is, GBNF converted to Lark
        except ValueError as e:
            raise _invalid(field, str(e)) from None
    raise ValueError(f"not a structured-output field: {field!r}")


# Keywords whose values are a schema, a list of schemas, or a map of names to schemas. allOf is
# left out: closing each part of an intersection would forbid the other parts' properties.
_SUBSCHEMA = ("items", "additionalItems", "additionalProperties", "contains", "not", "if", "then", "else",
              "propertyNames", "unevaluatedItems", "unevaluatedProperties")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_OPEN_KEYWORDS = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def closed_objects(schema: Any) -> Any:
    """The schema with additionalProperties false in each object schema that lists properties and
    says nothing of others, as OpenAI's strict mode and xgrammar (vLLM's default) read schemas:
    a weak model otherwise invents properties until max_tokens."""
    if isinstance(schema, list):  # items as a list (draft 4)
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    closed = dict(schema)
    for key in _SUBSCHEMA:
        if key in closed:
            closed[key] = closed_objects(closed[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(closed.get(key), list):
            closed[key] = [closed_objects(s) for s in closed[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(closed.get(key), Mapping):
            closed[key] = {name: closed_objects(s) for name, s in closed[key].items()}
    if "properties" in closed and not any(key in closed for key in _OPEN_KEYWORDS):
        closed["additionalProperties"] = False
    return closed


def _schema(value: Any, field: str) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise _invalid(field, f"not valid JSON: {e}") from None
    if not isinstance(value, Mapping):
        raise _invalid(field, f"must be a JSON object (a dict), got {type(value).__name__}")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise _invalid(field, f"not JSON: {e}") from None
    return dict(value)


class GrammarMatcher:
    """The matcher of one sample: the engine's constraint object.

    llguidance knows one end-of-sequence token; where its mask allows it (the grammar may end
    here), the mask allows each of the request's stop tokens instead."""

    def __init__(self, matcher: LLMatcher, eos_token_id: int, stop_token_ids: Sequence[int]) -> None:
        self._matcher = matcher
        self._eos = (eos_token_id // 32, np.uint32(1 << (eos_token_id % 32)))
        self._stops = [(t // 32, np.uint32(1 << (t % 32))) for t in stop_token_ids]

    def fill_bitmask(self, mask: np.ndarray) -> None:
        """Writes every word of mask (int32, one bit per token of the model's vocabulary)."""
        if mask.dtype != np.int32 or mask.ndim != 1 or not mask.flags.c_contiguous:
            raise TypeError(f"the mask must be a contiguous 1-D int32 array, got {mask.dtype} {mask.shape}")
        # llguidance checks that the size is its vocabulary's, so it writes inside the array.
        self._matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        words = mask.view(np.uint32)
        word, bit = self._eos
        if words[word] & bit:
            words[word] &= ~bit
            for word, bit in self._stops:
                words[word] |= bit

    def accept_token(self, token: int) -> None:
        """Advances the grammar by the token drawn (raises if the grammar forbids it: the engine
        then ends the sample with finish_reason "error")."""
        if not self._matcher.consume_token(int(token)):
            error = self._matcher.get_error()[:500]
            raise RuntimeError(f"structured output: token {token} does not fit the grammar: {error}")

    def is_accepting(self) -> bool:
        """Whether the output so far is a complete match of the grammar."""
        return self._matcher.is_accepting()


class StructuredOutputCompiler:
    """Compiles structured-output specs for one model (its tokenizer and logits vocabulary) into
    constraint factories, keeping compiled grammars by spec. Thread-safe."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_id: int) -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_token_id)
        self._compiled: OrderedDict[str, LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, field: str, value: Any) -> LLMatcher:
        """The matcher of a spec in its initial state (shared: copy it before use). Raises
        InvalidInputError naming the field if the spec is invalid or uses what llguidance does
        not support."""
        grammar = grammar_for(field, value)
        with self._lock:
            if grammar in self._compiled:
                self._compiled.move_to_end(grammar)
                return self._compiled[grammar]
        error = LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise _invalid(field, error)
        matcher = LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise _invalid(field, matcher.get_error())
        with self._lock:
            self._compiled[grammar] = matcher
            while len(self._compiled) > _CACHE_SIZE:
                self._compiled.popitem(last=False)
        return matcher

    def constraint(self, field: str, value: Any, stop_token_ids: Sequence[int]) -> Callable[[], GrammarMatcher]:
        """The engine's SamplingParams.constraint for a spec: a factory of one GrammarMatcher per
        sample. stop_token_ids are the tokens that end the request's samples (allowed where the
        grammar may end). Compiles now, so that a bad spec raises here."""
        initial = self.compile(field, value)
        eos, stops = self.eos_token_id, [int(t) for t in stop_token_ids if 0 <= t < self.vocab_size]
        return lambda: GrammarMatcher(initial.deep_copy(), eos, stops)


def compiler_for(tokenizer, vocab_size: int, stop_token_ids: Sequence[int]) -> StructuredOutputCompiler:
    """The compiler of a model with a corral Tokenizer (its serialized tokenizer.json, with any
    tokens transformers would add) and `vocab_size` logits."""
    eos = stop_token_ids[0] if stop_token_ids else tokenizer.eos_token_id
    if eos is None:
        raise _core.NotSupportedError("structured output needs an end-of-sequence token, and the model has none")
    if len(tokenizer) > vocab_size:  # masks are one bit per logit, and llguidance's cover its tokenizer
        raise _core.NotSupportedError(
            f"structured output: the tokenizer has {len(tokenizer)} tokens, more than the model's {vocab_size} logits"
        )
    return StructuredOutputCompiler(tokenizer.backend.to_str(), vocab_size, int(eos))


# Tool calls.


def tool_call_grammar(
    tools: Sequence[Mapping[str, Any]], tool_choice: Any, style: str = "json", parallel_tool_calls: bool = True
) -> str:
    """A Lark grammar (for SamplingParams.grammar) of the tool calls that tool_choice asks for.

    tools: OpenAI tools ({"type": "function", "function": {"name", "parameters"}}) or their
    functions alone. tool_choice: "required" (one or more calls of any of the tools; exactly one
    without parallel_tool_calls) or one function ({"type": "function", "function": {"name":
    ...}} or its name): exactly one call of it. Each call's arguments follow the tool's
    `parameters` schema (read with closed_objects), in compact JSON.

    style "json": {"name":"<fn>","parameters":{...}}, calls joined by "; " (the format the Llama
    4 chat template asks for). style "pythonic": [fn(a=1, b="x"), g()], keyword arguments in
    the order of the schema's properties; arguments of type boolean or null and enum/const
    values are Python literals (True, False, None), other values JSON, which Python reads alike
    but for true, false and null nested in objects and arrays."""
    if style not in ("json", "pythonic"):
        raise _core.InvalidInputError(f"style must be 'json' or 'pythonic', got {style!r}")
    functions = _functions(tools)
    if tool_choice == "required":
        chosen = list(functions)
    else:
        name = tool_choice["function"].get("name") if _is_named_choice(tool_choice) else tool_choice
        if not isinstance(name, str) or name in ("auto", "none"):
            raise _core.InvalidInputError(
                "tool_choice must be 'required' or a function ({'type': 'function', 'function': {'name': ...}}), "
                f"got {str(tool_choice)[:80]}"
            )
        if name not in functions:
            raise _core.InvalidInputError(f"tool_choice: no tool is named {name!r}")
        chosen = [name]

    rules = []
    for k, name in enumerate(chosen):
        rules += _json_call(k, name, functions[name]) if style == "json" else _pythonic_call(k, name, functions[name])
    call = " | ".join(f"call_{k}" for k in range(len(chosen)))
    several = tool_choice == "required" and parallel_tool_calls
    if style == "json":
        start = 'call ("; " call)*' if several else "call"
    else:
        start = '"[" call (", " call)* "]"' if several else '"[" call "]"'
    return "\n".join([f"start: {start}", f"call: {call}", *rules]) + "\n"


def _is_named_choice(choice: Any) -> bool:
    return isinstance(choice, Mapping) and isinstance(choice.get("function"), Mapping)


def _functions(tools: Sequence[Mapping[str, Any]]) -> dict[str, dict]:
    """{name: parameters schema} of the tools, each schema checked (objects closed: closed_objects)."""
    if isinstance(tools, (str, Mapping)) or not isinstance(tools, Sequence) or not tools:
        raise _core.InvalidInputError("tools must be a non-empty list of tools")
    functions = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise _core.InvalidInputError(f"{where} must be a dict, got {type(tool).__name__}")
        if "function" in tool:
            if tool.get("type", "function") != "function":
                raise _core.InvalidInputError(f"{where}: type {tool.get('type')!r} is not 'function'")
            tool, where = tool["function"], f"{where}.function"
            if not isinstance(tool, Mapping):
                raise _core.InvalidInputError(f"{where} must be a dict")
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise _core.InvalidInputError(f"{where}.name must be a non-empty string")
        if name in functions:
            raise _core.InvalidInputError(f"{where}.name: two tools are named {name!r}")
        # No parameters: the function takes none (as in OpenAI's API).
        parameters = tool.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}
        schema = closed_objects(_schema(parameters, f"{where}.parameters"))
        error = LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(schema, overrides=COMPACT_JSON))
        if error:
            raise _invalid(f"{where}.parameters", error)
        functions[name] = schema
    return functions


def _json_schema_rule(rule: str, schema: Mapping[str, Any]) -> str:
    # x-guidance is read at the top of each inlined schema: compact JSON.
    return f"{rule}: %json {json.dumps({**schema, 'x-guidance': COMPACT_JSON})}"


def _json_call(k: int, name: str, schema: dict) -> list[str]:
    head = '{"name":' + json.dumps(name) + ',"parameters":'
    return [f'call_{k}: {json.dumps(head)} args_{k} "}}"', _json_schema_rule(f"args_{k}", schema)]


def _pythonic_call(k: int, name: str, schema: dict) -> list[str]:
    """Rules of `name(a=..., b=...)`: the schema's properties in order, the required ones
    always, each value by its property's schema."""
    properties = schema.get("properties") or {}
    required = set(schema.get("required") or ())
    if schema.get("type", "object") != "object" or not isinstance(properties, Mapping):
        raise _core.InvalidInputError(f"tools: {name}: pythonic calls need parameters of type object with properties")
    names = list(properties)
    for p in names:
        if not p.isidentifier() or keyword.iskeyword(p):
            raise _core.InvalidInputError(f"tools: {name}: parameter {p!r} is not a Python identifier (pythonic calls)")
    # $ref targets stay reachable from each property's own schema.
    defs = {key: schema[key] for key in ("$defs", "definitions") if key in schema}
    rules = []
    for i, p in enumerate(names):
        value, extra = _python_value(f"val_{k}_{i}", properties[p], defs)
        rules += [f'kw_{k}_{i}: "{p}=" {value}', *extra]

    # rest_i: the arguments from i on after one already written; first_i: the first argument
    # written is i or later. Empty ones are left out.
    rest: dict[int, str] = {len(names): ""}
    first: dict[int, str] = {len(names): ""}
    for i in range(len(names) - 1, -1, -1):
        after = f" rest_{k}_{i + 1}" if rest[i + 1] else ""
        item = f'", " kw_{k}_{i}'
        rest[i] = f"{item}{after}" if names[i] in required else f"({item})?{after}"
        alternative = f"first_{k}_{i + 1}" if first[i + 1] else ""
        first[i] = f"kw_{k}_{i}{after}" if names[i] in required else f"kw_{k}_{i}{after} | {alternative}"
    for i in range(1, len(names)):
        rules.append(f"rest_{k}_{i}: {rest[i]}")
    for i in range(len(names)):
        rules.append(f"first_{k}_{i}: {first[i]}")
    args = f" first_{k}_0" if names else ""
    return [f"call_{k}: {json.dumps(name + '(')}{args} \")\"", *rules]


def _python_value(rule: str, schema: Any, defs: dict) -> tuple[str, list[str]]:
    """(Lark expression, extra rules) of a Python literal that the schema allows."""
    if isinstance(schema, Mapping):
        if "const" in schema:
            return json.dumps(_python_literal(schema["const"])), []
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return "(" + " | ".join(json.dumps(_python_literal(v)) for v in schema["enum"]) + ")", []
        if schema.get("type") == "boolean":
            return '("True" | "False")', []
        if schema.get("type") == "null":
            return '"None"', []
    # Strings, numbers, objects and arrays: JSON, which Python reads the same (but for nested
    # true, false and null). JSON's "\/" escape means something else in Python.
    schema = {**defs, **schema} if isinstance(schema, Mapping) else {"allOf": [schema], **defs}
    options = {**COMPACT_JSON, "json_allowed_escapes": 'nrbtf\\"u'}
    return rule, [f"{rule}: %json {json.dumps({**schema, 'x-guidance': options})}"]


def _python_literal(value: Any) -> str:
    """The compact Python literal of a JSON value."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(_python_literal(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{json.dumps(str(k))}:{_python_literal(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)
