"""OpenAI's Responses API route: POST /v1/responses (what Codex and the OpenAI Agents SDK call)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from warmkv.chat.conversations import StoredResponse
from warmkv.engine.sequence import Sequence
from warmkv.server.chat_pipeline import remember_reply, start_chat
from warmkv.server.respond import respond
from warmkv.server.responses import ResponseFormat, to_chat
from warmkv.server.responses_protocol import ResponsesRequest
from warmkv.server.state import State
from warmkv.server.tenancy import authorized, cache_namespace

router = APIRouter(dependencies=[Depends(authorized)])


@router.post("/v1/responses")
async def responses(body: ResponsesRequest, request: Request, state: State) -> Response:
    state.check_model(body.model)
    chat = to_chat(body, cache_namespace(request, body.cache_salt), state.conversations)
    run = await start_chat(state, chat)
    fmt = ResponseFormat(body, chat, state.model_name, run.reply, run.record)

    async def finished(sequence: Sequence) -> None:
        await remember_reply(state, run, sequence)
        if body.store:
            conversation = chat.messages[1:] if body.instructions else chat.messages  # not the instructions
            state.conversations.put(
                chat.id, StoredResponse(chat.namespace, [*conversation, fmt.assistant_message()])
            )

    return await respond(request, state, run.generation, fmt, body.stream, finished)
