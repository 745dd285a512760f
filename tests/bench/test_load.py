"""`warmkv bench load` end to end on the tiny model: sessions at once, 4x oversubscribed, no errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from warmkv.bench.load import multiply_sessions
from warmkv.bench.trace import TraceRequest, save_trace
from warmkv.cli import main

SYSTEM = {"role": "system", "content": "You are a helpful agent. " * 8}


def small_trace(path: Path) -> Path:
    """Four sessions of three turns; each turn adds a tool round to the conversation."""
    requests = []
    for s in range(4):
        messages = [SYSTEM, {"role": "user", "content": f"Task {s}: look up booking {s}{s}{s}."}]
        for turn in range(3):
            requests.append(TraceRequest(f"s{s}", list(messages), gap_s=1.0))
            messages += [{"role": "assistant", "content": f"Checking step {turn} of task {s}."},
                         {"role": "user", "content": f"Result {turn}: seat {turn}{s}A is free."}]  # fmt: skip
    save_trace(requests, path)
    return path


def test_copies_are_distinct_conversations_sharing_the_system_prompt() -> None:
    first = TraceRequest("a", [SYSTEM, {"role": "user", "content": "hi"}])
    copies = multiply_sessions([first], 3)
    assert [r.session for r in copies] == ["a", "a~1", "a~2"]
    assert all(r.messages[0] == SYSTEM for r in copies)
    assert len({r.messages[1]["content"] for r in copies}) == 3
    assert first.messages[1]["content"] == "hi"  # the original is left alone


@pytest.mark.slow
def test_load_runs_sessions_concurrently_without_errors(
    tiny_llama_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = small_trace(tmp_path / "trace.jsonl")
    out = tmp_path / "results"
    main(["bench", "load", str(trace), "--model", str(tiny_llama_folder), "--copies", "3",
          "--tool-time", "0.02", "--reply-tokens", "6", "--max-batch-tokens", "64",
          "--out", str(out), "--name", "load"])  # fmt: skip
    printed = capsys.readouterr().out
    result = json.loads((out / "load.json").read_text())
    assert result["workload"]["sessions"] == 12 and result["workload"]["requests"] == 36
    assert result["oversubscription"] >= 3.0
    assert list(result["rows"]) == ["warmkv", "warmkv_gpu_only"]
    for name, row in result["rows"].items():
        assert row["errors"] == 0, row["errors_by_status"]
        assert row["requests"] == 36 and row["completion_tokens"] == 36 * 6
        assert 0 < row["ttft_p50_s"] <= row["ttft_p90_s"] <= row["ttft_p99_s"]
        assert 0 < row["cached_tokens"] <= row["oracle_tokens"] <= row["prompt_tokens"]
        assert row["requests_per_s"] > 0 and row["generated_tokens_per_s"] > 0
        assert name in printed
    assert result["rows"]["warmkv_gpu_only"]["swapped_out_bytes"] == 0
    assert (out / "load-ttft.png").stat().st_size > 10_000
