"""OpenAI's routes: /v1/chat/completions, /v1/completions and /v1/models."""

from __future__ import annotations

import asyncio
import uuid
from functools import partial
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from warmkv.engine.sampling import SamplingParams
from warmkv.errors import InvalidRequest
from warmkv.server.chat_pipeline import ChatRequest, remember_reply, start_chat
from warmkv.server.generation import Generation
from warmkv.server.openai_format import ChatFormat, Choices, CompletionFormat
from warmkv.server.protocol import ChatCompletionRequest, CompletionRequest
from warmkv.server.request_log import RequestRecord
from warmkv.server.respond import respond
from warmkv.server.state import ServerState, State
from warmkv.server.tenancy import authorized, cache_namespace

router = APIRouter(dependencies=[Depends(authorized)])


def sampling(
    body: ChatCompletionRequest | CompletionRequest, max_tokens: int, logprobs: int | None
) -> SamplingParams:
    """logprobs: alternatives per token to report with each token's log-prob; None: no log-probs."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stop_strings,
        stop_token_ids=body.stop_token_ids,
        ignore_eos=body.ignore_eos,
        min_p=body.min_p,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias=body.logit_bias or {},
        logprobs=logprobs,
    )


def model_card(state: ServerState) -> dict[str, Any]:
    return {"id": state.model_name, "object": "model", "created": state.started, "owned_by": "warmkv",
            "max_model_len": state.max_model_len}  # fmt: skip


@router.get("/v1/models")
async def models(state: State) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(state)]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, state: State) -> dict[str, Any]:
    state.check_model(model_id)
    return model_card(state)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State) -> Response:
    state.check_model(body.model)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    tool_choice = body.tool_choice
    chat = ChatRequest(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        endpoint="chat",
        messages=[m.model_dump(exclude_none=True) for m in body.messages],
        tools=[t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None,
        tool_choice=tool_choice if isinstance(tool_choice, str | None) else tool_choice.model_dump(),
        params=sampling(body, 0, body.top_logprobs_count),  # max_tokens: set once the prompt is rendered
        max_tokens=max_tokens,
        namespace=cache_namespace(request, body.cache_salt),
        max_tool_calls=1 if body.parallel_tool_calls is False else None,
        response_format=body.response_format.model_dump(by_alias=True) if body.response_format else None,
        n=body.n,
        continue_final=body.continue_final_message,
    )
    run = await start_chat(state, chat)
    formats = [
        ChatFormat(chat.id, state.model_name, reply, body.include_usage, index, state.tokenizer)
        for index, reply in enumerate(run.replies)
    ]
    finished = partial(remember_reply, state, run)  # the conversation goes on with the first choice
    fmt = Choices(formats, run.generation.choice_of)
    return await respond(request, state, run.generation, fmt, body.stream, finished)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: State) -> Response:
    state.check_model(body.model)
    if isinstance(body.prompt, str):
        prompt_ids = await asyncio.to_thread(lambda: list(state.tokenizer(body.prompt)["input_ids"]))
    else:
        prompt_ids = body.prompt
        vocab_size = state.engine.engine.model.config.vocab_size
        if any(not 0 <= t < vocab_size for t in prompt_ids):
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab_size})")
    record = RequestRecord(id=f"cmpl-{uuid.uuid4().hex}", endpoint="completions")
    rest = max(1, state.max_model_len - len(prompt_ids))  # unset: whatever the context window leaves
    params = sampling(body, body.max_tokens if body.max_tokens is not None else rest, body.logprobs)
    namespace = cache_namespace(request, body.cache_salt)
    generation = Generation(state.engine, record, prompt_ids, params, namespace, n=body.n)
    formats = [
        CompletionFormat(record.id, state.model_name, body.include_usage, index, state.tokenizer)
        for index in range(body.n)
    ]
    return await respond(request, state, generation, Choices(formats, generation.choice_of), body.stream)
