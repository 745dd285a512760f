"""Anthropic's Messages API through the official anthropic SDK, against a real server."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest

from warmkv.engine.config import EngineConfig
from warmkv.server.embedded import EmbeddedServer

from .conftest import start_server

MODEL = "SmolLM2-135M-Instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
FORCE_WEATHER = {"type": "tool", "name": "get_weather"}
CALL_1 = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
CALL_2 = {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome"}}


def client(server: EmbeddedServer, api_key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=api_key, max_retries=0)


def create(
    server: EmbeddedServer, messages: list[dict], salt: str, **options: object
) -> anthropic.types.Message:
    options.setdefault("max_tokens", 20)
    return client(server).messages.create(model=MODEL, messages=messages, extra_body=greedy(salt), **options)


def greedy(salt: str | None = None) -> dict:
    # the current SDK no longer offers temperature; the API (and warmkv) still take it
    return {"temperature": 0} | ({"cache_salt": salt} if salt else {})


def prompt_tokens(usage: anthropic.types.Usage) -> int:
    return usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens


def test_create_answers_with_anthropic_usage(server: EmbeddedServer) -> None:
    message = create(server, FRANCE, "fresh-anthropic")
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert [block.type for block in message.content] == ["text"]
    assert "Paris" in message.content[0].text
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    # the same prompt as the chat completions API renders for this conversation
    assert prompt_tokens(message.usage) == 37 and message.usage.cache_read_input_tokens == 0
    assert message.usage.output_tokens > 0


def test_system_blocks_max_tokens_and_stop_sequences(server: EmbeddedServer) -> None:
    system = [{"type": "text", "text": "You are a geography tutor."}, {"type": "text", "text": " Be terse."}]
    cut = create(server, FRANCE, "stops", system=system, max_tokens=3)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 3
    whole = create(server, FRANCE, "stops", system=system, max_tokens=30).content[0].text
    word = whole.split()[1]
    stopped = create(server, FRANCE, "stops", system=system, max_tokens=30, stop_sequences=[word])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == word
    assert word not in stopped.content[0].text and whole.startswith(stopped.content[0].text)


def test_stream_sends_the_event_sequence_and_the_same_text(server: EmbeddedServer) -> None:
    whole = create(server, FRANCE, "stream").content[0].text
    with client(server).messages.stream(
        model=MODEL, max_tokens=20, messages=FRANCE, extra_body=greedy("stream")
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [event.type for event in events if event.type != "text"]  # "text": the SDK's own helper event
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    # on the wire, as named events (the SDK drops the ping)
    body = {"model": MODEL, "max_tokens": 5, "messages": FRANCE, "stream": True, **greedy()}
    with httpx.stream("POST", f"{server.url}/v1/messages", json=body) as wire:
        names = [line.removeprefix("event: ") for line in wire.iter_lines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "ping", "content_block_start"] and names[-1] == "message_stop"
    assert final.content[0].text == whole and final.stop_reason == "end_turn"
    assert final.usage.cache_read_input_tokens == 36 and final.usage.output_tokens > 0


def test_forced_tool_use_and_tool_result_round_trip(server: EmbeddedServer) -> None:
    question = [{"role": "user", "content": "What's the weather in Paris?"}]
    first = create(server, question, "tools", tools=[WEATHER_TOOL], tool_choice=FORCE_WEATHER, max_tokens=60)
    assert first.stop_reason == "tool_use"
    (call,) = [block for block in first.content if block.type == "tool_use"]
    assert call.name == "get_weather" and isinstance(call.input, dict) and call.id

    result = {"type": "tool_result", "tool_use_id": call.id, "content": '{"sky": "sunny"}'}
    history = [*question, {"role": "assistant", "content": first.content},
               {"role": "user", "content": [result]}]  # fmt: skip
    second = create(server, history, "tools", tools=[WEATHER_TOOL], max_tokens=20)
    assert second.stop_reason in ("end_turn", "max_tokens", "tool_use")
    # the first turn's whole prompt (tools and question) is read back from the cache
    assert second.usage.cache_read_input_tokens >= prompt_tokens(first.usage)


def test_tool_choice_any_is_enforced_by_grammar(server: EmbeddedServer) -> None:
    # unconstrained, SmolLM2 answers a forced call with a function that does not exist; the grammar on the
    # shared chat path makes it one call to a declared tool, whose input satisfies the tool's schema
    question = [{"role": "user", "content": "What's the weather in Paris?"}]
    message = create(server, question, "any", tools=[WEATHER_TOOL], max_tokens=60,
                     tool_choice={"type": "any", "disable_parallel_tool_use": True})  # fmt: skip
    assert message.stop_reason == "tool_use"
    (call,) = [block for block in message.content if block.type == "tool_use"]
    assert call.name == "get_weather" and isinstance(call.input.get("city"), str)
    assert [block.type for block in message.content] == ["tool_use"]


def test_streamed_tool_use_sends_input_json_delta(server: EmbeddedServer) -> None:
    question = [{"role": "user", "content": "What's the weather in Paris?"}]
    events = list(
        client(server).messages.create(
            model=MODEL, max_tokens=60, messages=question, tools=[WEATHER_TOOL], tool_choice=FORCE_WEATHER,
            stream=True, extra_body=greedy(),
        )
    )  # fmt: skip
    starts = [e.content_block for e in events if e.type == "content_block_start"]
    assert [block.type for block in starts] == ["tool_use"] and starts[0].name == "get_weather"
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    assert deltas and all(d.type == "input_json_delta" for d in deltas)
    (message_delta,) = [e for e in events if e.type == "message_delta"]
    assert message_delta.delta.stop_reason == "tool_use" and message_delta.usage.output_tokens > 0


def test_count_tokens_matches_the_prompt_of_create(server: EmbeddedServer) -> None:
    options = {"system": "Answer briefly.", "tools": [WEATHER_TOOL]}
    counted = client(server).messages.count_tokens(model=MODEL, messages=FRANCE, **options)
    message = create(server, FRANCE, "count", **options)
    assert counted.input_tokens == prompt_tokens(message.usage) > 37


def test_cache_control_breakpoint_reports_cache_creation(server: EmbeddedServer) -> None:
    system = [
        {
            "type": "text",
            "text": "You are a terse geography tutor. " * 8,
            "cache_control": {"type": "ephemeral"},
        }
    ]
    first = create(server, FRANCE, "breakpoint", system=system)
    assert first.usage.cache_creation_input_tokens > 0 and first.usage.cache_read_input_tokens == 0
    again = create(server, [{"role": "user", "content": "And of Italy?"}], "breakpoint", system=system)
    # the system prompt, cached up to the breakpoint: read back, nothing created
    assert again.usage.cache_read_input_tokens >= first.usage.cache_creation_input_tokens
    assert again.usage.cache_creation_input_tokens == 0


def test_conversation_started_on_chat_completions_continues_warm_on_messages(server: EmbeddedServer) -> None:
    history = [{"role": "system", "content": "You are a terse geography tutor. " * 8}, *FRANCE]
    first = server.client().chat.completions.create(
        model=MODEL, messages=history, max_tokens=12, temperature=0, extra_body={"cache_salt": "cross"}
    )
    reply = first.choices[0].message.content
    turn = [*FRANCE, {"role": "assistant", "content": reply}, {"role": "user", "content": "And Italy?"}]
    second = create(server, turn, "cross", system=history[0]["content"])
    assert second.usage.cache_read_input_tokens >= first.usage.prompt_tokens


def test_errors_have_anthropic_bodies(server: EmbeddedServer) -> None:
    url = f"{server.url}/v1/messages"
    missing = httpx.post(url, json={"model": MODEL, "messages": FRANCE})
    assert missing.status_code == 400
    assert missing.json()["type"] == "error" and missing.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in missing.json()["error"]["message"]
    unknown = httpx.post(url, json={"model": MODEL, "messages": FRANCE, "max_tokens": 5, "container": "x"})
    assert unknown.status_code == 400 and "container" in unknown.json()["error"]["message"]
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}
    body = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [image]}]}
    refused = httpx.post(url, json=body)
    assert refused.status_code == 400 and "'image'" in refused.json()["error"]["message"]
    version = httpx.post(url, json={**body, "messages": FRANCE}, headers={"anthropic-version": "2022-12-31"})
    assert version.status_code == 400 and "anthropic-version" in version.json()["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as err:
        client(server).messages.create(model="claude-nonesuch", max_tokens=5, messages=FRANCE)
    assert err.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError):
        client(server).messages.create(
            model=MODEL, max_tokens=5, messages=FRANCE, extra_body={"temperature": 1.5}
        )


def test_x_api_key_authenticates(default_model) -> None:
    guarded = start_server(default_model, EngineConfig(kv_pool_tokens=2048), api_key="sekret")
    try:
        with pytest.raises(anthropic.AuthenticationError) as err:
            client(guarded, "wrong").messages.count_tokens(model=MODEL, messages=FRANCE)
        assert err.value.body["error"]["type"] == "authentication_error"
        counted = client(guarded, "sekret").messages.count_tokens(model=MODEL, messages=FRANCE)
        assert counted.input_tokens == 37
        # the same key as a Bearer token (how Claude Code sends ANTHROPIC_AUTH_TOKEN)
        bearer = anthropic.Anthropic(base_url=guarded.url, auth_token="sekret", max_retries=0)
        assert bearer.messages.count_tokens(model=MODEL, messages=FRANCE).input_tokens == 37
    finally:
        guarded.stop()


def test_a_final_assistant_message_is_continued_as_a_prefill(server: EmbeddedServer, default_model) -> None:
    """The reply goes on with the prefill's text (it used to close that turn and start another); chat
    completions' continue_final_message (vLLM's) gives the same tokens from the same prompt."""
    from warmkv.chat.prompt import build_chat_prompt
    from warmkv.chat.tool_calls import PARSERS

    tokenizer = default_model.tokenizer
    prefill = [{"role": "user", "content": "Describe a dog as JSON."},
               {"role": "assistant", "content": '{"breed": "'}]  # fmt: skip
    continued = build_chat_prompt(tokenizer, tokenizer.chat_template, PARSERS["hermes"], prefill, None, None,
                                  continue_final=True)  # fmt: skip
    assert continued.text.endswith('<|im_start|>assistant\n{"breed": "')
    message = create(server, prefill, "prefill", max_tokens=12)
    assert prompt_tokens(message.usage) == len(continued.token_ids)
    counted = httpx.post(f"{server.url}/v1/messages/count_tokens", json={"model": MODEL, "messages": prefill})
    assert counted.json() == {"input_tokens": len(continued.token_ids)}
    assert message.stop_reason == "max_tokens" and not message.content[0].text.startswith("{")
    chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": prefill, "max_tokens": 12, "temperature": 0, "cache_salt": "prefill",
        "continue_final_message": True, "add_generation_prompt": False}).json()  # fmt: skip
    assert chat["usage"]["prompt_tokens"] == len(continued.token_ids)
    assert chat["choices"][0]["message"]["content"] == message.content[0].text


@pytest.mark.parametrize(
    ("path", "body", "says"),
    [
        ("/v1/messages", {"max_tokens": 4, "messages": [*FRANCE, {"role": "assistant", "content": "Paris "}]},
         "final assistant content cannot end with trailing whitespace"),
        ("/v1/chat/completions", {"messages": FRANCE, "continue_final_message": True},
         "only an assistant message can be continued"),
        ("/v1/chat/completions", {"messages": FRANCE, "add_generation_prompt": False},
         "add_generation_prompt: false is supported only with continue_final_message"),
        ("/v1/chat/completions", {"continue_final_message": True, "messages": [*FRANCE, {
            "role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
         "the last message has no text to continue"),
    ],
)  # fmt: skip
def test_a_prefill_that_cannot_be_continued_is_a_400(server: EmbeddedServer, path: str, body: dict,
                                                    says: str) -> None:  # fmt: skip
    response = httpx.post(f"{server.url}{path}", json={"model": MODEL, **body}, timeout=120)
    assert response.status_code == 400 and says in response.json()["error"]["message"], response.text


def test_a_cut_reply_has_its_blocks_in_one_order_streamed_or_not(server: EmbeddedServer) -> None:
    """A whole call, then the next call cut by max_tokens (returned as text): the message lists the blocks
    in the order the stream starts them (it put all text first)."""
    from .test_structured_output import TOOLS

    tools = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in TOOLS]
    ask = [{"role": "user", "content": "Weather in Paris and in Rome, please."}]
    body = {"model": MODEL, "messages": ask, "tools": tools, "tool_choice": {"type": "any"}, "temperature": 0}
    url = f"{server.url}/v1/messages"
    whole = httpx.post(url, json={**body, "max_tokens": 300}, timeout=120).json()
    cut_at = whole["usage"]["output_tokens"] - 10
    message = httpx.post(url, json={**body, "max_tokens": cut_at}, timeout=120).json()
    blocks: list[dict] = []
    streamed = {**body, "max_tokens": cut_at, "stream": True}
    with httpx.stream("POST", url, json=streamed, timeout=120) as events:
        for line in events.iter_lines():
            event = json.loads(line.removeprefix("data: ")) if line.startswith("data: ") else {}
            if event.get("type") == "content_block_start":
                blocks.append(dict(event["content_block"]))
            elif event.get("type") == "content_block_delta" and event["delta"]["type"] == "text_delta":
                blocks[event["index"]]["text"] += event["delta"]["text"]
    assert [b["type"] for b in message["content"]] == [b["type"] for b in blocks] == ["tool_use", "text"]
    assert message["content"][1]["text"] == blocks[1]["text"] and blocks[1]["text"].startswith("<tool_call>")


@pytest.mark.parametrize(
    "turns",
    [
        [{"role": "assistant", "content": []}],  # an empty final assistant message: a new turn, as before
        [{"role": "assistant", "content": [CALL_1, CALL_2]},
         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "a"}]},
         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_2", "content": "b"}]}],
        [{"role": "assistant", "content": [CALL_1]}, {"role": "assistant", "content": [CALL_2]},
         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "a"},
                                      {"type": "tool_result", "tool_use_id": "toolu_2", "content": "b"}]}],
    ],
)  # fmt: skip
def test_turns_anthropic_combines_are_served(server: EmbeddedServer, turns: list[dict]) -> None:
    """Consecutive messages of one role are one turn: results may answer calls split over two messages."""
    body = {"model": MODEL, "max_tokens": 2, "messages": [*FRANCE, *turns], "tools": [WEATHER_TOOL]}
    response = httpx.post(f"{server.url}/v1/messages", json=body, timeout=120)
    assert response.status_code == 200, response.text
