"""Many sessions at once over HTTP, on a pool far smaller than their KV: no request fails for lack of KV,
every answer equals the session's solo answer; one request's failure, a client leaving, or the engine
thread dying each have the effect a user expects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from warmkv.cache.config import CacheConfig, LoadPolicy
from warmkv.cache.tiers.base import TierName
from warmkv.engine.config import EngineConfig
from warmkv.engine.llm_engine import LLMEngine
from warmkv.server.app import ServerSettings
from warmkv.server.embedded import EmbeddedServer, free_port, start_embedded_server

MODEL = "tiny"
POOL = 320
TURNS = 3
REPLY = 12


def start(
    model, pool: int = POOL, max_batch_tokens: int = 64, trace: Path | None = None, host_tokens: int = 4096,
    kv_dir: Path | None = None, decode_steps: int | None = None,
) -> EmbeddedServer:  # fmt: skip
    cache = CacheConfig(disk=kv_dir is not None, kv_dir=kv_dir, host_tokens=host_tokens,
                        load_policy=LoadPolicy.ALWAYS)  # fmt: skip
    config = EngineConfig(kv_pool_tokens=pool, max_batch_tokens=max_batch_tokens, cache=cache,
                          decode_steps=decode_steps)  # fmt: skip
    settings = ServerSettings(served_model_name=MODEL, trace=trace)
    return start_embedded_server(LLMEngine(model, config), settings)


def complete(url: str, prompt: list[int], max_tokens: int = REPLY) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=300)


def session(url: str, first: list[int]) -> list[str | int]:
    """Turns of one agent session: each prompt extends the last one with a new tool result. Returns each
    turn's reply text (an int: the HTTP status of a failed turn)."""
    prompt, replies = list(first), []
    for turn in range(TURNS):
        response = complete(url, prompt)
        if response.status_code != 200:
            return [*replies, response.status_code]
        replies.append(response.json()["choices"][0]["text"])
        prompt = prompt + [7000 + turn] * 5 + [first[0] + turn]
    return replies


def sessions_prompts() -> list[list[int]]:
    # six sessions of ~110 + 3 x 17 tokens: over 3 times the pool together, each one alone fits it
    return [list(range(1000 * i, 1000 * i + 110)) for i in range(1, 7)]


def solo_answers(model, prompts: list[list[int]]) -> list[list[str | int]]:
    """Each session's replies run alone on a pool that holds them all."""
    roomy = start(model, pool=8192, max_batch_tokens=512)
    try:
        return [session(roomy.url, p) for p in prompts]
    finally:
        roomy.stop()


def concurrent_answers(url: str, prompts: list[list[int]]) -> list[list[str | int]]:
    """Every session at once, a thread each."""
    results: list[list[str | int]] = [[] for _ in prompts]
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, session(url, prompts[i])))
               for i in range(len(prompts))]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    return results


def test_oversubscribed_sessions_complete_with_their_solo_answers(tiny_llama, tmp_path: Path) -> None:
    prompts = sessions_prompts()
    assert sum(len(p) + TURNS * (6 + REPLY) for p in prompts) >= 3 * POOL
    solo = solo_answers(tiny_llama, prompts)
    busy = start(tiny_llama, trace=tmp_path / "trace.jsonl")
    try:
        # no error status among them, and every reply as when run alone
        assert concurrent_answers(busy.url, prompts) == solo
        metrics = httpx.get(f"{busy.url}/metrics").text
        preemptions = next(
            line for line in metrics.splitlines() if line.startswith("warmkv_preemptions_total")
        )
        assert float(preemptions.split()[-1]) > 0
        assert "warmkv_swapped_out_bytes_total" in metrics and "warmkv_swapped_in_bytes_total" in metrics
    finally:
        busy.stop()
    records = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    preempted = [r for r in records if r["preemptions"]]  # the per-request record says who gave way
    assert preempted and all(r["status"] == 200 for r in records)
    assert any(r["swapped_bytes"] > 0 for r in preempted)


def test_sessions_overflowing_the_host_tier_into_the_disk_keep_their_solo_answers(
    tiny_llama, tmp_path: Path
) -> None:
    """The host tier holds a fraction of what the pool evicts: its evictions go to the disk's writer from
    their own slots while new blocks keep arriving, and every reply is still as when run alone."""
    prompts = sessions_prompts()
    solo = solo_answers(tiny_llama, prompts)
    busy = start(tiny_llama, host_tokens=160, kv_dir=tmp_path / "kv")  # 10 blocks of 16 tokens
    try:
        assert concurrent_answers(busy.url, prompts) == solo
        stats = busy.engine.engine.prefix_cache.stats()
        assert stats[TierName.HOST].evictions > 0 and stats[TierName.DISK].writes > 0
        assert stats[TierName.DISK].hits > 0  # turns came back from what the host tier lent to the disk
    finally:
        busy.stop()


@pytest.fixture(scope="module")
def small(tiny_llama) -> EmbeddedServer:
    running = start(tiny_llama)
    yield running
    running.stop()


def test_prompt_larger_than_the_pool_gets_400_naming_the_numbers(small: EmbeddedServer) -> None:
    response = complete(small.url, list(range(400)), max_tokens=4)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert (
        "the KV pool holds 320 tokens" in error["message"] and "the prompt has 400 tokens" in error["message"]
    )


def assert_only_the_cache_holds_blocks(server: EmbeddedServer) -> None:
    engine = server.engine.engine
    cache = engine.prefix_cache
    holders = Counter([*cache.index._blocks.values(), *cache.partials._entries.values()])
    assert {b: n for b, n in enumerate(engine.pool.ref_counts) if n} == dict(holders)


def test_client_that_hangs_up_frees_its_blocks(small: EmbeddedServer) -> None:
    body = {"model": MODEL, "prompt": list(range(3000, 3100)), "max_tokens": 200, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{small.url}/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if '"text"' in line and '"text": ""' not in line:
                break  # a token arrived; hang up
    deadline = time.monotonic() + 30
    while small.engine.num_pending or small.engine.engine.has_work:
        assert time.monotonic() < deadline, "the sequence kept its blocks after the client left"
        time.sleep(0.05)
    assert_only_the_cache_holds_blocks(small)


def test_client_hanging_up_while_a_run_is_queued_leaves_the_others_their_solo_answers(tiny_llama) -> None:
    """Runs of four decode steps chained, as on a GPU: one client of three hangs up mid-stream while the
    engine has the next run of all three queued; the other two stream their solo answers to the end and
    every block but the cache's comes back."""
    prompts = [list(range(1000 * i, 1000 * i + 40)) for i in (1, 2, 3)]
    solo = [complete_text(start(tiny_llama, pool=8192), p) for p in prompts]
    server = start(tiny_llama, pool=8192, max_batch_tokens=512, decode_steps=4)
    engine = server.engine.engine
    chained, launch_run, queued_at_abort, abort = [], engine._launch_run, [], engine.abort
    engine._launch_run = lambda seqs, steps, after=None: (
        chained.append(after is not None) or launch_run(seqs, steps, after)
    )
    engine.abort = lambda seq: queued_at_abort.append(engine._in_flight is not None) or abort(seq)
    texts: list[str] = ["", "", ""]

    def stream(i: int) -> None:
        body = {"model": MODEL, "prompt": prompts[i], "max_tokens": 60, "temperature": 0, "ignore_eos": True,
                "stream": True}  # fmt: skip
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    texts[i] += json.loads(line[6:])["choices"][0]["text"]
                if i == 0 and len(texts[0]) > 100:  # all three decoding by then
                    return  # hang up

    try:
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert texts[1:] == solo[1:] and solo[0].startswith(texts[0]) and len(texts[0]) < len(solo[0])
        assert any(chained) and queued_at_abort == [True]
        deadline = time.monotonic() + 30
        while server.engine.num_pending or engine.has_work:
            assert time.monotonic() < deadline, "a sequence kept its blocks after its client left"
            time.sleep(0.05)
        assert_only_the_cache_holds_blocks(server)
    finally:
        server.stop()


def complete_text(server: EmbeddedServer, prompt: list[int]) -> str:
    """The server's whole answer of 60 tokens; the server is stopped after."""
    try:
        return complete(server.url, prompt, max_tokens=60).json()["choices"][0]["text"]
    finally:
        server.stop()


def test_one_failing_request_fails_alone(small: EmbeddedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = small.engine.engine.runner
    forward = runner.forward
    poison = 4242

    def flaky(items):
        if any(poison in item.token_ids for item in items):
            raise RuntimeError("injected failure")
        return forward(items)

    prompts = [list(range(1000 * i, 1000 * i + 40)) for i in range(1, 4)]
    want = [complete(small.url, p).json()["choices"][0]["text"] for p in prompts]
    monkeypatch.setattr(runner, "forward", flaky)
    responses: dict[int, httpx.Response] = {}
    culprit = [1, 2, poison, 3]
    jobs = [*prompts, culprit]
    threads = [threading.Thread(target=lambda i=i: responses.__setitem__(i, complete(small.url, jobs[i])))
               for i in range(len(jobs))]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [responses[i].json()["choices"][0]["text"] for i in range(3)] == want
    failed = responses[3]
    assert failed.status_code == 500
    assert "injected failure" in failed.json()["error"]["message"]
    assert httpx.get(f"{small.url}/health").json()["status"] == "ok"


def test_engine_thread_death_fails_requests_and_health(tiny_llama, monkeypatch: pytest.MonkeyPatch) -> None:
    server = start(tiny_llama)
    try:
        engine = server.engine.engine

        def broken_scheduler(failed):
            raise AssertionError("scheduler invariant broken")

        monkeypatch.setattr(engine, "_schedule", broken_scheduler)
        response = complete(server.url, list(range(100, 140)))
        assert response.status_code == 503
        assert "scheduler invariant broken" in response.json()["error"]["message"]
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and "scheduler invariant broken" in health.json()["reason"]
        later = complete(server.url, list(range(100, 140)))  # refused at once, not left hanging
        assert later.status_code == 503 and later.json()["error"]["code"] == "engine_stopped"
    finally:
        server.stop()


@pytest.mark.slow
def test_serve_exits_non_zero_when_the_engine_thread_dies(tiny_llama_folder: Path, tmp_path: Path) -> None:
    port = free_port()
    script = (
        "import sys\n"
        "from warmkv.engine.llm_engine import LLMEngine\n"
        "def broken(self, failed): raise AssertionError('scheduler invariant broken')\n"
        "LLMEngine._schedule = broken\n"
        "from warmkv.cli import main\n"
        f"main(['serve', '--model', {str(tiny_llama_folder)!r}, '--port', '{port}',"
        f" '--kv-pool-tokens', '1024', '--kv-dir', {str(tmp_path / 'kv')!r},"
        " '--served-model-name', 'tiny'])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert complete(url, list(range(100, 140))).status_code == 503
        output, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 1, output
    assert "warmkv: error: the engine stopped: AssertionError: scheduler invariant broken" in output
