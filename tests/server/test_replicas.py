"""Two replicas on loopback sharing a real redis-server, with and without the router in front."""

from __future__ import annotations

import pytest

from warmkv.bench.redis_process import RedisProcess
from warmkv.cache.config import CacheConfig, LoadPolicy
from warmkv.engine.config import EngineConfig
from warmkv.models.loader import LoadedModel
from warmkv.router.affinity import Router
from warmkv.router.app import create_router_app
from warmkv.server.embedded import EmbeddedServer, serve_in_thread

from .conftest import start_server

MODEL = "SmolLM2-135M-Instruct"
SYSTEM = {"role": "system", "content": "You are a build agent. Keep answers short and exact. " * 12}


def replica(model: LoadedModel, redis: RedisProcess) -> EmbeddedServer:
    # no disk tier of its own: a prefix it did not compute can only come from the shared tier
    cache = CacheConfig(disk=False, host_tokens=0, redis_url=redis.url, load_policy=LoadPolicy.ALWAYS)
    return start_server(model, EngineConfig(kv_pool_tokens=4096, cache=cache))


def flush(*replicas: EmbeddedServer) -> None:
    for r in replicas:  # write-through to the shared tier is asynchronous
        r.engine.engine.prefix_cache.flush()


def turn(messages: list[dict], n: int) -> list[dict]:
    return [*messages, {"role": "assistant", "content": f"Step {n} done."},
            {"role": "user", "content": f"Now do step {n + 1}."}]  # fmt: skip


def test_a_session_that_moves_replica_hits_the_shared_tier(
    default_model: LoadedModel, redis_server: RedisProcess
) -> None:
    a, b = replica(default_model, redis_server), replica(default_model, redis_server)
    try:
        messages = [SYSTEM, {"role": "user", "content": "Do step 1."}]
        first = a.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
        flush(a)
        second = b.client().chat.completions.create(model=MODEL, messages=turn(messages, 1), max_tokens=1)
        assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 16
        stats = b.engine.engine.prefix_cache.stats()
        assert (
            stats[next(t for t in stats if t.value == "remote")].hits >= first.usage.prompt_tokens // 16 - 1
        )
    finally:
        a.stop()
        b.stop()


def test_killing_redis_mid_run_loses_no_request(
    default_model: LoadedModel, redis_server: RedisProcess
) -> None:
    a, b = replica(default_model, redis_server), replica(default_model, redis_server)
    try:
        messages = [SYSTEM, {"role": "user", "content": "Do step 1."}]
        for n in range(6):
            if n == 2:
                redis_server.stop()
            server = (a, b)[n % 2]
            reply = server.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
            assert reply.choices[0].finish_reason in ("length", "stop")
            assert reply.usage.prompt_tokens > 0
            messages = turn(messages, n + 1)
    finally:
        a.stop()
        b.stop()


def test_router_keeps_a_session_on_its_replica_and_fails_over(
    default_model: LoadedModel, redis_server: RedisProcess
) -> None:
    a, b = replica(default_model, redis_server), replica(default_model, redis_server)
    router = serve_in_thread(create_router_app(Router([a.url, b.url])))
    client = router.client()
    try:
        messages = [SYSTEM, {"role": "user", "content": "Do step 1."}]
        homes, cached, prompts = [], [], []
        for n in range(3):
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=messages, max_tokens=1
            )
            usage = raw.parse().usage
            homes.append(raw.headers["x-warmkv-replica"])
            cached.append(usage.prompt_tokens_details.cached_tokens)
            prompts.append(usage.prompt_tokens)
            messages = turn(messages, n + 1)
        assert len(set(homes)) == 1  # the session stayed on its replica
        assert all(c >= p - 16 for c, p in zip(cached[1:], prompts, strict=False))

        streamed = list(
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, stream=True)
        )
        assert streamed[-1].choices[0].finish_reason in ("length", "stop")

        home = a if homes[0] == a.url else b
        flush(home)
        home.stop()  # the session's replica goes away: the router sends its next turn to the other one
        messages = turn(messages, 4)
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=1)
        assert raw.headers["x-warmkv-replica"] != homes[0]
        assert raw.parse().usage.prompt_tokens_details.cached_tokens >= prompts[-1] - 16  # shared tier
    finally:
        router.stop()
        a.stop()
        b.stop()


@pytest.mark.parametrize("body", ["{not json", "[]"])
def test_router_answers_bad_bodies_and_dead_replicas_clearly(body: str) -> None:
    import httpx

    router = serve_in_thread(create_router_app(Router(["http://127.0.0.1:9"], down_s=60)))
    try:
        answer = httpx.post(f"{router.url}/v1/chat/completions", content=body,
                            headers={"content-type": "application/json"})  # fmt: skip
        if body == "{not json":
            assert answer.status_code == 400 and "invalid JSON body" in answer.json()["error"]["message"]
        else:
            assert (
                answer.status_code == 503 and answer.json()["error"]["message"] == "no replica is reachable"
            )
    finally:
        router.stop()


def plain_replica(model: LoadedModel) -> EmbeddedServer:
    cache = CacheConfig(disk=False, host_tokens=0)
    return start_server(model, EngineConfig(kv_pool_tokens=4096, cache=cache))


def test_router_keeps_anthropic_and_responses_sessions_with_their_state(default_model: LoadedModel) -> None:
    import httpx

    a, b = plain_replica(default_model), plain_replica(default_model)
    router = serve_in_thread(create_router_app(Router([a.url, b.url])))
    try:
        # an Anthropic Messages session (Claude Code's API): its turns stay on one replica, cached
        headers = {"x-api-key": "unused", "anthropic-version": "2023-06-01"}
        messages = [{"role": "user", "content": "Do step 1."}]
        homes, cached = [], []
        for n in range(3):
            body = {"model": MODEL, "system": SYSTEM["content"], "messages": messages, "max_tokens": 2}
            answer = httpx.post(f"{router.url}/v1/messages", headers=headers, timeout=60, json=body)
            assert answer.status_code == 200, answer.text
            homes.append(answer.headers["x-warmkv-replica"])
            cached.append(answer.json()["usage"]["cache_read_input_tokens"])
            messages += [{"role": "assistant", "content": f"Step {n + 1} done."},
                         {"role": "user", "content": f"Now do step {n + 2}."}]  # fmt: skip
        assert len(set(homes)) == 1 and cached[1] > 100 and cached[2] > cached[1]
        # Responses conversations that send only their new input: each goes on where its stored response is
        for session in range(6):
            first = httpx.post(f"{router.url}/v1/responses", timeout=60, json={
                "model": MODEL, "instructions": f"Session {session}.", "input": "Start.",
                "max_output_tokens": 2,
            })  # fmt: skip
            assert first.status_code == 200, first.text
            follow = httpx.post(f"{router.url}/v1/responses", timeout=60, json={
                "model": MODEL, "previous_response_id": first.json()["id"], "input": "Go on.",
                "max_output_tokens": 2,
            })  # fmt: skip
            assert follow.status_code == 200, follow.text  # a stored response found: the same replica
            assert follow.headers["x-warmkv-replica"] == first.headers["x-warmkv-replica"]
        # the router's own errors in the style of the endpoint asked
        bad = httpx.post(f"{router.url}/v1/messages", content="{not json", headers=headers)
        assert bad.status_code == 400 and bad.json()["type"] == "error"
        assert bad.json()["error"]["type"] == "invalid_request_error"
    finally:
        router.stop()
        a.stop()
        b.stop()
