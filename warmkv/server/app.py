"""The HTTP API: OpenAI's chat completions, completions and models, Anthropic's messages and OpenAI's
responses, plus health and metrics. Routes validate, hand the prompt to the engine, and format output;
every chat API shares one chat path (server/chat_pipeline.py); cache decisions live in the engine and cache
packages, session memory in chat/."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import generate_latest

from warmkv.chat.session import ChatSession
from warmkv.chat.tool_calls import PARSERS
from warmkv.engine.async_engine import AsyncEngine
from warmkv.engine.grammar import GrammarCompiler
from warmkv.errors import WarmkvError
from warmkv.server import anthropic_routes, openai_routes, responses_routes
from warmkv.server.anthropic import anthropic_error
from warmkv.server.auth import GuardPaths
from warmkv.server.errors import install_error_handlers
from warmkv.server.limits import BodyLimit
from warmkv.server.metrics import ResponseCounter, ServerMetrics
from warmkv.server.request_log import RequestLog
from warmkv.server.state import ServerSettings, ServerState, State


def create_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    state = _server_state(engine, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        engine.shutdown()
        state.request_log.close()

    app = FastAPI(title="warmkv", lifespan=lifespan)
    app.state.warmkv = state
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    if settings.api_key is not None:  # the /v1 routes check the key themselves; this guards the others
        app.add_middleware(GuardPaths, key=settings.api_key)
    app.add_middleware(ResponseCounter, metrics=state.metrics)  # outermost: it counts the 401s and 413s too
    install_error_handlers(app, {"/v1/messages": anthropic_error})
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", prometheus, methods=["GET"])
    app.include_router(openai_routes.router)
    app.include_router(anthropic_routes.router)
    app.include_router(responses_routes.router)
    return app


def _server_state(engine: AsyncEngine, settings: ServerSettings) -> ServerState:
    model = engine.engine.model
    if settings.tool_parser not in PARSERS:
        raise WarmkvError(f"--tool-parser {settings.tool_parser}: choose one of {', '.join(PARSERS)}")
    parser = PARSERS[settings.tool_parser]
    template = settings.chat_template or model.tokenizer.chat_template
    metrics = ServerMetrics()
    if engine.engine.prefix_cache is not None:
        metrics.watch_cache(engine.engine.prefix_cache.stats, engine.engine.pool.block_size)
    metrics.watch_scheduler(lambda: engine.engine.stats)
    session = ChatSession(
        model.tokenizer, template, parser, settings.stable_tokens, settings.predictive_prefill
    )
    return ServerState(
        engine, settings, settings.served_model_name or model.name, parser, session, metrics,
        RequestLog(settings.trace), GrammarCompiler(model.tokenizer, engine.engine.eos_token_ids),
    )  # fmt: skip


async def health(state: State) -> JSONResponse:
    if state.engine.failure is not None:  # the engine thread died: nothing can be served any more
        return JSONResponse(
            {"status": "error", "reason": state.engine.failure, "model": state.model_name}, 503
        )
    return JSONResponse(
        {"status": "ok", "model": state.model_name, "pending_requests": state.engine.num_pending}
    )


async def prometheus(state: State) -> Response:
    state.metrics.pending.set(state.engine.num_pending)
    return Response(generate_latest(state.metrics.registry), media_type="text/plain; version=0.0.4")
