"""The router's HTTP front: forwards OpenAI- and Anthropic-style requests (streamed or not) to the chosen
replica; errors of its own are in the style of the endpoint asked."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from warmkv.errors import anthropic_error_body, error_body
from warmkv.router.affinity import Replica, Router, anchor_chain, response_anchor
from warmkv.server.errors import ClientGone, until_disconnect

log = logging.getLogger("warmkv.router")
FORWARDED_HEADERS = ("authorization", "content-type", "openai-organization", "openai-project", "x-api-key",
                     "anthropic-version", "anthropic-beta")  # fmt: skip
# a Responses answer names its id near its start (the body, or the stream's response.created event)
RESPONSE_ID = re.compile(rb'"id"\s*:\s*"(resp_[0-9A-Za-z_-]+)"')
RESPONSE_ID_WINDOW = 8192  # bytes of the answer searched for it
# failures before any byte of the answer: the same request is safe to send to another replica
FAILOVER_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError)


def create_router_app(router: Router, timeout_s: float = 600.0) -> FastAPI:
    client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=2.0))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = FastAPI(title="warmkv router", lifespan=lifespan)

    async def forward(request: Request, path: str) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as err:
            return _error(path, 400, f"invalid JSON body: {err}", "invalid_request_error")
        chain = anchor_chain(body) if isinstance(body, dict) else []
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
        candidates, depth = router.candidates(chain)
        for replica in candidates:
            started = time.perf_counter()
            replica.in_flight += 1
            try:
                # a non-streamed answer's headers come with its end: a client that leaves meanwhile cancels
                # the request to the replica (its connection closed, its generation stops), as a replica
                # asked directly does
                upstream = await until_disconnect(request, client.send(
                    client.build_request("POST", f"{replica.url}{path}", content=raw, headers=headers),
                    stream=True,
                ))  # fmt: skip
            except ClientGone:
                replica.in_flight -= 1
                log.info("client disconnected before %s answered %s", replica.url, path)
                return Response(status_code=499)
            except FAILOVER_ERRORS as err:
                replica.in_flight -= 1
                router.failed(replica)
                log.warning("replica %s failed (%s): trying the next one", replica.url, err)
                continue
            if upstream.status_code in (502, 503):  # overloaded or shutting down: not an answer
                await upstream.aclose()
                replica.in_flight -= 1
                router.failed(replica)
                continue
            if upstream.status_code < 400:
                router.served(chain, replica)
            log.info("%s -> %s (status %d, %d of %d anchors known there, %d in flight) %.0f ms to headers",
                     path, replica.url, upstream.status_code, depth if replica is candidates[0] else 0,
                     len(chain), replica.in_flight, (time.perf_counter() - started) * 1000)  # fmt: skip
            answer = upstream.aiter_raw()
            if path == "/v1/responses" and upstream.status_code < 400:
                answer = _noting_response_id(answer, router, replica)
            return StreamingResponse(
                _relayed(answer, upstream, router, replica),
                status_code=upstream.status_code,
                media_type=upstream.headers.get("content-type"),
                headers={"x-warmkv-replica": replica.url},
            )
        return _error(path, 503, "no replica is reachable", "service_unavailable")

    for path in FORWARDED_PATHS:
        app.add_api_route(path, _forwarding(forward, path), methods=["POST"], name=path)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
        for replica in [r for r in router.replicas if r.up] or router.replicas:
            try:
                answer = await client.get(f"{replica.url}/v1/models", headers=headers)
            except httpx.HTTPError:
                router.failed(replica)
                continue
            return Response(answer.content, answer.status_code, media_type="application/json")
        return JSONResponse(error_body("no replica is reachable", "service_unavailable"), 503)

    @app.get("/health")
    async def health() -> JSONResponse:
        """Each replica's state; 503 while every one is resting after a failure, so that a load balancer's
        health check sees a router that has nowhere to send requests."""
        replicas = [{"url": r.url, "up": r.up, "in_flight": r.in_flight, "served": r.served,
                     "failures": r.failures} for r in router.replicas]  # fmt: skip
        return JSONResponse({"replicas": replicas}, 200 if any(r.up for r in router.replicas) else 503)

    return app


FORWARDED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/messages/count_tokens",
                   "/v1/responses")  # fmt: skip


def _forwarding(forward: Callable[[Request, str], Awaitable[Response]], path: str
                ) -> Callable[[Request], Awaitable[Response]]:  # fmt: skip
    async def endpoint(request: Request) -> Response:
        return await forward(request, path)

    return endpoint


def _error(path: str, status: int, message: str, kind: str) -> JSONResponse:
    anthropic = path.startswith("/v1/messages")
    body = anthropic_error_body(status, message) if anthropic else error_body(message, kind)
    return JSONResponse(body, status)


async def _noting_response_id(answer: AsyncIterator[bytes], router: Router, replica: Replica
                              ) -> AsyncIterator[bytes]:  # fmt: skip
    """Pass the answer through, remembering which replica made the response it names (a later request's
    previous_response_id goes there: that replica stores the conversation)."""
    head = b""
    async for chunk in answer:
        if len(head) < RESPONSE_ID_WINDOW:
            head += chunk
            found = RESPONSE_ID.search(head)
            if found:
                router.remember([response_anchor(found.group(1).decode())], replica)
                head = b"x" * RESPONSE_ID_WINDOW  # found: stop looking
        yield chunk


async def _relayed(answer: AsyncIterator[bytes], upstream: httpx.Response, router: Router, replica: Replica
                   ) -> AsyncIterator[bytes]:  # fmt: skip
    """The answer passed through. However the relay ends (the whole answer, the client leaving, the replica
    dying part-way), the replica's connection is closed and its request no longer counted in flight; a
    replica that dies part-way counts as failed, and the client's connection is cut, as the replica's was
    (the status has been sent: a client must not read the part as a whole answer)."""
    try:
        async for chunk in answer:
            yield chunk
    except httpx.HTTPError as err:
        router.failed(replica)
        log.warning("replica %s failed part-way through an answer (%s)", replica.url, err)
        raise
    finally:
        replica.in_flight -= 1
        await upstream.aclose()
