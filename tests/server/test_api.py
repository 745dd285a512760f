"""The OpenAI-compatible API through the official openai client, against a real server."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from warmkv.engine.config import EngineConfig
from warmkv.server.embedded import EmbeddedServer

from .conftest import start_server

MODEL = "SmolLM2-135M-Instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
FORCE_WEATHER = {"type": "function", "function": {"name": "get_weather"}}


def chat(server: EmbeddedServer, messages: list[dict], cache_salt: str | None = None, **options: object):
    extra_body = {"cache_salt": cache_salt} if cache_salt else None  # warmkv's field beyond OpenAI's
    return server.client().chat.completions.create(
        model=MODEL, messages=messages, temperature=0, extra_body=extra_body, **options
    )


def test_chat_answers_with_usage(server: EmbeddedServer) -> None:
    response = chat(server, FRANCE, max_tokens=20, cache_salt="fresh-chat")
    assert "Paris" in response.choices[0].message.content
    assert response.choices[0].finish_reason == "stop"
    usage = response.usage
    assert usage.prompt_tokens == 37 and usage.completion_tokens > 0
    assert usage.prompt_tokens_details.cached_tokens == 0
    extra = usage.model_extra
    assert extra["prompt_cache_hit_tokens"] + extra["prompt_cache_miss_tokens"] == usage.prompt_tokens


def test_completions(server: EmbeddedServer) -> None:
    response = server.client().completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert response.choices[0].text.strip()
    assert response.usage.completion_tokens == 5 and response.choices[0].finish_reason == "length"


def test_streaming_matches_whole_response_and_reports_usage(server: EmbeddedServer) -> None:
    whole = chat(server, FRANCE, max_tokens=20).choices[0].message.content
    stream = chat(server, FRANCE, max_tokens=20, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 37
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 36  # all but the last prompt token
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_extending_request_is_cached_and_output_equals_a_fresh_server(
    server: EmbeddedServer, default_model
) -> None:
    history = [{"role": "system", "content": "You are a terse geography tutor. " * 8}, *FRANCE]
    first = chat(server, history, max_tokens=12, cache_salt="extend")
    history += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And the capital of Italy?"},
    ]
    second = chat(server, history, max_tokens=12, cache_salt="extend")
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 16
    fresh = start_server(default_model, EngineConfig(kv_pool_tokens=4096, prefix_cache=False))
    try:
        cold = chat(fresh, history, max_tokens=12, cache_salt="extend")
    finally:
        fresh.stop()
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert cold.choices[0].message.content == second.choices[0].message.content


def test_forced_tool_call_round_trip(server: EmbeddedServer) -> None:
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    response = chat(server, messages, tools=[WEATHER_TOOL], tool_choice=FORCE_WEATHER, max_tokens=60)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments), dict)

    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"city": "Paris", "sky": "sunny"})},
    ]
    answer = chat(server, messages, tools=[WEATHER_TOOL], max_tokens=30)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    assert answer.usage.prompt_tokens_details.cached_tokens > 0  # the tool list and question were reused


def test_forced_tool_call_streams_as_tool_call_delta(server: EmbeddedServer) -> None:
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    chunks = list(
        chat(server, messages, tools=[WEATHER_TOOL], tool_choice=FORCE_WEATHER, max_tokens=60, stream=True)
    )
    deltas = [c.choices[0].delta for c in chunks]
    calls = [d.tool_calls[0] for d in deltas if d.tool_calls]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(d.content for d in deltas)


def test_required_tool_choice_yields_a_call_to_a_declared_tool(server: EmbeddedServer) -> None:
    # unconstrained, SmolLM2 answers this with a call to a function that does not exist
    response = chat(server, [{"role": "user", "content": "What's the weather in Paris?"}],
                    tools=[WEATHER_TOOL], tool_choice="required", max_tokens=60)  # fmt: skip
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert {call.function.name for call in choice.message.tool_calls} == {"get_weather"}
    assert all("city" in json.loads(call.function.arguments) for call in choice.message.tool_calls)


def test_max_tokens_zero_prefills_for_later_requests(server: EmbeddedServer, default_model) -> None:
    system = {"role": "system", "content": "You answer questions about the solar system. " * 10}
    warmup, real = (
        [system, {"role": "user", "content": "hi"}],
        [system, {"role": "user", "content": "How many?"}],
    )
    warm = chat(server, warmup, max_tokens=0, cache_salt="warmup")
    assert warm.choices[0].message.content == "" and warm.usage.completion_tokens == 0
    follow = chat(server, real, max_tokens=5, cache_salt="warmup")
    shared = _common_prefix(*(_prompt_ids(default_model, m) for m in (warmup, real)))
    assert shared > 80
    # to the token: whole blocks, then the warm-up's tail up to where the two prompts part
    assert follow.usage.prompt_tokens_details.cached_tokens == shared


def _prompt_ids(model, messages: list[dict]) -> list[int]:
    return list(model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def test_cache_salt_isolates_tenants(server: EmbeddedServer) -> None:
    messages = [{"role": "user", "content": "Tell me about the Loire valley and its castles, please. " * 4}]
    chat(server, messages, max_tokens=1, cache_salt="tenant-a")
    assert (
        chat(server, messages, max_tokens=1, cache_salt="tenant-b").usage.prompt_tokens_details.cached_tokens
        == 0
    )
    assert (
        chat(server, messages, max_tokens=1, cache_salt="tenant-a").usage.prompt_tokens_details.cached_tokens
        > 0
    )


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ("{not json", 400, "JSON"),
        ({"model": MODEL, "messages": FRANCE, "temperature": "hot"}, 400, "temperature"),
        ({"model": MODEL, "messages": []}, 400, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
        ({"model": MODEL, "messages": FRANCE, "n": 9}, 400, "n"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "word " * 9000}]},
            400,
            "context window is 8192",
        ),
        ({"model": MODEL, "messages": FRANCE, "max_tokens": 9000}, 400, "max_tokens asks for 9000"),
        ({"model": "gpt-4o", "messages": FRANCE}, 404, "gpt-4o"),
        ({"model": MODEL, "messages": FRANCE, "tool_choice": "required"}, 400, "no tools"),
    ],
)
def test_bad_requests_get_openai_error_bodies(
    server: EmbeddedServer, body: object, status: int, fragment: str
) -> None:
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(
        f"{server.url}/v1/chat/completions", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"]
    assert httpx.get(f"{server.url}/health").status_code == 200  # nothing crashed


def test_openai_client_raises_typed_errors(server: EmbeddedServer) -> None:
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="nope", messages=FRANCE)
    with pytest.raises(openai.BadRequestError) as refused:
        chat(server, FRANCE, max_tokens=100_000)
    assert refused.value.code == "context_length_exceeded"


def test_models_and_metrics(server: EmbeddedServer) -> None:
    assert [m.id for m in server.client().models.list().data] == [MODEL]
    chat(server, FRANCE, max_tokens=3)
    chat(server, FRANCE, max_tokens=3)  # a hit, whichever tests ran before
    metrics = httpx.get(f"{server.url}/metrics").text
    cached = next(line for line in metrics.splitlines() if line.startswith("warmkv_cached_tokens_total"))
    assert float(cached.split()[-1]) > 0
    assert "warmkv_time_to_first_token_seconds_bucket" in metrics
    tiers = {
        line.split("{")[1].split("}")[0]
        for line in metrics.splitlines()
        if line.startswith("warmkv_cache_bytes")
    }
    assert tiers == {'tier="live"', 'tier="host"', 'tier="disk"'}


def test_model_card_by_id(server: EmbeddedServer) -> None:
    card = server.client().models.retrieve(MODEL)
    assert card.id == MODEL and card.owned_by == "warmkv" and card.model_extra["max_model_len"] > 0
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("gpt-nonesuch")


def test_client_disconnect_cancels_generation(server: EmbeddedServer) -> None:
    assert server.engine.num_pending == 0  # earlier requests, streamed or not, left nothing behind
    body = {"model": MODEL, "messages": FRANCE, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if '"content"' in line and '""' not in line:
                break  # one real token arrived; now hang up
    deadline = time.monotonic() + 10
    while server.engine.num_pending or server.engine.engine.has_work:
        assert time.monotonic() < deadline, "generation kept running after the client left"
        time.sleep(0.05)


def test_api_key_is_required_when_set(default_model) -> None:
    guarded = start_server(default_model, EngineConfig(kv_pool_tokens=2048), api_key="sekret")
    try:
        with pytest.raises(openai.AuthenticationError):
            guarded.client("wrong").models.list()
        assert httpx.post(f"{guarded.url}/v1/chat/completions", json={}).status_code == 401
        assert guarded.client("sekret").models.list().data[0].id == MODEL
        assert httpx.get(f"{guarded.url}/health").status_code == 200
    finally:
        guarded.stop()


def test_full_queue_answers_429(default_model) -> None:
    busy = start_server(default_model, EngineConfig(kv_pool_tokens=4096), max_pending=1)
    body = {"model": MODEL, "messages": FRANCE, "max_tokens": 300, "ignore_eos": True, "stream": True}
    started, done = threading.Event(), threading.Event()

    def long_request() -> None:
        with httpx.stream("POST", f"{busy.url}/v1/chat/completions", json=body, timeout=60) as response:
            for _ in response.iter_lines():
                started.set()
                if done.is_set():
                    break

    worker = threading.Thread(target=long_request)
    worker.start()
    try:
        assert started.wait(30)
        response = httpx.post(f"{busy.url}/v1/chat/completions", json={**body, "stream": False})
        assert response.status_code == 429 and response.json()["error"]["code"] == "rate_limit_exceeded"
        assert response.headers["retry-after"] == "1"  # the SDKs wait this long before they retry
    finally:
        done.set()
        worker.join(60)
        busy.stop()


def test_concurrent_requests_get_their_own_answers(server: EmbeddedServer) -> None:
    questions = [
        "What is the capital of France?",
        "What is 2 + 2?",
        "Name a primary colour.",
        "Who wrote Hamlet?",
    ]
    alone = [
        chat(server, [{"role": "user", "content": q}], max_tokens=12).choices[0].message.content
        for q in questions
    ]
    together: list[str | None] = [None] * len(questions)

    def ask(index: int) -> None:
        messages = [{"role": "user", "content": questions[index]}]
        together[index] = chat(server, messages, max_tokens=12).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert together == alone


def test_trace_and_log_line_record_cache_numbers(default_model, tmp_path, caplog) -> None:
    trace = tmp_path / "trace.jsonl"
    traced = start_server(default_model, EngineConfig(kv_pool_tokens=2048), trace=trace)
    try:
        with caplog.at_level("INFO", logger="warmkv.server"):
            chat(traced, FRANCE, max_tokens=4)
            chat(traced, FRANCE, max_tokens=4)
    finally:
        traced.stop()
    first, second = (json.loads(line) for line in trace.read_text().splitlines())
    assert (first["cached_tokens"], first["computed_tokens"], first["cache_source"]) == (0, 37, "none")
    assert (second["cached_tokens"], second["computed_tokens"], second["cache_source"]) == (36, 1, "live:36")
    assert second["prompt_tokens"] == 37 and second["ttft_ms"] > 0 and second["finish_reason"] == "length"
    lines = [r.getMessage() for r in caplog.records if r.name == "warmkv.server"]
    assert any("prompt=37 cached=36 (live:36) computed=1" in line for line in lines)


def test_resent_history_whose_text_retokenises_differently_still_hits(
    server: EmbeddedServer, default_model
) -> None:
    # a first prompt of whole blocks, so its last token ("\n" after "assistant") lies in a reusable block;
    # the reply's leading "\n\n" merges with that "\n" when the second prompt is tokenised as one text
    words = next(n for n in range(20, 60) if len(_prompt_ids(default_model, _planning(n))) % 16 == 0)
    first = chat(server, _planning(words), max_tokens=0, cache_salt="retokenise")
    history = [*_planning(words), {"role": "assistant", "content": "\n\nHere is the plan."},
               {"role": "user", "content": "Go on."}]  # fmt: skip
    second = chat(server, history, max_tokens=1, cache_salt="retokenise")
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens


def _planning(words: int) -> list[dict]:
    return [{"role": "system", "content": "plan " * words}, {"role": "user", "content": "Plan the fix."}]
