"""Sampling parameters through the real openai client: each one does what it says, or is refused by name."""

from __future__ import annotations

import math
from collections.abc import Iterator

import httpx
import pytest

from warmkv.server.embedded import EmbeddedServer

from .conftest import start_server

TINY = "tiny"
ASK = [{"role": "user", "content": "Tell me about Paris."}]
PROMPT = list(range(1000, 1040))
FREE = {"ignore_eos": True}  # the tiny model may end at once otherwise


@pytest.fixture(scope="module")
def tiny_server(tiny_llama) -> Iterator[EmbeddedServer]:
    running = start_server(tiny_llama, served_model_name=TINY)
    yield running
    running.stop()


def complete(server: EmbeddedServer, extra_body: dict | None = None, **options: object):
    body = {**FREE, **(extra_body or {})}  # warmkv's fields beyond OpenAI's
    return server.client().completions.create(model=TINY, prompt=PROMPT, extra_body=body, **options)


def test_logit_bias_forces_a_token(tiny_server: EmbeddedServer, tiny_llama) -> None:
    response = complete(
        tiny_server, max_tokens=5, temperature=1.0, seed=2, logit_bias={"4242": 100}, logprobs=1
    )
    assert response.choices[0].logprobs.tokens == [tiny_llama.tokenizer.decode([4242])] * 5


def test_min_p_one_and_penalties_through_the_api(tiny_server: EmbeddedServer) -> None:
    greedy = complete(tiny_server, max_tokens=30, temperature=0).choices[0].text
    sampled = complete(tiny_server, max_tokens=30, temperature=1.5, seed=1, extra_body={"min_p": 1.0})
    assert sampled.choices[0].text == greedy
    penalised = complete(
        tiny_server, max_tokens=30, temperature=0, presence_penalty=2.0, frequency_penalty=1.0
    )
    assert penalised.choices[0].text != greedy
    repeated = complete(tiny_server, max_tokens=30, temperature=0, extra_body={"repetition_penalty": 1e6})
    assert repeated.choices[0].text != greedy


def test_chat_logprobs_whole_and_streamed(tiny_server: EmbeddedServer) -> None:
    client = tiny_server.client()
    options = dict(model=TINY, messages=ASK, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
                   extra_body=FREE)  # fmt: skip
    response = client.chat.completions.create(**options)
    entries = response.choices[0].logprobs.content
    assert len(entries) == response.usage.completion_tokens == 6
    for entry in entries:
        alternatives = [alt.logprob for alt in entry.top_logprobs]
        assert len(alternatives) == 3 and alternatives == sorted(alternatives, reverse=True)
        assert entry.top_logprobs[0].token == entry.token and entry.logprob <= 0  # greedy: the likeliest
        assert bytes(entry.bytes).decode() == entry.token
    assert "".join(e.token for e in entries) == response.choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **options))
    streamed = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]


def test_completion_logprobs_columns(tiny_server: EmbeddedServer) -> None:
    choice = complete(tiny_server, max_tokens=5, temperature=0, logprobs=2).choices[0]
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text and len(logprobs.token_logprobs) == 5
    columns = zip(logprobs.top_logprobs, logprobs.token_logprobs, strict=True)
    assert all(len(top) <= 2 and max(top.values()) == lp for top, lp in columns)  # greedy: the likeliest
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(5)]
    assert all(-math.inf < lp <= 0 for lp in logprobs.token_logprobs)


def test_n_choices_are_distinct_reproducible_and_stream_by_index(tiny_server: EmbeddedServer) -> None:
    client = tiny_server.client()
    options = dict(model=TINY, messages=ASK, max_tokens=8, temperature=1.0, seed=11, n=3, extra_body=FREE)
    first = client.chat.completions.create(**options)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert first.usage.completion_tokens == 24 and first.usage.prompt_tokens < 24 + 100
    assert [c.message.content for c in client.chat.completions.create(**options).choices] == texts
    streamed = ["", "", ""]
    finished = set()
    for chunk in client.chat.completions.create(stream=True, **options):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert streamed == texts and finished == {0, 1, 2}
    completions = complete(tiny_server, max_tokens=4, temperature=1.0, seed=3, n=2)
    assert [c.index for c in completions.choices] == [0, 1]


def test_the_largest_seed_serves_every_choice(tiny_server: EmbeddedServer) -> None:
    """Choice i samples with seed + i: past 2**64 - 1 (the largest seed accepted) it wraps around, rather
    than refusing a seed the client never sent after the first choice was computed."""
    client = tiny_server.client()
    options = dict(model=TINY, messages=ASK, max_tokens=6, temperature=1.0, n=3, extra_body=FREE)
    first = client.chat.completions.create(seed=2**64 - 1, **options)
    texts = [c.message.content for c in first.choices]
    assert len(set(texts)) == 3
    again = client.chat.completions.create(seed=2**64 - 1, **options)
    assert [c.message.content for c in again.choices] == texts


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"n": 9}, "n"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"verbosity": "low"}, "verbosity"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"top_logprobs": 2}, "top_logprobs: logprobs must be true"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logit_bias": {"49152": 1}}, "logit_bias: token ids must be in [0, 49152)"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"echo": True}, "echo"),
        ({"suffix": "!"}, "suffix"),
    ],
)
def test_refused_fields_are_named_in_the_400(tiny_server: EmbeddedServer, extra: dict, fragment: str) -> None:
    response = httpx.post(
        f"{tiny_server.url}/v1/chat/completions", json={"model": TINY, "messages": ASK, **extra}
    )
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]["message"]


def test_completions_refuse_best_of_and_echo_by_name(tiny_server: EmbeddedServer) -> None:
    for extra, fragment in (
        ({"best_of": 3}, "best_of"),
        ({"echo": True}, "echo"),
        ({"logprobs": 21}, "logprobs"),
    ):
        body = {"model": TINY, "prompt": "hi", **extra}
        response = httpx.post(f"{tiny_server.url}/v1/completions", json=body)
        assert response.status_code == 400 and fragment in response.json()["error"]["message"]


def test_harmless_fields_are_accepted_and_change_nothing(tiny_server: EmbeddedServer) -> None:
    base = {"model": TINY, "messages": ASK, "max_tokens": 6, "temperature": 0}
    harmless = {"metadata": {"team": "a"}, "store": True, "user": "u1", "safety_identifier": "s",
                "service_tier": "auto", "prompt_cache_key": "k", "modalities": ["text"],
                "prediction": {"type": "content", "content": "Paris is"}, "parallel_tool_calls": False,
                "some_future_field": 1}  # fmt: skip
    plain = httpx.post(f"{tiny_server.url}/v1/chat/completions", json=base, timeout=120).json()
    extended = httpx.post(f"{tiny_server.url}/v1/chat/completions", json={**base, **harmless}, timeout=120)
    assert extended.status_code == 200
    assert extended.json()["choices"][0]["message"] == plain["choices"][0]["message"]
