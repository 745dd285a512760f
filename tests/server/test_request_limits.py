"""Size limits answer before any work is spent, and a huge request's rendering never stalls the others."""

from __future__ import annotations

import threading
import time

import httpx

from warmkv.engine.config import EngineConfig

from .conftest import start_server

MODEL = "SmolLM2-135M-Instruct"
HELLO = [{"role": "user", "content": "Say hello."}]


def test_bodies_past_the_limit_get_413_and_the_server_goes_on(default_model) -> None:
    limited = start_server(default_model, EngineConfig(kv_pool_tokens=2048), max_request_bytes=4000,
                           max_messages=8)  # fmt: skip
    try:
        url = f"{limited.url}/v1/chat/completions"
        big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]}
        refused = httpx.post(url, json=big)
        assert refused.status_code == 413
        error = refused.json()["error"]
        assert error["code"] == "request_too_large" and "4,000" in error["message"]
        # a chunked body declares no length: it is counted as it arrives
        chunks = (b'{"model": "x", "messages": [' + b" " * 1000 for _ in range(10))
        streamed = httpx.post(url, content=chunks, headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        many = {"model": MODEL, "messages": HELLO * 9, "max_tokens": 2}
        too_many = httpx.post(url, json=many)
        assert too_many.status_code == 400 and "--max-messages" in too_many.json()["error"]["message"]
        fine = httpx.post(url, json={"model": MODEL, "messages": HELLO * 8, "max_tokens": 2}, timeout=120)
        assert fine.status_code == 200
    finally:
        limited.stop()


def test_health_answers_while_a_huge_conversation_is_prepared(server) -> None:
    # 3,000 messages, 12 MB (within the default limits): rendering and tokenising take about two seconds on
    # this project's CPU (1,000 took 0.7 s, too short to show anything); the context is too small for it, so
    # it ends with a 400 once tokenised
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{i} " + "lorem ipsum " * 340}
                for i in range(3000)]  # fmt: skip
    outcome: dict[str, httpx.Response] = {}
    big = threading.Thread(target=lambda: outcome.update(big=httpx.post(
        f"{server.url}/v1/chat/completions", json={"model": MODEL, "messages": messages}, timeout=600
    )))  # fmt: skip
    big.start()
    time.sleep(0.5)  # the body is on its way
    answered_during = 0
    while big.is_alive():
        started = time.monotonic()
        health = httpx.get(f"{server.url}/health", timeout=2.0)  # a stalled loop would time this out
        assert health.status_code == 200 and time.monotonic() - started < 2.0
        answered_during += big.is_alive()
        time.sleep(0.1)
    big.join()
    answer = outcome["big"]
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "context_length_exceeded"
    assert answered_during >= 3, "the big request finished too soon to show anything"
