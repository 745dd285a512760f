"""The router's HTTP front: forwards OpenAI-style requests (streamed or not) to the chosen replica."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from warmkv.router.affinity import Replica, Router, anchor_chain
from warmkv.server.errors import error_body

log = logging.getLogger("warmkv.router")
FORWARDED_HEADERS = ("authorization", "content-type", "openai-organization", "openai-project")
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
            return JSONResponse(error_body(f"invalid JSON body: {err}", "invalid_request_error"), 400)
        chain = anchor_chain(body) if isinstance(body, dict) else []
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
        candidates, depth = router.candidates(chain)
        for replica in candidates:
            started = time.perf_counter()
            replica.in_flight += 1
            try:
                upstream = await client.send(
                    client.build_request("POST", f"{replica.url}{path}", content=raw, headers=headers),
                    stream=True,
                )
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
            return StreamingResponse(
                upstream.aiter_raw(),
                status_code=upstream.status_code,
                media_type=upstream.headers.get("content-type"),
                headers={"x-warmkv-replica": replica.url},
                background=BackgroundTask(_finish, upstream, replica),
            )
        return JSONResponse(error_body("no replica is reachable", "service_unavailable"), 503)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await forward(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await forward(request, "/v1/completions")

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
    async def health() -> dict:
        return {"replicas": [{"url": r.url, "up": r.up, "in_flight": r.in_flight, "served": r.served,
                              "failures": r.failures} for r in router.replicas]}  # fmt: skip

    return app


async def _finish(upstream: httpx.Response, replica: Replica) -> None:
    await upstream.aclose()
    replica.in_flight -= 1
