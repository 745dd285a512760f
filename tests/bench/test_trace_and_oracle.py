"""Trace formats, the synthetic shapes and the oracle, without a server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from warmkv.bench.oracle import oracle_hits
from warmkv.bench.synthetic import synthetic_trace
from warmkv.bench.trace import load_trace, save_trace
from warmkv.errors import WarmkvError


def test_oracle_is_the_longest_prefix_shared_with_any_earlier_prompt() -> None:
    prompts = [[1, 2, 3, 4], [1, 2, 9], [5, 6], [1, 2, 3, 4, 7], [1, 2, 3, 4]]
    assert oracle_hits(prompts) == [0, 2, 0, 4, 3]  # the last token is always computed


def test_openai_conversation_becomes_one_request_per_assistant_message(tmp_path: Path) -> None:
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
                {"role": "assistant", "content": "a2"}]  # fmt: skip
    path = tmp_path / "conversation.json"
    path.write_text(json.dumps({"messages": messages, "tools": [{"type": "function"}]}))
    requests = load_trace(path)
    assert [len(r.messages) for r in requests] == [2, 4]
    assert {r.session for r in requests} == {"conversation-0"}
    assert requests[1].tools == [{"type": "function"}]


def test_request_log_lines_are_grouped_into_sessions_by_extension(tmp_path: Path) -> None:
    first = [{"role": "user", "content": "a"}]
    other = [{"role": "user", "content": "b"}]
    later = [*first, {"role": "assistant", "content": "x"}, {"role": "user", "content": "c"}]
    lines = [{"messages": first}, {"messages": other}, {"messages": later}]
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    sessions = [r.session for r in load_trace(path)]
    assert sessions[0] == sessions[2] != sessions[1]


def test_warmkv_trace_round_trips_with_restarts(tmp_path: Path) -> None:
    requests = synthetic_trace(["restart"], context=400)
    save_trace(requests, tmp_path / "t.jsonl")
    loaded = load_trace(tmp_path / "t.jsonl")
    assert [(r.session, r.restart, r.gap_s, len(r.messages)) for r in loaded] == [
        (r.session, r.restart, r.gap_s, len(r.messages)) for r in requests
    ]
    assert sum(r.restart for r in loaded) == 1


def test_rewrite_shape_changes_an_early_block_between_sessions() -> None:
    requests = synthetic_trace(["rewrite"], context=400)
    systems = {r.session: r.messages[0]["content"] for r in requests}
    first, second, third = systems.values()
    assert first != second == third
    assert first.index("Repository status") < 40 and first[:40] == second[:40]


def test_unreadable_trace_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [}\n')
    with pytest.raises(WarmkvError, match="not a warmkv trace or OpenAI-format log"):
        load_trace(path)
