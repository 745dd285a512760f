"""Peers in the replay benchmark: the oracle from the peer's own tokens, its cached-token readers, restarts,
failures, and the peer process's life; against a fake OpenAI-compatible peer (no build needed). The last
test drives a real llama-server and skips when `python -m bench.peers llama.cpp` has not built one."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.bench import fake_peer
from warmkv.bench.client_process import ClientProcess
from warmkv.bench.load import Endpoint, send_chat
from warmkv.bench.oracle import PeerOracle, oracle_hits, peer_oracle
from warmkv.bench.peer_tokens import Dialect, PeerError, ServerTokenizer, cached_tokens
from warmkv.bench.peers import LlamaServer, Peer, UrlPeer, llama_server_binary, make_peer
from warmkv.bench.replay import Restart, TurnResult, replay_on_peer
from warmkv.bench.results import summarize
from warmkv.bench.synthetic import synthetic_trace
from warmkv.bench.trace import TraceRequest
from warmkv.cli import main
from warmkv.errors import WarmkvError
from warmkv.server.embedded import ThreadedServer, serve_in_thread

# read at import: the session fixtures then point warmkv's cache (and peers_home) at a temporary folder
BUILT_LLAMA_SERVER = llama_server_binary()


@pytest.fixture(params=[Dialect.LLAMA_CPP, Dialect.VLLM], ids=lambda d: d.value)
def fake(request: pytest.FixtureRequest) -> Iterator[ThreadedServer]:
    server = serve_in_thread(fake_peer.create_fake_peer(request.param))
    yield server
    server.stop()


def _trace() -> list[TraceRequest]:
    return synthetic_trace(["restart", "single_turns"], context=300)


def _expected_oracle(requests: list[TraceRequest]) -> list[int]:
    return oracle_hits([fake_peer.prompt_ids(r.messages, r.tools) for r in requests])


def test_cached_tokens_read_in_every_dialect() -> None:
    assert cached_tokens({"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": 7}}) == 7
    assert cached_tokens({"prompt_tokens": 9, "prompt_cache_hit_tokens": 5}) == 5  # DeepSeek
    llama_server_timings = {"timings": {"cache_n": 3, "prompt_n": 6}}
    assert cached_tokens({"prompt_tokens": 9}, llama_server_timings) == 3
    assert cached_tokens({"prompt_tokens": 9, "prompt_tokens_details": None}) == 0
    assert cached_tokens(None, {"timings": {"cache_n": "junk"}}) == 0


def test_tokenizer_reads_the_peers_own_prompt_ids(fake: ThreadedServer) -> None:
    requests = _trace()[:3]
    with httpx.Client(base_url=fake.url) as http:
        tokenizer = ServerTokenizer(http, fake_peer.MODEL)
        ids = [tokenizer.prompt_ids(r) for r in requests]
    assert ids == [fake_peer.prompt_ids(r.messages, r.tools) for r in requests]
    assert tokenizer.dialect in (Dialect.LLAMA_CPP, Dialect.VLLM)


def test_tokenizer_refuses_a_server_without_tokenize_endpoints() -> None:
    not_found = httpx.MockTransport(lambda request: httpx.Response(404, json={"detail": "Not Found"}))
    http = httpx.Client(transport=not_found, base_url="http://peer")
    with http, pytest.raises(PeerError, match="neither"):
        ServerTokenizer(http, "m").prompt_ids(_trace()[0])


def test_tokenizer_rejects_malformed_token_lists() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/apply-template":
            return httpx.Response(200, json={"prompt": "a b"})
        return httpx.Response(200, json={"tokens": ["a", "b"]})

    words = httpx.MockTransport(answer)
    http = httpx.Client(transport=words, base_url="http://peer")
    with http, pytest.raises(PeerError, match="integers"):
        ServerTokenizer(http, "m", Dialect.LLAMA_CPP).prompt_ids(_trace()[0])


def test_peer_row_is_judged_against_the_peers_own_tokens(fake: ThreadedServer) -> None:
    requests = _trace()
    peer = UrlPeer(name="fake", model=fake_peer.MODEL, base_url=f"{fake.url}/v1")
    with peer.http() as http:
        oracle = peer_oracle(peer.tokenizer(http), requests)
    turns = replay_on_peer(peer, requests, max_gap_s=0)
    row = summarize(turns, oracle.clipped(turns))

    expected = _expected_oracle(requests)
    assert oracle.hits == expected
    assert oracle.mismatches(turns) == 0
    assert [t.cached_tokens for t in turns] == [h // fake_peer.BLOCK * fake_peer.BLOCK for h in expected]
    assert row["oracle_tokens"] == sum(expected)
    assert row["efficiency"] == pytest.approx(sum(h // 4 * 4 for h in expected) / sum(expected))
    assert 0.8 < row["efficiency"] < 1.0  # the fake floors to blocks: less than the oracle, most of it
    restarted = [t for t in turns if t.restart is not Restart.NONE]
    assert [t.restart for t in restarted] == [Restart.SKIPPED]  # a --url server cannot be restarted
    assert row["restarts"] == {"done": 0, "skipped": 1}
    assert row["by_shape"]["single_turns"]["requests"] == 10
    assert row["requests_per_s"] > 0


def test_the_replays_client_runs_in_a_process_of_its_own_and_reads_what_send_chat_reads(
    fake: ThreadedServer,
) -> None:
    request, endpoint = _trace()[0], Endpoint(f"{fake.url}/v1")
    with ClientProcess() as client, httpx.Client() as http:
        assert client.pid != os.getpid()
        first = client.send(endpoint, fake_peer.MODEL, request, 0, 1, time.perf_counter())
        here = send_chat(http, endpoint, fake_peer.MODEL, request, 1, 1, time.perf_counter())
        there = client.send(endpoint, fake_peer.MODEL, request, 2, 1, time.perf_counter())
        assert (first.status, first.cached_tokens, first.completion_tokens) == ("200", 0, 1)
        assert here.cached_tokens > 0 and first.ttft_s is not None
        assert (there.status, there.prompt_tokens, there.cached_tokens, there.completion_tokens) == (
            here.status, here.prompt_tokens, here.cached_tokens, here.completion_tokens)  # fmt: skip
        client._child.kill()
        client._child.wait()  # gone before the next send writes: what it leaves unsent, closing drops
        with pytest.raises(WarmkvError, match="client process stopped"):
            client.send(endpoint, fake_peer.MODEL, request, 3, 1, time.perf_counter())


def test_one_failed_request_is_an_error_and_the_others_complete(fake: ThreadedServer) -> None:
    requests = _trace()[:4]
    failing = TraceRequest("bad", [{"role": "user", "content": "please FAIL"}], shape="bad")
    requests.insert(2, failing)
    peer = UrlPeer(name="fake", model=fake_peer.MODEL, base_url=f"{fake.url}/v1")
    turns = replay_on_peer(peer, requests, max_gap_s=0)
    assert [bool(t.error) for t in turns] == [False, False, True, False, False]
    assert "500" in turns[2].error
    row = summarize(turns, [0] * len(turns))
    assert row["errors"] == 1
    assert row["requests"] == 5
    assert row["prompt_tokens"] == sum(t.prompt_tokens for t in turns if not t.error)
    assert row["by_shape"]["bad"]["errors"] == 1
    assert row["by_shape"]["bad"]["ttft_p50_s"] is None


def test_oracle_is_clipped_to_the_prompt_the_peer_counted() -> None:
    turns = [TurnResult(0, "s", "x", 10, 0, 0.1), TurnResult(1, "s", "x", 5, 0, 0.1)]
    oracle = PeerOracle(lengths=[10, 12], hits=[0, 9], dialect="llama.cpp")
    assert oracle.clipped(turns) == [0, 4]  # the peer counted 5 tokens: at most 4 of them reusable
    assert oracle.mismatches(turns) == 1


def test_bench_replay_url_builds_the_oracle_from_the_servers_tokens(
    fake: ThreadedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["bench", "replay", "--url", f"{fake.url}/v1", "--synthetic", "restart,single_turns", "--context",
          "300", "--out", str(tmp_path), "--name", "url"])  # fmt: skip
    result = json.loads((tmp_path / "url.json").read_text())
    rows = result["rows"]
    assert list(rows) == ["url", "oracle_url"]
    expected = _expected_oracle(_trace())
    assert rows["oracle_url"]["cached_tokens"] == sum(expected)
    assert rows["url"]["oracle_tokens"] == sum(expected)
    assert rows["url"]["prompt_length_mismatches"] == 0
    assert rows["url"]["restarts"] == {"done": 0, "skipped": 1}
    assert "own prompt tokens" in rows["url"]["oracle_source"]
    out = capsys.readouterr().out
    assert "single_turns" in out and "oracle_url" in out


@dataclass
class FakePeerProcess(Peer):
    """The fake llama-server dialect in its own process: start, readiness, stop and restart for real."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "uvicorn", "tests.bench.fake_peer:llama_cpp_app", "--host",
                "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]  # fmt: skip


def test_peer_process_restarts_cold_and_stops() -> None:
    requests = _trace()[:6]  # the restart shape restarts before its fifth request
    with FakePeerProcess(name="fake", model=fake_peer.MODEL, ready_timeout_s=60) as peer:
        first = peer.process
        turns = replay_on_peer(peer, requests, max_gap_s=0)
        assert peer.process is not first and peer.process is not None  # a new process after the restart
        running = peer.process
    assert running.poll() is not None  # stopped on exit
    assert turns[4].restart is Restart.DONE
    assert turns[3].cached_tokens > 0 and turns[4].cached_tokens == 0  # the fake keeps nothing over a restart
    assert turns[5].cached_tokens > 0


def test_peer_that_exits_at_start_says_why() -> None:
    @dataclass
    class Broken(Peer):
        def command(self) -> list[str]:
            return [sys.executable, "-c", "import sys; print('no such model'); sys.exit(3)"]

    with pytest.raises(PeerError, match=r"exited with 3(.|\n)*no such model"):
        Broken(name="broken", model="m").start()


def test_unbuilt_peers_name_the_setup_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARMKV_PEERS_DIR", str(tmp_path))
    with pytest.raises(PeerError, match=r"python -m bench\.peers llama\.cpp"):
        make_peer("llama.cpp", "m", tmp_path / "x.gguf", tmp_path)
    with pytest.raises(PeerError, match=r"python -m bench\.peers vllm"):
        make_peer("vllm", "m", None, tmp_path)
    with pytest.raises(PeerError, match="unknown 'sglang'"):
        make_peer("sglang", "m", None, tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not BUILT_LLAMA_SERVER.is_file(),
                    reason="llama-server is not built: run `python -m bench.peers llama.cpp`")  # fmt: skip
def test_llama_server_reuses_prompts_and_keeps_them_over_a_restart() -> None:
    from warmkv.models.loader import default_gguf_path

    requests = synthetic_trace(["restart"], context=400)
    server = LlamaServer(name="llama.cpp", model="SmolLM2", gguf=default_gguf_path(),
                         binary=BUILT_LLAMA_SERVER, ready_timeout_s=120)  # fmt: skip
    with server as peer:
        with peer.http() as http:
            oracle = peer_oracle(peer.tokenizer(http), requests)
        turns = replay_on_peer(peer, requests, max_gap_s=0)
    assert not any(t.error for t in turns)
    assert oracle.mismatches(turns) == 0  # /apply-template + /tokenize give exactly the prompt it served
    assert turns[4].restart is Restart.DONE
    assert turns[4].cached_tokens > turns[3].prompt_tokens // 2  # the slot came back from its file
    assert sum(t.cached_tokens for t in turns) > 0.8 * sum(oracle.hits)
