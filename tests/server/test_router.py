"""The router's placement without servers: which replica a request goes to, by its anchors and the load;
and its relay of an answer, against a stand-in replica."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from warmkv.router.affinity import Router, anchor_chain
from warmkv.router.app import create_router_app
from warmkv.server.embedded import serve_in_thread

SYSTEM = {"role": "system", "content": "You are a helpful agent."}


def chat(*users: str) -> list[str]:
    messages = [SYSTEM, *({"role": "user", "content": user} for user in users)]
    return anchor_chain({"model": "m", "messages": messages})


def test_idle_replicas_gather_sessions_sharing_a_system_prompt() -> None:
    router = Router(["http://a", "http://b", "http://c"])
    homes = {router.candidates(chat(f"task {n}"))[0][0].url for n in range(20)}
    assert len(homes) == 1  # the shared system prompt's KV is computed once


def test_new_sessions_go_to_the_least_loaded_replica() -> None:
    router = Router(["http://a", "http://b"])
    first, _ = router.candidates(chat("task 0"))
    first[0].in_flight += 1
    second, depth = router.candidates(chat("task 1"))
    assert second[0] is not first[0] and depth == 0


def test_a_session_stays_with_its_kv_until_its_replica_is_busier_than_the_slack() -> None:
    router = Router(["http://a", "http://b"], slack=2)
    history = chat("task 0", "step 1")
    home = router.candidates(history)[0][0]
    router.served(history, home)
    other = next(r for r in router.replicas if r is not home)
    grown = chat("task 0", "step 1", "step 2")
    home.in_flight = 2  # within the slack of the idle replica: still home, two anchors deep
    assert router.candidates(grown) == ([home, other], 3)
    home.in_flight = 3  # past it: the load goes elsewhere, and the history is not claimed
    assert router.candidates(grown) == ([other, home], 0)
    router.failed(other)  # a replica that is down is not tried while another is up
    assert router.candidates(grown)[0] == [home]


def dying_replica() -> FastAPI:
    """A replica that answers a stream's first event, then dies (its connection cut mid-answer)."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def dying() -> StreamingResponse:
        async def events() -> AsyncIterator[bytes]:
            yield b'data: {"choices": []}\n\n'
            await asyncio.sleep(0.2)
            raise RuntimeError("the replica's process died")

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def test_a_replica_dying_mid_answer_is_no_longer_counted_busy_and_rests() -> None:
    """The client's stream is cut (it must not take the part for a whole answer); the router stops
    counting the request in flight (it weighs every later placement) and rests the replica."""
    replica = serve_in_thread(dying_replica())
    router = Router([replica.url], down_s=60)
    front = serve_in_thread(create_router_app(router))
    try:
        body = {"model": "m", "messages": [SYSTEM], "stream": True}
        with pytest.raises(httpx.HTTPError), httpx.stream(
            "POST", f"{front.url}/v1/chat/completions", json=body, timeout=30
        ) as response:
            assert response.status_code == 200
            for _ in response.iter_lines():
                pass
        deadline = time.monotonic() + 10
        while router.replicas[0].in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        answer = httpx.get(f"{front.url}/health")
        (health,) = answer.json()["replicas"]
        assert health["in_flight"] == 0 and health["failures"] == 1 and not health["up"]
        assert answer.status_code == 503  # its only replica rests: nowhere to send a request
    finally:
        front.stop()
        replica.stop()


def slow_replica(seen: list[str]) -> FastAPI:
    """A replica whose non-streamed answer takes seconds, and which notices its client leaving."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def slow(request: Request) -> Response:
        for _ in range(200):
            if await request.is_disconnected():
                seen.append("client gone")
                return Response(status_code=499)
            await asyncio.sleep(0.05)
        seen.append("answered")
        return JSONResponse({"choices": []})

    return app


def test_a_client_leaving_a_non_streamed_request_cancels_it_on_the_replica() -> None:
    """The replica stops (its work is the GPU's time) and the router counts nothing in flight; it went on
    to the end, its answer thrown away."""
    seen: list[str] = []
    replica = serve_in_thread(slow_replica(seen))
    router = Router([replica.url])
    front = serve_in_thread(create_router_app(router))
    try:
        with pytest.raises(httpx.TimeoutException):
            body = {"model": "m", "messages": [SYSTEM]}
            httpx.post(f"{front.url}/v1/chat/completions", json=body, timeout=0.5)
        deadline = time.monotonic() + 8
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen == ["client gone"] and router.replicas[0].in_flight == 0
    finally:
        front.stop()
        replica.stop()
