"""`warmkv bench load` end to end on the tiny model: sessions at once, 4x oversubscribed, no errors; real
peer processes beside warmkv (fake ones speaking llama-server's and vLLM's dialects, started as they are)."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.bench import fake_peer
from warmkv.bench import run_load
from warmkv.bench.load import Endpoint, LoadShape, multiply_sessions, warm_up_turns
from warmkv.bench.load import run_load as run_sessions
from warmkv.bench.oracle import oracle_hits
from warmkv.bench.peer_tokens import Dialect
from warmkv.bench.peers import llama_server_binary, vllm_python
from warmkv.bench.redis_process import RedisProcess
from warmkv.bench.replicas import ModelSpec, ReplicaProcess
from warmkv.bench.trace import TraceRequest, load_trace, save_trace
from warmkv.cli import main
from warmkv.errors import WarmkvError

from ..conftest import smollm2_tokenizer

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


def test_warm_up_runs_every_session_on_text_the_measured_runs_never_share(tmp_path: Path) -> None:
    requests = load_trace(small_trace(tmp_path / "trace.jsonl"))
    ran = warm_up_turns(requests)
    assert len(ran) == len(requests) and len({r.session for r in ran}) == 4
    measured = {r.messages[0]["content"] for r in requests}
    assert all(r.messages[0]["content"].startswith("[warm-up] ") for r in ran)
    assert not measured & {r.messages[0]["content"] for r in ran}
    assert requests[0].messages[0]["content"] == SYSTEM["content"]  # the measured requests are untouched


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
    tiers, gpu_only = result["rows"]["warmkv"]["tiers"], result["rows"]["warmkv_gpu_only"]["tiers"]
    assert tiers["live"]["evictions"] > 0 and tiers["host"]["writes"] > 0  # oversubscribed: demoted
    assert list(gpu_only) == ["live"] and gpu_only["live"]["evictions"] > 0
    assert (out / "load-ttft.png").stat().st_size > 10_000


@pytest.mark.slow
def test_load_on_replicas_each_in_its_own_process_routed_and_sharing_a_tier(
    tmp_path: Path, redis_server: RedisProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two replica processes, each making the random model itself (seeded: the same weights, so the same
    cache fingerprint), against one replica holding both replicas' memory. One session at a time, so that
    round-robin deals a session's turns to the replicas alternately whatever the timing (with sessions at
    once, a turn's replica depends on how many other turns came in between: a CI run found round-robin
    as sticky as the router by luck): only the shared tier brings the other replica's KV; the router keeps
    a session where its KV is. The router's spreading of concurrent load: tests/server/test_router.py."""
    trace = small_trace(tmp_path / "trace.jsonl")
    out = tmp_path / "results"
    main(["bench", "load", str(trace), "--shape", "llama-tiny-64k", "--tokenizer", str(smollm2_tokenizer()),
          "--device", "cpu", "--replicas", "2", "--redis-url", redis_server.url, "--copies", "2",
          "--concurrency", "1", "--tool-time", "0.05", "--reply-tokens", "4", "--max-batch-tokens", "64",
          "--out", str(out), "--name", "replicas"])  # fmt: skip
    printed = capsys.readouterr().out
    result = json.loads((out / "replicas.json").read_text())
    rows = result["rows"]
    assert list(rows) == ["1x_all_memory", "2x_round_robin", "2x_round_robin_shared", "2x_router",
                          "2x_router_shared"]  # fmt: skip
    assert result["replicas"]["count"] == 2 and result["replicas"]["devices"] == ["cpu: cpu", "cpu: cpu"]
    pool = {name: int(row["flags"][row["flags"].index("--kv-pool-tokens") + 1]) for name, row in rows.items()}
    each = result["replicas"]["per_replica_capacities"]["pool_tokens"]
    assert pool["1x_all_memory"] == 2 * each == result["capacities"]["pool_tokens"]
    assert {pool[name] for name in rows if name != "1x_all_memory"} == {each}
    for name, row in rows.items():
        assert row["errors"] == 0, (name, row["errors_by_status"])
        assert row["requests"] == 24 and row["completion_tokens"] == 24 * 4
        assert 0 < row["cached_tokens"] <= row["oracle_tokens"]
        assert len(row["per_replica"]) == (1 if name == "1x_all_memory" else 2)
        assert ("--redis-url" in row["flags"]) == name.endswith("_shared")
        assert name in printed
    for name in ("2x_router", "2x_router_shared"):  # every request once; with neither replica busier,
        assert sorted(rows[name]["served_per_replica"]) == [0, 24]  # sessions sharing a system prompt meet
    cached = {name: row["cached_tokens"] for name, row in rows.items()}
    assert cached["2x_round_robin_shared"] > cached["2x_round_robin"]  # the other replica's KV, from Redis
    assert cached["2x_router"] > cached["2x_round_robin"]
    assert cached["2x_router"] > cached["2x_round_robin_shared"]  # the history never has to move
    assert rows["2x_round_robin_shared"]["tiers"]["remote"]["writes"] > 0
    assert "remote" not in rows["2x_round_robin"]["tiers"]
    scaling = result["scaling"]
    assert (
        scaling["cached_of_oracle_2x_router_shared"]
        == cached["2x_router_shared"] / (rows["2x_router_shared"]["oracle_tokens"])
    )
    assert scaling["throughput_2x_router_shared_over_1x"] > 0


class TimedServer(httpx.BaseTransport):
    """A stand-in server behind the client's transport: each streamed request takes 50 ms and answers in
    server-sent events; it notes how many sessions were inside a request at any one time."""

    def __init__(self) -> None:
        self.inside: set[str] = set()
        self.most = 0
        self.lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        session = json.loads(request.content)["messages"][1]["content"]
        with self.lock:
            self.inside.add(session)
            self.most = max(self.most, len(self.inside))
        time.sleep(0.05)  # long enough for every session let in to be inside at once
        with self.lock:
            self.inside.discard(session)
        events = [{"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "length"}]},
                  {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11,
                                            "prompt_tokens_details": {"cached_tokens": 4}}}]  # fmt: skip
        body = "".join(f"data: {json.dumps(event)}\n\n" for event in events) + "data: [DONE]\n\n"
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body.encode())


@pytest.mark.parametrize("concurrency", [1, 3, 0])
def test_load_runs_at_most_concurrency_sessions_at_once_each_end_starting_the_next(
    tmp_path: Path, concurrency: int
) -> None:
    """As users working through more conversations than there are users: a session's end frees its place
    for the next, and every request still runs once, in its session's order."""
    requests = multiply_sessions(load_trace(small_trace(tmp_path / "trace.jsonl")), 3)  # 12 sessions
    server = TimedServer()
    shape = LoadShape(tool_time_s=0, concurrency=concurrency)
    run = run_sessions([Endpoint("http://server/v1")], "m", requests, shape, transport=server)
    assert server.most == (concurrency or 12)
    assert [(r.session, r.turn) for r in run.results] == [
        (request.session, turn) for request, turn in zip(requests, [0, 1, 2] * 12, strict=True)
    ]
    assert all(r.status == "200" and (r.cached_tokens, r.completion_tokens) == (4, 1) for r in run.results)
    assert all(r.ttft_s is not None for r in run.results)
    assert run.wall_s >= 36 * 0.05 / (concurrency or 12) and run.process_cpu_s > 0


def test_a_failed_request_is_its_rows_error_with_the_servers_message(tmp_path: Path) -> None:
    requests = load_trace(small_trace(tmp_path / "trace.jsonl"))[:2]
    refusing = httpx.MockTransport(
        lambda request: httpx.Response(400, json={"error": {"message": "prompt too long", "type": "x"}})
    )
    run = run_sessions(
        [Endpoint("http://server/v1")], "m", requests, LoadShape(tool_time_s=0), transport=refusing
    )
    assert [(r.status, r.error) for r in run.results] == [("400", "prompt too long")] * 2
    stream_error = httpx.MockTransport(lambda request: httpx.Response(
        200, content=b'data: {"error": {"message": "engine stopped"}}\n\n'))  # fmt: skip
    run = run_sessions(
        [Endpoint("http://server/v1")], "m", requests, LoadShape(tool_time_s=0), transport=stream_error
    )
    assert [(r.status, r.error) for r in run.results] == [("stream_error", "engine stopped")] * 2


def _answering(body: bytes) -> httpx.MockTransport:
    return httpx.MockTransport(lambda request: httpx.Response(200, content=body))


def test_a_stream_that_is_not_a_chat_completions_is_its_rows_error(tmp_path: Path) -> None:
    requests = load_trace(small_trace(tmp_path / "trace.jsonl"))[:2]
    endpoints, shape = [Endpoint("http://server/v1")], LoadShape(tool_time_s=0)
    for garbled in (b'data: {"choices": [\n\n', b"data: 1\n\n", b'data: {"usage": {"total_tokens": 1}}\n\n'):
        run = run_sessions(endpoints, "m", requests, shape, transport=_answering(garbled))
        assert [r.status for r in run.results] == ["bad_stream"] * 2, garbled
    # a peer that reports no completion tokens is not an error: it counts none
    run = run_sessions(endpoints, "m", requests, shape, transport=_answering(
        b'data: {"choices": [{"delta": {"content": "a"}}], "usage": {"prompt_tokens": 5}}\n\n'))  # fmt: skip
    assert [(r.status, r.prompt_tokens, r.completion_tokens) for r in run.results] == [("200", 5, 0)] * 2


def test_load_refuses_replicas_it_cannot_place_or_measure(tmp_path: Path) -> None:
    trace = small_trace(tmp_path / "trace.jsonl")
    with pytest.raises(SystemExit, match="--replicas"):
        main(["bench", "load", str(trace), "--replicas", "2", "--url", "http://127.0.0.1:9/v1"])
    with pytest.raises(SystemExit, match="--policies with --replicas names rows: unknown warmkv"):
        main(["bench", "load", str(trace), "--replicas", "2", "--policies", "2x_router,warmkv"])
    with pytest.raises(SystemExit, match="--concurrency must not be negative"):
        main(["bench", "load", str(trace), "--concurrency", "-1"])
    with pytest.raises(SystemExit, match="--redis-url"):
        main(["bench", "load", str(trace), "--redis-url", "redis://127.0.0.1:9/0"])
    with pytest.raises(SystemExit, match="--replicas must be at least 1"):
        main(["bench", "load", str(trace), "--replicas", "0"])
    with pytest.raises(SystemExit, match=r"needs 2 GPUs|--device"):
        main(["bench", "load", str(trace), "--replicas", "2", "--device", "cuda:1"])


def fake_peer_binaries(home: Path) -> None:
    """Executables where `python -m bench.peers` puts llama-server and vLLM's python: the fake peer in each
    dialect, started by the real peer classes with their real command lines."""
    repo = Path(__file__).resolve().parents[2]
    for path, dialect in ((llama_server_binary(), Dialect.LLAMA_CPP), (vllm_python(), Dialect.VLLM)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"#!/bin/sh\nPYTHONPATH={repo} exec {sys.executable} -m tests.bench.fake_peer "
                        f"--dialect {dialect.value} \"$@\"\n")  # fmt: skip
        path.chmod(0o755)


@pytest.mark.slow
def test_load_runs_peers_beside_warmkv_on_the_same_sessions(
    tiny_llama_folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("WARMKV_PEERS_DIR", str(tmp_path / "peers"))
    fake_peer_binaries(tmp_path / "peers")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")  # llama-server's weights: the fake never reads them
    monkeypatch.setattr(run_load, "gguf_of", lambda spec: tmp_path / "model.gguf")
    trace = small_trace(tmp_path / "trace.jsonl")
    failing = TraceRequest("bad", [{"role": "user", "content": "please FAIL"}], gap_s=1.0)
    save_trace([*load_trace(trace), failing], trace)
    out = tmp_path / "results"
    main(["bench", "load", str(trace), "--model", str(tiny_llama_folder), "--copies", "2",
          "--tool-time", "0.02", "--reply-tokens", "5", "--max-batch-tokens", "64", "--policies", "warmkv",
          "--peer", "llama.cpp,vllm", "--out", str(out), "--name", "load"])  # fmt: skip

    result = json.loads((out / "load.json").read_text())
    rows = result["rows"]
    assert list(rows) == ["warmkv", "llama.cpp", "vllm"]
    requests = multiply_sessions(load_trace(trace), 2)
    assert result["workload"]["sessions"] == 10 and len(requests) == 26
    peer_prompts = [fake_peer.prompt_ids(r.messages, r.tools) for r in requests]
    served = [i for i, r in enumerate(requests) if "FAIL" not in str(r.messages)]
    peer_oracle = sum(oracle_hits(peer_prompts)[i] for i in served)
    assert rows["warmkv"]["errors"] == 0  # warmkv answers the request the fake peers refuse
    assert rows["warmkv"]["oracle_tokens"] != peer_oracle  # each row is judged on its own server's tokens
    for name in ("llama.cpp", "vllm"):
        row = rows[name]
        assert row["requests"] == 26
        assert row["errors"] == 2 and row["errors_by_status"] == {"500": 2}  # "bad" and its copy, alone
        assert row["completion_tokens"] == 24 * 5
        assert row["prompt_tokens"] == sum(len(peer_prompts[i]) for i in served)
        assert row["oracle_tokens"] == peer_oracle
        assert row["prompt_length_mismatches"] == 0
        assert 0.5 * peer_oracle < row["cached_tokens"] <= row["prompt_tokens"]  # cache_n or usage, read
        assert 0 < row["ttft_p50_s"] <= row["ttft_p90_s"]
        assert row["requests_per_s"] > 0 and row["generated_tokens_per_s"] > 0
        assert "own prompt tokens" in row["oracle_source"]
    llama_flags = rows["llama.cpp"]["flags"]
    assert llama_flags[llama_flags.index("--parallel") + 1] == "10"  # a slot per concurrent session
    assert int(llama_flags[llama_flags.index("--ctx-size") + 1]) >= result["working_set_tokens"]
    printed = capsys.readouterr().out
    assert "llama.cpp" in printed and "vllm" in printed


def test_load_refuses_peer_with_url(tmp_path: Path) -> None:
    trace = small_trace(tmp_path / "trace.jsonl")
    with pytest.raises(SystemExit, match="cannot be combined with --url"):
        main(["bench", "load", str(trace), "--url", "http://127.0.0.1:9/v1", "--peer", "llama.cpp"])
    with pytest.raises(SystemExit, match="unknown sglang"):
        main(["bench", "load", str(trace), "--peer", "sglang"])


@pytest.mark.slow
def test_a_replica_that_fails_or_dies_is_an_error_naming_it(tmp_path: Path) -> None:
    broken = ReplicaProcess(ModelSpec(None, "no-such-shape", str(smollm2_tokenizer()), "auto"), None)
    try:
        with pytest.raises(WarmkvError, match="the replica on cpu: WarmkvError: --shape no-such-shape"):
            broken.wait_loaded()
    finally:
        broken.close()
    replica = ReplicaProcess(ModelSpec(None, "llama-tiny-64k", str(smollm2_tokenizer()), "auto"), None)
    try:
        assert replica.wait_loaded().gpu_name == "cpu"
        replica.stop()  # no server is running: refused, and the replica goes on
        with pytest.raises(WarmkvError, match="stop with no server running"):
            replica.answer()
        replica._process.kill()
        replica.start([], tmp_path / "kv")
        with pytest.raises(WarmkvError, match=r"the replica on cpu exited \(code -9\)"):
            replica.answer()
    finally:
        replica.close()
