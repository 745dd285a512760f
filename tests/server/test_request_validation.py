"""Hostile or unlucky request fields are refused at the edge with a 400 naming the field, and the
server keeps serving: a later request, and one already in flight, still complete."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from warmkv.server.embedded import EmbeddedServer

MODEL = "SmolLM2-135M-Instruct"
HELLO = [{"role": "user", "content": "Say hello."}]
LONE_SURROGATE = "\ud800"  # JSON can carry it escaped; UTF-8 cannot encode it


def post(server: EmbeddedServer, path: str, body: dict) -> httpx.Response:
    # json.dumps escapes the surrogate as \ud800, as a hostile client's JSON would
    return httpx.post(
        f"{server.url}{path}", content=json.dumps(body), headers={"content-type": "application/json"},
        timeout=120,
    )  # fmt: skip


def assert_refused(response: httpx.Response, param: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"].startswith(f"{param}: ")


def assert_still_serving(server: EmbeddedServer) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 4, "temperature": 0.7, "seed": 1}
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**40])
def test_seed_beyond_64_bits_is_refused_and_the_engine_lives_on(server: EmbeddedServer, seed: int) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 4, "temperature": 1.0, "seed": seed}
    assert_refused(post(server, "/v1/chat/completions", body), "seed")
    completion = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 1.0, "seed": seed}
    assert_refused(post(server, "/v1/completions", completion), "seed")
    assert_still_serving(server)


def test_largest_seed_torch_accepts_samples(server: EmbeddedServer) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 3, "temperature": 1.0, "seed": 2**64 - 1,
            "ignore_eos": True}  # fmt: skip
    first = post(server, "/v1/chat/completions", body)
    assert first.status_code == 200, first.text
    again = post(server, "/v1/chat/completions", body)
    assert again.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]  # seeded


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/chat/completions", {"messages": HELLO, "cache_salt": LONE_SURROGATE}, "cache_salt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": f"hi {LONE_SURROGATE}"}]},
         "messages.0.content"),
        ("/v1/chat/completions",
         {"messages": [{"role": "user", "content": [{"type": "text", "text": LONE_SURROGATE}]}]},
         "messages.0.content.0.text"),
        ("/v1/chat/completions", {"messages": HELLO, "user": LONE_SURROGATE}, "user"),
        ("/v1/chat/completions", {"messages": HELLO, "stop": ["x", LONE_SURROGATE]}, "stop.1"),
        ("/v1/chat/completions", {"messages": HELLO, "some_extension": {"deep": [LONE_SURROGATE]}},
         "some_extension.deep.0"),  # unknown fields are ignored, but not unencodable ones
        ("/v1/completions", {"prompt": f"The capital {LONE_SURROGATE}"}, "prompt"),
    ],
)  # fmt: skip
def test_unencodable_text_is_refused_naming_the_field(
    server: EmbeddedServer, path: str, fields: dict, param: str
) -> None:
    assert_refused(post(server, path, {"model": MODEL, "max_tokens": 2, **fields}), param)
    assert_still_serving(server)


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/messages", {"messages": [{"role": "user", "content": f"hi {LONE_SURROGATE}"}]},
         "messages.0.content"),
        ("/v1/messages", {"messages": HELLO, "system": [{"type": "text", "text": LONE_SURROGATE}]},
         "system.0.text"),
        ("/v1/messages", {"messages": HELLO, "stop_sequences": [LONE_SURROGATE]}, "stop_sequences.0"),
        ("/v1/messages/count_tokens",
         {"messages": [{"role": "user", "content": [{"type": "text", "text": LONE_SURROGATE}]}]},
         "messages.0.content.0.text"),
        ("/v1/responses", {"input": f"hi {LONE_SURROGATE}"}, "input"),
        ("/v1/responses", {"input": "hi", "instructions": LONE_SURROGATE}, "instructions"),
    ],
)  # fmt: skip
def test_unencodable_text_is_refused_by_the_anthropic_and_responses_apis(
    server: EmbeddedServer, path: str, fields: dict, param: str
) -> None:
    """Each in its own error shape (it was a 500: the tokenizer cannot take the text)."""
    limit = {"max_output_tokens": 16} if path == "/v1/responses" else {"max_tokens": 2}
    if path.endswith("count_tokens"):
        limit = {}
    for stream in (False, True):
        response = post(server, path, {"model": MODEL, **limit, **fields, "stream": stream})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"].startswith(f"{param}: ")
        assert "not valid Unicode" in error["message"]
    assert_still_serving(server)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/responses"])
def test_a_body_that_is_not_json_is_refused_saying_so(server: EmbeddedServer, path: str) -> None:
    headers = {"content-type": "application/json"}
    broken = httpx.post(f"{server.url}{path}", content=b'{"model": ', headers=headers)
    assert broken.status_code == 400
    error = broken.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"] == "the body is not valid JSON: Expecting value at character 10"
    assert error.get("param") is None  # (it named the character offset as the field)
    empty = httpx.post(f"{server.url}{path}", headers=headers)
    assert empty.status_code == 400
    assert empty.json()["error"]["message"] == "the request has no body: send a JSON object"


def test_bad_request_does_not_fail_one_in_flight(server: EmbeddedServer) -> None:
    long = {"model": MODEL, "messages": HELLO, "max_tokens": 40, "ignore_eos": True, "temperature": 0,
            "cache_salt": "in-flight"}  # fmt: skip
    result: dict[str, httpx.Response] = {}
    worker = threading.Thread(target=lambda: result.update(r=post(server, "/v1/chat/completions", long)))
    worker.start()
    while not server.engine.num_pending and worker.is_alive():
        time.sleep(0.01)  # until the long request is in the engine
    salted = {"model": MODEL, "messages": HELLO, "max_tokens": 2, "cache_salt": LONE_SURROGATE}
    assert_refused(post(server, "/v1/chat/completions", salted), "cache_salt")
    seeded = {"model": MODEL, "messages": HELLO, "max_tokens": 2, "temperature": 1.0, "seed": 2**64}
    assert_refused(post(server, "/v1/chat/completions", seeded), "seed")
    worker.join(timeout=120)
    assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 40


@pytest.mark.parametrize(
    ("path", "messages", "says"),
    [
        ("/v1/chat/completions", [{"role": "user", "content": None}],
         "messages.0: content is required in user messages"),
        ("/v1/chat/completions", [*HELLO, {"role": "tool", "tool_call_id": "c1", "content": None}],
         "messages.1: content is required in tool messages"),
        ("/v1/messages", [*HELLO, {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "read", "input": "a.py"}]}],
         "messages.1.content: a tool_use block's input must be an object"),
        ("/v1/messages", [*HELLO, {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_9", "content": "done"}]}],
         "messages.1.content: tool_result for 'toolu_9', which no tool_use block of the assistant message "
         "before it has"),
    ],
)  # fmt: skip
def test_malformed_turns_are_refused_as_the_hosted_apis_refuse_them(
    server: EmbeddedServer, path: str, messages: list, says: str
) -> None:
    """(They were served: a user turn of null content, a call's input as a string, a tool result answering
    no call.)"""
    response = post(server, path, {"model": MODEL, "max_tokens": 2, "messages": messages})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"] == says
    assert_still_serving(server)
