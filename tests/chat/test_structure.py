"""The reply grammars: which call texts and JSON replies they admit, token by token."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from warmkv.chat.structure import reply_grammar
from warmkv.chat.tool_calls import PARSERS
from warmkv.engine.grammar import GrammarCompiler
from warmkv.errors import InvalidRequest

from ..conftest import smollm2_tokenizer

HERMES = PARSERS["hermes"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
PING = {"type": "function", "function": {"name": "ping"}}  # no parameters: an empty object


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(smollm2_tokenizer()))


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, {tokenizer.eos_token_id})


def admits(compiler: GrammarCompiler, tokenizer, grammar: str, text: str) -> bool:
    """The grammar takes the whole text, and may end there (the end-of-sequence token is allowed next)."""
    matcher = compiler.compile(grammar).matcher()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not all(matcher.advance(token) for token in ids):
        return False
    allowed = matcher.allowed(len(tokenizer), torch.device("cpu"))
    return matcher.finished or bool(allowed[tokenizer.eos_token_id])


def call(name: str, arguments: dict) -> str:
    return HERMES.naming(name) + json.dumps(arguments) + HERMES.call_tail


def test_required_admits_calls_to_declared_tools_with_valid_arguments(compiler, tokenizer) -> None:
    grammar = reply_grammar([WEATHER, PING], "required", None, HERMES, parallel_tool_calls=False)
    assert admits(compiler, tokenizer, grammar, call("get_weather", {"city": "Paris", "unit": "c"}))
    assert admits(compiler, tokenizer, grammar, call("ping", {}))
    assert not admits(compiler, tokenizer, grammar, call("get_weather", {"city": "Paris", "unit": "k"}))
    assert not admits(compiler, tokenizer, grammar, call("get_weather", {"city": "Paris"}))
    assert not admits(compiler, tokenizer, grammar, call("rm_rf", {}))
    assert not admits(compiler, tokenizer, grammar, call("ping", {"extra": 1}))
    two = call("ping", {}) + HERMES.calls_separator + HERMES.opening + call("ping", {})
    assert not admits(compiler, tokenizer, grammar, two)
    parallel = reply_grammar([WEATHER, PING], "required", None, HERMES, parallel_tool_calls=True)
    assert admits(compiler, tokenizer, parallel, two)


def test_named_function_admits_only_its_arguments(compiler, tokenizer) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    grammar = reply_grammar([WEATHER, PING], choice, None, HERMES, parallel_tool_calls=True)
    arguments = json.dumps({"city": "Rome", "unit": "f"}) + HERMES.call_tail
    assert admits(compiler, tokenizer, grammar, arguments)
    assert not admits(compiler, tokenizer, grammar, json.dumps({"unit": "f"}) + HERMES.call_tail)


def test_response_format_grammars(compiler, tokenizer) -> None:
    assert reply_grammar(None, None, {"type": "text"}, HERMES, True) is None
    anything = reply_grammar(None, None, {"type": "json_object"}, HERMES, True)
    assert admits(compiler, tokenizer, anything, '{"a": [1, 2, {"b": null}]}')
    assert not admits(compiler, tokenizer, anything, "[1, 2]")
    schema = {"name": "x", "schema": WEATHER["function"]["parameters"]}
    on_auto = reply_grammar([PING], "auto", {"type": "json_schema", "json_schema": schema}, HERMES, True)
    assert admits(compiler, tokenizer, on_auto, '{"city": "Oslo", "unit": "c"}')
    assert admits(compiler, tokenizer, on_auto, HERMES.opening + call("ping", {}))
    assert not admits(compiler, tokenizer, on_auto, "Sure!")
    with pytest.raises(InvalidRequest, match=r"response_format\.json_schema"):
        reply_grammar(None, None, {"type": "json_schema"}, HERMES, True)


def test_call_arguments_are_kept_as_the_model_wrote_them() -> None:
    body = '{"name": "convert", "arguments": {"amount": 1e999, "note": "café"}}'
    (parsed,) = [HERMES.parse_one(body)]
    assert parsed is not None and parsed.arguments == '{"amount": 1e999, "note": "café"}'
