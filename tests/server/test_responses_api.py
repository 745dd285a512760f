"""OpenAI's Responses API through the openai SDK and the OpenAI Agents SDK, against a real server."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from warmkv.server.embedded import EmbeddedServer

MODEL = "SmolLM2-135M-Instruct"
FRANCE = "What is the capital of France?"
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
FORCE_WEATHER = {"type": "function", "name": "get_weather"}


def respond(server: EmbeddedServer, salt: str, **options: object):
    return server.client().responses.create(
        model=MODEL, temperature=0, extra_body={"cache_salt": salt}, **options
    )


def test_plain_response_with_usage(server: EmbeddedServer) -> None:
    response = respond(server, "fresh-responses", input=FRANCE, max_output_tokens=20)
    assert (
        response.object == "response" and response.status == "completed" and response.id.startswith("resp_")
    )
    assert [item.type for item in response.output] == ["message"]
    assert "Paris" in response.output_text
    # the same prompt as the chat completions API renders for this conversation
    assert response.usage.input_tokens == 37 and response.usage.input_tokens_details.cached_tokens == 0
    assert response.usage.output_tokens > 0


def test_output_limit_makes_an_incomplete_response(server: EmbeddedServer) -> None:
    response = respond(server, "limit", input=FRANCE, max_output_tokens=3, instructions="Be terse.")
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3 and response.instructions == "Be terse."


def test_stream_sends_the_event_sequence_and_the_same_text(server: EmbeddedServer) -> None:
    whole = respond(server, "stream", input=FRANCE, max_output_tokens=20).output_text
    events = list(respond(server, "stream", input=FRANCE, max_output_tokens=20, stream=True))
    kinds = [event.type for event in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]  # fmt: skip
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]  # fmt: skip
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole
    completed = events[-1].response
    assert completed.output_text == whole and completed.usage.input_tokens_details.cached_tokens == 36


def test_function_call_round_trip_with_previous_response_id(server: EmbeddedServer) -> None:
    question = "What's the weather in Paris?"
    first = respond(server, "calls", input=question, tools=[WEATHER_TOOL], tool_choice=FORCE_WEATHER,
                    max_output_tokens=60)  # fmt: skip
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    assert isinstance(json.loads(call.arguments), dict)

    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "sunny"}'}
    second = respond(server, "calls", input=[result], previous_response_id=first.id, tools=[WEATHER_TOOL],
                     max_output_tokens=20)  # fmt: skip
    assert second.status in ("completed", "incomplete") and second.previous_response_id == first.id
    # the stored conversation was replayed: the first turn's prompt is read back from the cache
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens

    # the same history sent whole as items (store=false clients such as Codex) renders the same prompt
    items = [{"role": "user", "content": question}, call.model_dump(exclude_none=True), result]
    whole = respond(server, "calls", input=items, tools=[WEATHER_TOOL], max_output_tokens=20, store=False)
    assert whole.usage.input_tokens == second.usage.input_tokens
    assert whole.output_text == second.output_text


def test_streamed_function_call_sends_argument_events(server: EmbeddedServer) -> None:
    events = list(respond(server, "stream-calls", input="What's the weather in Paris?", tools=[WEATHER_TOOL],
                          tool_choice=FORCE_WEATHER, max_output_tokens=60, stream=True))  # fmt: skip
    kinds = [event.type for event in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]  # fmt: skip
    done = events[4]
    assert done.name == "get_weather" and isinstance(json.loads(done.arguments), dict)
    assert events[-1].response.output[0].arguments == done.arguments


def test_conversation_started_on_chat_completions_continues_warm_on_responses(server: EmbeddedServer) -> None:
    system = "You are a terse geography tutor. " * 8
    history = [{"role": "system", "content": system}, {"role": "user", "content": FRANCE}]
    first = server.client().chat.completions.create(
        model=MODEL, messages=history, max_tokens=12, temperature=0, extra_body={"cache_salt": "cross"}
    )
    items = [{"role": "user", "content": FRANCE},
             {"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And Italy?"}]  # fmt: skip
    second = respond(server, "cross", input=items, instructions=system, max_output_tokens=10)
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_unsupported_fields_are_refused_by_name(server: EmbeddedServer) -> None:
    url = f"{server.url}/v1/responses"
    base = {"model": MODEL, "input": FRANCE}
    for field, value in [("background", True), ("conversation", "conv_1"), ("top_logprobs", 3),
                         ("text", {"format": {"type": "grammar"}}), ("truncation", "auto"),
                         ("tools", [{"type": "web_search"}])]:  # fmt: skip
        answer = httpx.post(url, json={**base, field: value})
        assert answer.status_code == 400, field
        assert answer.json()["error"]["param"].startswith(field), answer.json()
    image = [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]
    refused = httpx.post(url, json={**base, "input": image})
    assert refused.status_code == 400 and "input_image" in refused.json()["error"]["message"]
    harmless = {
        "metadata": {"run": "1"},
        "user": "u1",
        "store": False,
        "prompt_cache_key": "k",
        "max_output_tokens": 2,
    }
    assert httpx.post(url, json={**base, **harmless}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        respond(server, "x", input=FRANCE, previous_response_id="resp_nonesuch")


def test_text_format_json_schema_and_required_tool_choice_are_enforced(server: EmbeddedServer) -> None:
    # the chat path's grammar: a JSON reply valid under the schema, and a call to a declared tool
    schema = {"type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"],
              "additionalProperties": False}  # fmt: skip
    text = {"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}}
    response = respond(server, "json", input=FRANCE, max_output_tokens=40, text=text)
    assert response.status == "completed" and response.text.format.type == "json_schema"
    assert set(json.loads(response.output_text)) == {"capital"}
    forced = respond(server, "required", input="What's the weather in Paris?", tools=[WEATHER_TOOL],
                     tool_choice="required", parallel_tool_calls=False, max_output_tokens=60)  # fmt: skip
    (call,) = [item for item in forced.output if item.type == "function_call"]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)


def test_previous_response_is_private_to_its_tenant(server: EmbeddedServer) -> None:
    first = respond(server, "tenant-a", input=FRANCE, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        respond(server, "tenant-b", input="More?", previous_response_id=first.id, max_output_tokens=2)
    unstored = respond(server, "tenant-a", input=FRANCE, max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        respond(server, "tenant-a", input="More?", previous_response_id=unstored.id, max_output_tokens=2)


def test_agents_sdk_default_runner_calls_a_tool(server: EmbeddedServer) -> None:
    agents = pytest.importorskip("agents")
    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    agents.set_tracing_disabled(True)
    agents.set_default_openai_client(openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused"))
    agent = agents.Agent(
        name="weather",
        instructions="You answer weather questions with the get_weather tool.",
        model=MODEL,  # the default provider: the Responses API through the client set above
        tools=[get_weather],
        model_settings=agents.ModelSettings(tool_choice="get_weather", temperature=0, max_tokens=60),
        tool_use_behavior="stop_on_first_tool",
    )
    result = asyncio.run(agents.Runner.run(agent, "What's the weather in Paris?", max_turns=2))
    assert len(calls) == 1 and result.final_output == f"sunny in {calls[0]}"
    (raw,) = result.raw_responses
    assert raw.usage.input_tokens > 0 and raw.usage.output_tokens > 0
