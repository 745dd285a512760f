"""Anthropic's routes: POST /v1/messages and /v1/messages/count_tokens (what Claude Code and the
anthropic SDK call). Authentication by `x-api-key` or a Bearer token; `anthropic-version` checked."""

from __future__ import annotations

import asyncio
from datetime import date
from functools import partial
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from warmkv.server.anthropic import MessageFormat, to_chat
from warmkv.server.anthropic_protocol import CountTokensRequest, MessagesRequest
from warmkv.server.chat_pipeline import remember_reply, start_chat
from warmkv.server.errors import ApiError
from warmkv.server.respond import respond
from warmkv.server.state import State
from warmkv.server.tenancy import authorized, cache_namespace

# the Messages API's first version; later ones (the SDK sends its own date) keep the request and reply
# shapes implemented here
FIRST_VERSION = "2023-01-01"


async def api_version(request: Request) -> None:  # async: on the loop, no worker hop
    version = request.headers.get("anthropic-version")
    if version is None:
        return
    try:
        date.fromisoformat(version)
    except ValueError:
        raise ApiError(400, f"anthropic-version: {version!r} is not a version date (YYYY-MM-DD)") from None
    if version < FIRST_VERSION:
        raise ApiError(400, f"anthropic-version: {version!r} predates the Messages API ({FIRST_VERSION})")


router = APIRouter(dependencies=[Depends(authorized), Depends(api_version)])


@router.post("/v1/messages")
async def messages(body: MessagesRequest, request: Request, state: State) -> Response:
    state.check_model(body.model)
    chat = to_chat(body, cache_namespace(request, body.cache_salt))
    run = await start_chat(state, chat)
    fmt = MessageFormat(chat.id, state.model_name, run.reply, run.record, run.breakpoint_tokens)
    return await respond(
        request, state, run.generation, fmt, body.stream, partial(remember_reply, state, run)
    )


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request, state: State) -> dict[str, Any]:
    state.check_model(body.model)
    chat = to_chat(body, cache_namespace(request, body.cache_salt))
    prompt = await asyncio.to_thread(
        state.session.prompt, chat.messages, chat.tools, chat.tool_choice, chat.namespace, chat.continue_final
    )
    return {"input_tokens": len(prompt.token_ids)}
