"""The client toolkit against a fake DeepSeek-style upstream: hit-rate lift of warm-ups, miss reasons, log."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI

from warmkv.cli import main
from warmkv.client import AsyncWarmClient, Prices, WarmClient

from .fake_deepseek import FakeDeepSeek

SYSTEM = "You are a coding agent. Follow the repository conventions and explain nothing. " * 20
TOOLS = [
    {"type": "function", "function": {"name": "write_file", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}},
]


def file_writer(words: int):
    """An agent that writes a file of `words` words every turn (large assistant messages)."""

    def reply(body: dict) -> dict:
        n = len(body["messages"])
        content = " ".join(f"line{n}_{k}" for k in range(words))
        arguments = json.dumps({"path": f"src/f{n}.py", "content": content})
        call = {"id": f"call_{n}", "type": "function",
                "function": {"name": "write_file", "arguments": arguments}}  # fmt: skip
        return {"role": "assistant", "content": None, "tool_calls": [call]}

    return reply


def openai_on(fake: FakeDeepSeek) -> OpenAI:
    http = httpx.Client(transport=httpx.MockTransport(fake.handle))
    return OpenAI(base_url="http://fake/v1", api_key="k", http_client=http, max_retries=0)


def run_agent(client: WarmClient, turns: int) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Write the module."}]
    for _ in range(turns):
        reply = client.chat.completions.create(model="deepseek-chat", messages=messages, tools=TOOLS)
        message = reply.choices[0].message
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls or []:
            messages.append({"role": "tool", "tool_call_id": call.id, "content": "written"})
    return messages


def request_hit_rate(client: WarmClient) -> float:
    requests = [r for r in client.records if r.kind == "request"][1:]  # later turns of the loop
    return sum(r.cached_tokens for r in requests) / sum(r.prompt_tokens for r in requests)


def test_warmup_after_tool_calls_lifts_the_hit_rate() -> None:
    rates = {}
    for mode in ("off", "auto"):
        fake = FakeDeepSeek(file_writer(words=150))
        client = WarmClient(openai_on(fake), warmup=mode, warmup_wait_s=10)
        run_agent(client, turns=6)
        client.close()
        rates[mode] = request_hit_rate(client)
        warmups = [b for b in fake.requests if b.get("max_tokens") == 1]
        assert len(warmups) == (0 if mode == "off" else 6)
        assert all(b["tool_choice"] == "none" and b["temperature"] == 0 for b in warmups)
    assert rates["off"] < 0.75, rates
    assert rates["auto"] > 0.9, rates


def test_no_warmup_for_a_one_shot_call() -> None:
    fake = FakeDeepSeek(lambda body: {"role": "assistant", "content": "Paris"})
    client = WarmClient(openai_on(fake), warmup="auto", warmup_wait_s=10)
    client.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "Capital?"}])
    client.close()
    assert len(fake.requests) == 1


def test_warmups_stop_when_they_add_nothing() -> None:
    fake = FakeDeepSeek(file_writer(words=1))  # replies far below one 64-token cache unit
    client = WarmClient(openai_on(fake), warmup="auto", warmup_wait_s=10)
    run_agent(client, turns=6)
    client.close()
    warmups = [r for r in client.records if r.kind == "warmup"]
    assert len(warmups) == 2  # patience: two fruitless warm-ups, then the conversation stops warming
    assert all(r.warmup_benefit_tokens == 0 for r in client.records if r.warmup_benefit_tokens is not None)


def test_a_failing_warmup_never_fails_the_request(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeDeepSeek(file_writer(words=100))
    fake.fail_warmups = True
    client = WarmClient(openai_on(fake), warmup="auto", warmup_wait_s=10)
    with caplog.at_level(logging.WARNING, logger="warmkv.client"):
        messages = run_agent(client, turns=3)
    client.close()
    assert len([m for m in messages if m["role"] == "assistant"]) == 3
    assert "warm-up for conversation conversation-1 failed" in caplog.text


def test_miss_reasons_name_what_changed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeDeepSeek(lambda body: {"role": "assistant", "content": "Done."})
    log = tmp_path / "cache.jsonl"
    client = WarmClient(openai_on(fake), warmup="off", log=log, prices=Prices(input=0.27, cached_input=0.07))
    history = [{"role": "user", "content": "Task one."}, {"role": "assistant", "content": "Done."}]

    def ask(system: str, tools: list[dict], messages: list[dict]) -> None:
        messages = [{"role": "system", "content": system}, *messages]
        client.create(model="deepseek-chat", conversation="s1", tools=tools, messages=messages)

    ask(SYSTEM, TOOLS, history[:1])
    ask(SYSTEM, TOOLS, [*history, {"role": "user", "content": "Task two."}])
    ask(SYSTEM.replace("explain nothing", "explain briefly", 1), TOOLS, history[:1])
    extra = {"type": "function", "function": {"name": "run_tests", "parameters": {"type": "object"}}}
    ask(SYSTEM, [*TOOLS, extra], history[:1])
    ask(SYSTEM, [*TOOLS, extra], [{"role": "user", "content": "Task one, rephrased."}])
    fake.evict_all()
    ask(SYSTEM, [*TOOLS, extra], [{"role": "user", "content": "Task one, rephrased."}, *history[1:]])
    reasons = [r.reason for r in client.records]
    assert reasons[0] == "first request"
    assert reasons[1] == "only new tail"
    assert reasons[2] == ("system prompt changed: at char 70: 'd explain nothing. You are a coding agent. "
                          "Follow ' vs 'd explain briefly. You are a coding agent. Follow '")
    assert reasons[3] == "tools changed: added run_tests"
    assert reasons[4] == "history rewritten: message 1 (user) differs"
    assert reasons[5].startswith("upstream eviction: ")

    main(["report", str(log)])
    table = capsys.readouterr().out
    second = client.records[1]
    assert f"{second.prompt_tokens:>7} {second.cached_tokens:>7}" in table
    assert f"${second.cached_tokens * 0.20 / 1e6:.4f}" in table
    assert "tools changed: added run_tests" in table
    total_prompt = sum(r.prompt_tokens for r in client.records)
    assert f"of {total_prompt} prompt tokens cached" in table


def test_tools_are_sent_in_canonical_order_and_volatile_system_text_is_flagged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeDeepSeek(lambda body: {"role": "assistant", "content": "ok"})
    client = WarmClient(openai_on(fake), warmup="off")
    system = "Current time: 2026-11-22 21:57:20. " + SYSTEM
    with caplog.at_level(logging.WARNING, logger="warmkv.client"):
        client.chat.completions.create(model="deepseek-chat", tools=TOOLS,
                                       messages=[{"role": "system", "content": system}])  # fmt: skip
    names = [t["function"]["name"] for t in fake.requests[0]["tools"]]
    assert names == ["read_file", "write_file"]
    assert "system prompt has a date/time at char 14 ('2026-11-22 21:57:20')" in caplog.text
    assert "canonical" not in caplog.text  # sorted on the way out, nothing to warn about

    unsorted = WarmClient(openai_on(fake), warmup="off", sort_tools=False)
    with caplog.at_level(logging.WARNING, logger="warmkv.client"):
        unsorted.chat.completions.create(model="deepseek-chat", tools=TOOLS, messages=[{"role": "user",
                                         "content": "hi"}])  # fmt: skip
    assert [t["function"]["name"] for t in fake.requests[1]["tools"]] == ["write_file", "read_file"]
    assert "tools are not in canonical (name) order: ['write_file', 'read_file']" in caplog.text


def test_streamed_tool_call_is_recorded_and_warmed() -> None:
    fake = FakeDeepSeek(file_writer(words=150))
    client = WarmClient(openai_on(fake), warmup="auto", warmup_wait_s=10)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Write it."}]
    chunks = list(client.chat.completions.create(model="deepseek-chat", messages=messages, tools=TOOLS,
                                                 stream=True))  # fmt: skip
    client.close()
    assert chunks[-1].usage is not None and fake.requests[0]["stream_options"] == {"include_usage": True}
    warmup = fake.requests[1]
    assert warmup["max_tokens"] == 1
    expected = {k: v for k, v in fake.reply(fake.requests[0]).items() if v is not None}
    assert warmup["messages"][-1] == expected  # the reply, rebuilt from the streamed deltas
    assert [r.kind for r in client.records] == ["request", "warmup"]
    assert client.records[0].prompt_tokens == chunks[-1].usage.prompt_tokens


def test_async_client_warms_too() -> None:
    fake = FakeDeepSeek(file_writer(words=150))

    async def agent() -> AsyncWarmClient:
        http = httpx.AsyncClient(transport=httpx.MockTransport(fake.handle))
        upstream = AsyncOpenAI(base_url="http://fake/v1", api_key="k", http_client=http, max_retries=0)
        client = AsyncWarmClient(upstream, warmup="auto", warmup_wait_s=10)
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Go."}]
        for _ in range(4):
            reply = await client.create(model="deepseek-chat", messages=messages, tools=TOOLS)
            call = reply.choices[0].message.tool_calls[0]
            messages += [reply.choices[0].message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": "written"}]  # fmt: skip
        await client.close()
        return client

    client = asyncio.run(agent())
    assert len([r for r in client.records if r.kind == "warmup"]) == 4
    assert request_hit_rate(client) > 0.9
