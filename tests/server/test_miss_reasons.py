"""Miss reasons in the request trace and `warmkv cache explain`, through the real server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from warmkv.cli import main
from warmkv.engine.config import EngineConfig

from .conftest import start_server

MODEL = "SmolLM2-135M-Instruct"
SYSTEM = "You are a coding agent. Repository status:\n M src/a.py\n M src/b.py\nFollow the rules. " * 3


def test_trace_names_the_message_that_changed_and_explain_reports_it(
    default_model, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    trace = tmp_path / "trace.jsonl"
    server = start_server(default_model, EngineConfig(kv_pool_tokens=4096), trace=trace)

    def ask(system: str, user: str, stream: bool = False, max_tokens: int = 2) -> None:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        reply = server.client().chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=max_tokens, stream=stream
        )
        if stream:  # the miss is explained after the first token is out: streams must carry it too
            list(reply)

    try:
        ask(SYSTEM, "Fix the bug.")
        ask(SYSTEM.replace("src/b.py", "src/c.py"), "Fix the bug.", stream=True, max_tokens=1)  # early block
        ask(SYSTEM, "Fix the bug, then add tests.", stream=True)  # same system prompt, another question
        ask(SYSTEM, "Fix the bug, then add tests.")  # the same request again
    finally:
        server.stop()
    first, rewritten, other_question, repeat = (
        json.loads(line)["cache"]["miss"] for line in trace.read_text().splitlines()
    )
    assert first["kind"] == "new tokens"
    assert (rewritten["kind"], rewritten["message_index"], rewritten["role"]) == ("changed", 0, "system")
    assert "src/c.py" in rewritten["request_excerpt"] and "src/b.py" in rewritten["cached_excerpt"]
    assert "system message #0 changed at token 24" in rewritten["text"]
    assert (other_question["kind"], other_question["role"]) == ("changed", "user")
    assert repeat["kind"] == "below minimum"

    main(["cache", "explain", str(trace)])
    report = capsys.readouterr().out
    assert "system message #0 changed at token 24" in report
    assert report.strip().splitlines()[-1].startswith("total: ")


def test_eviction_is_named(default_model, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    # a pool this small, and no host or disk tier, cannot keep the first prompt through the second
    config = EngineConfig(kv_pool_tokens=160)
    config.cache.host_gib, config.cache.disk = 0, False
    server = start_server(default_model, config, trace=trace)
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Fix the bug."}]
    other = [{"role": "system", "content": "Unrelated. " * 40}, {"role": "user", "content": "Hi."}]
    try:
        for messages in (first, other, first):
            server.client().chat.completions.create(
                model=MODEL, messages=messages, temperature=0, max_tokens=2
            )
    finally:
        server.stop()
    last = json.loads(trace.read_text().splitlines()[-1])
    assert last["cache"]["miss"]["kind"] == "evicted" and last["cached_tokens"] < 96
