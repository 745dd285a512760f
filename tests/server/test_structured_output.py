"""Enforced structure through the real openai client: forced tool calls and JSON replies are always valid.

The tiny random model would, left alone, write anything; under the grammar every forced call names a
declared tool with arguments that satisfy its schema. (Its strings are bounded by maxLength and its numbers
are integers in a range: a random model never chooses to end an unbounded string or fraction.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import jsonschema
import pydantic
import pytest

from warmkv.server.embedded import EmbeddedServer

from .conftest import start_server

TINY = "tiny"
MODEL = "SmolLM2-135M-Instruct"


def tool(name: str, properties: dict, required: list[str]) -> dict:
    schema = {"type": "object", "properties": properties, "required": required}
    schema["additionalProperties"] = False
    return {"type": "function", "function": {"name": name, "parameters": schema}}


TOOLS = [
    tool(
        "get_weather",
        {
            "city": {"type": "string", "maxLength": 12},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
        },
        ["city", "unit"],
    ),
    tool(
        "convert_currency",
        {
            "amount": {"type": "integer", "minimum": 0, "maximum": 1000000},
            "to": {"enum": ["EUR", "USD", "JPY"]},
        },
        ["amount", "to"],
    ),
    tool(
        "search",
        {"query": {"type": "string", "minLength": 1, "maxLength": 10}, "exact": {"type": "boolean"}},
        ["query", "exact"],
    ),
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What's the weather in Paris, in euros?"}]


@pytest.fixture(scope="module")
def tiny_server(tiny_llama) -> Iterator[EmbeddedServer]:
    running = start_server(tiny_llama, served_model_name=TINY)
    yield running
    running.stop()


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def assert_valid_calls(calls: list, allowed: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_twenty_forced_tool_calls_are_all_valid(tiny_server: EmbeddedServer) -> None:
    # one call each (the tiny model's 512-token window leaves no room for a random number of parallel
    # calls; those are tested on SmolLM2 below)
    client = tiny_server.client()
    names = list(SCHEMAS)
    for i in range(20):
        named = i % 2 == 1
        choice = {"type": "function", "function": {"name": names[i % 3]}} if named else "required"
        response = client.chat.completions.create(
            model=TINY,
            messages=ASK,
            tools=TOOLS,
            tool_choice=choice,
            parallel_tool_calls=False,
            temperature=1.0,
            seed=i,
            max_tokens=70,
        )
        reply = response.choices[0]
        assert reply.finish_reason == "tool_calls" and reply.message.content is None, reply
        assert_valid_calls(reply.message.tool_calls, {names[i % 3]} if named else set(names))
        assert len(reply.message.tool_calls) == 1


def test_required_with_parallel_calls_gives_valid_calls(server: EmbeddedServer) -> None:
    ask = [{"role": "user", "content": "Weather in Paris and in Rome, please."}]
    for seed in range(2):
        reply = (
            server.client()
            .chat.completions.create(
                model=MODEL,
                messages=ask,
                tools=TOOLS,
                tool_choice="required",
                temperature=1.0,
                seed=seed,
                max_tokens=200,
            )
            .choices[0]
        )
        assert reply.finish_reason == "tool_calls" and reply.message.content is None
        assert_valid_calls(reply.message.tool_calls, set(SCHEMAS))


def test_forced_calls_stream_as_tool_call_deltas(tiny_server: EmbeddedServer) -> None:
    chunks = list(
        tiny_server.client().chat.completions.create(
            model=TINY,
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=1.0,
            seed=3,
            max_tokens=70,
            stream=True,
        )
    )
    deltas = [c.choices[0].delta for c in chunks]
    calls = [call for d in deltas if d.tool_calls for call in d.tool_calls]
    assert len(calls) == 1 and calls[0].index == 0
    assert_valid_calls(calls, set(SCHEMAS))
    assert not any(d.content for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_forced_call_cut_by_max_tokens_finishes_with_length(tiny_server: EmbeddedServer) -> None:
    response = tiny_server.client().chat.completions.create(
        model=TINY, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=4
    )
    assert response.choices[0].finish_reason == "length" and not response.choices[0].message.tool_calls


def test_a_reply_cut_by_max_tokens_after_its_calls_finishes_with_length_on_every_api(
    server: EmbeddedServer,
) -> None:
    """Calls complete, the reply cut before its end: the agent must see that it was cut (it read as a
    finished tool call on every API, with the cut call's text beside the whole ones)."""
    ask = [{"role": "user", "content": "Weather in Paris and in Rome, please."}]
    body = {"model": MODEL, "messages": ask, "tools": TOOLS, "tool_choice": "required", "temperature": 0}
    chat = f"{server.url}/v1/chat/completions"
    whole = httpx.post(chat, json={**body, "max_tokens": 300}, timeout=120).json()
    assert whole["choices"][0]["finish_reason"] == "tool_calls"
    cut_at = whole["usage"]["completion_tokens"] - 1
    cut = httpx.post(chat, json={**body, "max_tokens": cut_at}, timeout=120).json()
    assert cut["choices"][0]["message"]["tool_calls"]  # a whole call before the cut
    assert cut["choices"][0]["finish_reason"] == "length"
    anthropic_tools = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]}
                       for t in TOOLS]  # fmt: skip
    message = httpx.post(f"{server.url}/v1/messages", timeout=120, json={
        "model": MODEL, "messages": ask, "tools": anthropic_tools, "tool_choice": {"type": "any"},
        "temperature": 0, "max_tokens": cut_at}).json()  # fmt: skip
    assert any(block["type"] == "tool_use" for block in message["content"])
    assert message["stop_reason"] == "max_tokens"
    response_tools = [{"type": "function", **t["function"]} for t in TOOLS]
    response = httpx.post(f"{server.url}/v1/responses", timeout=120, json={
        "model": MODEL, "input": ask, "tools": response_tools, "tool_choice": "required", "temperature": 0,
        "max_output_tokens": cut_at}).json()  # fmt: skip
    assert any(item["type"] == "function_call" for item in response["output"])
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    messages = [item for item in response["output"] if item["type"] == "message"]
    assert all(item["status"] == "incomplete" for item in messages[-1:])


def test_tools_sharing_a_name_are_a_400_on_every_api(server: EmbeddedServer) -> None:
    """(A named choice among them was a 500.)"""
    twice = [TOOLS[0], TOOLS[0]]
    name = TOOLS[0]["function"]["name"]
    requests = {
        "/v1/chat/completions": {"messages": ASK, "tools": twice, "max_tokens": 4,
                                 "tool_choice": {"type": "function", "function": {"name": name}}},
        "/v1/messages": {"messages": ASK, "max_tokens": 4, "tool_choice": {"type": "tool", "name": name},
                         "tools": [{"name": name, "input_schema": TOOLS[0]["function"]["parameters"]}] * 2},
        "/v1/responses": {"input": "hi", "max_output_tokens": 16,
                          "tool_choice": {"type": "function", "name": name},
                          "tools": [{"type": "function", **TOOLS[0]["function"]}] * 2},
    }  # fmt: skip
    for path, fields in requests.items():
        response = httpx.post(f"{server.url}{path}", json={"model": MODEL, **fields}, timeout=120)
        assert response.status_code == 400, (path, response.text)
        message = response.json()["error"]["message"]
        assert message == f"tools: two tools are named {name!r}; each needs a name of its own"


def test_json_schema_reply_satisfies_the_schema_on_the_tiny_model(tiny_server: EmbeddedServer) -> None:
    schema = SCHEMAS["get_weather"]
    for seed in range(4):
        response = tiny_server.client().chat.completions.create(
            model=TINY,
            messages=ASK,
            temperature=1.0,
            seed=seed,
            max_tokens=100,
            response_format=json_schema_format(schema),
        )
        assert response.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(response.choices[0].message.content), schema)


def test_json_object_reply_is_a_json_object(server: EmbeddedServer) -> None:
    ask = [{"role": "user", "content": "Give the capital and population of France as JSON."}]
    for seed in range(3):
        response = server.client().chat.completions.create(
            model=MODEL,
            messages=ask,
            temperature=1.0,
            seed=seed,
            max_tokens=200,
            response_format={"type": "json_object"},
        )
        assert response.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(response.choices[0].message.content), dict)


class City(pydantic.BaseModel):
    name: str
    country: str
    population: int
    is_capital: bool


def test_parse_with_a_pydantic_model(server: EmbeddedServer) -> None:
    ask = [{"role": "user", "content": "Describe Paris."}]
    response = server.client().chat.completions.parse(
        model=MODEL, messages=ask, response_format=City, temperature=0, max_tokens=200
    )
    parsed = response.choices[0].message.parsed
    assert isinstance(parsed, City) and parsed.name


def test_json_reply_with_tools_on_auto_is_json_or_calls(tiny_server: EmbeddedServer) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    for seed in range(4):
        reply = (
            tiny_server.client()
            .chat.completions.create(
                model=TINY,
                messages=ASK,
                tools=TOOLS,
                parallel_tool_calls=False,
                temperature=1.0,
                seed=seed,
                max_tokens=70,
                response_format=json_schema_format(schema),
            )
            .choices[0]
        )
        if reply.message.tool_calls:
            assert_valid_calls(reply.message.tool_calls, set(SCHEMAS))
        else:
            jsonschema.validate(json.loads(reply.message.content), schema)


@pytest.mark.parametrize(
    ("response_format", "fragment"),
    [
        (json_schema_format({"type": "no-such"}), "cannot be enforced"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "yaml"}, "response_format.type"),
    ],
)
def test_a_format_that_cannot_be_enforced_is_a_400(
    tiny_server: EmbeddedServer, response_format: dict, fragment: str
) -> None:
    body = {"model": TINY, "messages": ASK, "response_format": response_format}
    response = httpx.post(f"{tiny_server.url}/v1/chat/completions", json=body)
    assert response.status_code == 400 and fragment in response.json()["error"]["message"]
