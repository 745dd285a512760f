"""Errors as HTTP answers: one status and OpenAI error type per warmkv error, and the handlers that write
them in the style of the API a route belongs to (OpenAI's body, or Anthropic's on /v1/messages)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from warmkv.errors import WarmkvError, error_body, http_error

log = logging.getLogger("warmkv.server")

T = TypeVar("T")

DISCONNECT_CHECK_S = 0.2  # how often a request waiting on work looks whether its client is still there
RETRY_AFTER_S = 1  # what a 429 (the server at its limit of pending requests) asks a client to wait


class ApiError(Exception):
    """An error answered as is: its status, OpenAI error type, code and offending parameter."""

    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
        param: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param


class ClientGone(Exception):
    """The client disconnected before its response was complete."""


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so the generation, or the request to a replica) if the client
    disconnects first: ClientGone then."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_CHECK_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ClientGone
    finally:
        if not task.done():
            task.cancel()


def error_kind(err: BaseException) -> tuple[int, str, str | None]:
    """HTTP status, OpenAI error type and code of an error (subclasses map like their base)."""
    if isinstance(err, ApiError):
        return err.status, err.kind, err.code
    return http_error(err)


# how one API writes an error: (status, OpenAI error type, message, code, param) -> body
ErrorWriter = Callable[[int, str, str, "str | None", "str | None"], dict[str, Any]]


def openai_error(status: int, kind: str, message: str, code: str | None, param: str | None) -> dict[str, Any]:
    return error_body(message, kind, code, param)


def install_error_handlers(app: FastAPI, writers: dict[str, ErrorWriter]) -> None:
    """Every error becomes a JSON answer; `writers` maps a path prefix to its API's error style (OpenAI's
    everywhere else)."""

    def answer(request: Request, status: int, kind: str, message: str, code: str | None = None,
               param: str | None = None) -> JSONResponse:  # fmt: skip
        path = request.url.path
        write = next((w for prefix, w in writers.items() if path.startswith(prefix)), openai_error)
        # a full queue drains as requests finish: clients (the OpenAI and Anthropic SDKs) wait this long
        # before they retry, rather than their own backoff's guess
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else None
        return JSONResponse(write(status, kind, message, code, param), status_code=status, headers=headers)

    @app.exception_handler(WarmkvError)
    async def _warmkv_error(request: Request, err: WarmkvError) -> JSONResponse:
        status, kind, code = error_kind(err)
        return answer(request, status, kind, str(err), code)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return answer(request, err.status, err.kind, err.message, err.code, err.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        if first.get("type") == "json_invalid":  # its location is a character offset, not a field
            reason = (first.get("ctx") or {}).get("error", "JSON decode error")
            message = f"the body is not valid JSON: {reason} at character {first['loc'][-1]}"
            return answer(request, 400, "invalid_request_error", message)
        if tuple(first.get("loc", ())) == ("body",) and first.get("type") == "missing":
            message = "the request has no body: send a JSON object"
            return answer(request, 400, "invalid_request_error", message)
        # a check over the whole body names the field it refused in its context
        param = (first.get("ctx") or {}).get("param") or ".".join(str(p) for p in first.get("loc", ())[1:])
        param = param or None
        reason = str(first.get("msg")).removeprefix("Value error, ")  # pydantic's prefix to a check's words
        message = f"{param}: {reason}" if param else reason
        return answer(request, 400, "invalid_request_error", message, None, param)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException) -> JSONResponse:
        return answer(request, err.status_code, "invalid_request_error", str(err.detail))

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, _: ClientGone) -> Response:
        # an everyday event (a user pressed stop), not a server error: no traceback
        log.info("client disconnected before the response of %s was complete", request.url.path)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return answer(request, 500, "server_error", f"internal error: {type(err).__name__}")
