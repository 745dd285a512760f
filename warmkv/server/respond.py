"""Answering one generation over HTTP: a whole JSON response, or a stream of server-sent events, in the
format of the API the request came through. Failures, client disconnects and accounting are handled here
once for every endpoint."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from warmkv.engine.llm_engine import StepOutput
from warmkv.engine.sequence import Sequence
from warmkv.errors import WarmkvError
from warmkv.server.errors import ClientGone, error_kind, until_disconnect
from warmkv.server.generation import Generation, account
from warmkv.server.request_log import RequestRecord
from warmkv.server.state import ServerState


class ReplyFormat:
    """How one API shapes a generation's outputs: a whole body, or server-sent events."""

    def opening(self) -> list[str]:
        """Events sent before the first output (the first output has been computed by then)."""
        raise NotImplementedError

    def delta(self, output: StepOutput) -> list[str]:
        raise NotImplementedError

    def closing(self, record: RequestRecord) -> list[str]:
        """Events after the last output; `record` holds the final token counts."""
        raise NotImplementedError

    def whole(self, outputs: list[StepOutput], record: RequestRecord) -> dict[str, Any]:
        raise NotImplementedError

    def failure(self, err: WarmkvError) -> list[str]:
        """Events telling the client its stream failed part-way."""
        raise NotImplementedError


def sse(payload: dict[str, Any], event: str | None = None) -> str:
    """One server-sent event; `event` names it (Anthropic's and the Responses API's streams do)."""
    return (f"event: {event}\n" if event else "") + f"data: {json.dumps(payload)}\n\n"


async def respond(
    request: Request,
    state: ServerState,
    generation: Generation,
    fmt: ReplyFormat,
    stream: bool,
    on_finish: Callable[[Sequence], Awaitable[None]] | None = None,
) -> Response:
    """Run `generation` and answer with `fmt`; `on_finish` runs once the reply is complete (and formatted,
    so the reply's tool calls are known), with the first choice's sequence (the first output's)."""
    record = generation.record
    try:
        first = await until_disconnect(request, generation.first())
    except BaseException as err:
        record.status = 499 if isinstance(err, ClientGone) else error_kind(err)[0]
        account(record, state.metrics, state.request_log)
        raise
    if stream:
        events = _stream(state, first, generation, fmt, on_finish)
        return StreamingResponse(events, media_type="text/event-stream")
    try:
        outputs = [first, *(await until_disconnect(request, _collect(generation)))]
    except ClientGone:
        record.status = 499
        raise
    finally:
        generation.note_miss()
        account(record, state.metrics, state.request_log)
    body = fmt.whole(outputs, record)
    if on_finish is not None:
        await on_finish(first.sequence)
    return JSONResponse(body)


async def _stream(
    state: ServerState,
    first: StepOutput,
    generation: Generation,
    fmt: ReplyFormat,
    on_finish: Callable[[Sequence], Awaitable[None]] | None,
) -> AsyncIterator[str]:
    record = generation.record
    # an output's events go out in one write: each write is a trip through every middleware and the socket
    try:
        yield "".join([*fmt.opening(), *fmt.delta(first)])
        async for output in generation:
            if events := fmt.delta(output):
                yield "".join(events)
        if on_finish is not None:
            await on_finish(first.sequence)
        yield "".join(fmt.closing(record))
    except asyncio.CancelledError:
        record.status = 499  # client gone: leaving the iteration cancelled the request
        raise
    except WarmkvError as err:
        record.status = error_kind(err)[0]
        yield "".join(fmt.failure(err))
    finally:
        generation.note_miss()
        account(record, state.metrics, state.request_log)


async def _collect(generation: Generation) -> list[StepOutput]:
    return [output async for output in generation]
