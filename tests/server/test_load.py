"""A bounded loopback load test: 16 concurrent greedy sessions of 5 turns each get exactly the replies they
get alone, with no error, and the server's memory does not grow with the traffic."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import httpx

from warmkv.cache.config import CacheConfig
from warmkv.engine.config import EngineConfig
from warmkv.models.loader import LoadedModel
from warmkv.server.embedded import EmbeddedServer

from .conftest import start_server

SERVED = "tiny"
SESSIONS, TURNS = 16, 5


def run_session(server: EmbeddedServer, session: int) -> list[str]:
    """One agent-like session: each turn re-sends the whole history plus a new user message."""
    messages = [{"role": "system", "content": f"You are assistant number {session}."}]
    replies = []
    with httpx.Client(base_url=server.url, timeout=300) as client:
        for turn in range(TURNS):
            messages.append({"role": "user", "content": f"Session {session}, step {turn}: go on."})
            body = {"model": SERVED, "messages": messages, "max_tokens": 8, "temperature": 0,
                    "ignore_eos": True, "cache_salt": f"session-{session}"}  # fmt: skip
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            reply = response.json()["choices"][0]["message"]["content"]
            replies.append(reply)
            messages.append({"role": "assistant", "content": reply})
    return replies


def concurrently(work: Callable[[int], list[str]], count: int) -> dict[int, list[str] | BaseException]:
    results: dict[int, list[str] | BaseException] = {}

    def one(session: int) -> None:
        try:
            results[session] = work(session)
        except BaseException as err:  # reported below, per session
            results[session] = err

    threads = [threading.Thread(target=one, args=(s,)) for s in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    return results


def rss_mib() -> float:
    """Resident memory of this process, which runs the server (Linux)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


def test_sixteen_concurrent_sessions_equal_their_solo_runs(tiny_llama: LoadedModel) -> None:
    # 16 sessions of up to ~250 tokens each: a working set about 4x this pool, so sequences wait, are
    # preempted and swapped to the host tier; none may fail and every output must equal its solo run
    config = EngineConfig(kv_pool_tokens=1024, max_model_len=512, cache=CacheConfig(disk=False))
    alone = EngineConfig(kv_pool_tokens=2048, max_model_len=512, prefix_cache=False)
    solo_server = start_server(tiny_llama, alone, served_model_name=SERVED)
    try:
        solo = {session: run_session(solo_server, session) for session in range(SESSIONS)}
    finally:
        solo_server.stop()
    loaded = start_server(tiny_llama, config, served_model_name=SERVED)
    try:
        concurrently(lambda s: run_session(loaded, s), 2)  # warm-up: first-use allocations are not growth
        before = rss_mib()
        rounds = [concurrently(lambda s: run_session(loaded, s), SESSIONS) for _ in range(2)]
        growth = rss_mib() - before
    finally:
        loaded.stop()
    for results in rounds:
        errors = {s: r for s, r in results.items() if isinstance(r, BaseException)}
        assert not errors, errors
        assert results == solo
    assert growth < 300, f"RSS grew by {growth:.0f} MiB over two rounds of {SESSIONS} sessions"
