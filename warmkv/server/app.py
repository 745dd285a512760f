"""The OpenAI-compatible HTTP API. Handlers validate, hand the prompt to the engine, and format output;
cache decisions live in the engine and cache packages."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException

from warmkv.chat.prompt import build_chat_prompt
from warmkv.chat.reply import ReplyReader
from warmkv.chat.tool_calls import PARSERS
from warmkv.chat.turns import TurnMemory
from warmkv.engine.async_engine import AsyncEngine
from warmkv.engine.llm_engine import StepOutput
from warmkv.engine.sampling import SamplingParams
from warmkv.engine.sequence import Sequence
from warmkv.errors import (
    ContextOverflow,
    EngineFailure,
    InvalidRequest,
    QueueFull,
    UnknownModel,
    WarmkvError,
)
from warmkv.server.auth import UNAUTHORIZED, GuardPaths, bearer_matches
from warmkv.server.generation import Generation, account
from warmkv.server.limits import BodyLimit
from warmkv.server.metrics import ServerMetrics
from warmkv.server.protocol import ChatCompletionRequest, CompletionRequest
from warmkv.server.request_log import RequestLog, RequestRecord

log = logging.getLogger("warmkv.server")

# error type -> HTTP status, OpenAI error type, code
_ERRORS: dict[type[WarmkvError], tuple[int, str, str | None]] = {
    ContextOverflow: (400, "invalid_request_error", "context_length_exceeded"),
    InvalidRequest: (400, "invalid_request_error", None),
    UnknownModel: (404, "invalid_request_error", "model_not_found"),
    QueueFull: (429, "rate_limit_error", "rate_limit_exceeded"),
    EngineFailure: (500, "server_error", None),
}


@dataclass(slots=True)
class ServerSettings:
    api_key: str | None = None
    served_model_name: str | None = None  # default: the model's name
    chat_template: str | None = None  # overrides the model's own template
    tool_parser: str = "hermes"
    # after a reply with tool calls, prefill the history the client will send back, while it runs its tools
    predictive_prefill: bool = True
    # tokenise per message and reuse remembered turns' ids (off: whole-text tokenisation, for comparisons)
    stable_tokens: bool = True
    trace: Path | None = None
    max_request_bytes: int = 16 * 2**20  # larger bodies get 413 before they are read whole
    max_messages: int = 4096  # a chat request with more gets 400 before rendering


class ClientGone(Exception):
    """The client disconnected before its response was complete."""


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def create_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    model = engine.engine.model
    tokenizer = model.tokenizer
    model_name = settings.served_model_name or model.name
    template = settings.chat_template or tokenizer.chat_template
    if settings.tool_parser not in PARSERS:
        raise WarmkvError(f"--tool-parser {settings.tool_parser}: choose one of {', '.join(PARSERS)}")
    parser = PARSERS[settings.tool_parser]
    metrics = ServerMetrics()
    turns = TurnMemory()
    if engine.engine.prefix_cache is not None:
        metrics.watch_cache(engine.engine.prefix_cache.stats)
    request_log = RequestLog(settings.trace)
    started = int(time.time())

    # rendering and tokenising a request take CPU time in proportion to its size: off the event loop, so
    # /health and streams stay responsive; one thread, as the tokenizer is shared
    prepare = ThreadPoolExecutor(max_workers=1, thread_name_prefix="warmkv-prepare")

    async def off_loop(work: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(prepare, work)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        engine.shutdown()
        prepare.shutdown(cancel_futures=True)
        request_log.close()

    app = FastAPI(title="warmkv", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)

    if settings.api_key is not None:
        app.add_middleware(GuardPaths, key=settings.api_key)

    async def authorized(request: Request) -> None:
        if settings.api_key is None:
            return
        if not bearer_matches(request.headers.get("authorization", ""), settings.api_key):
            raise _HTTPError(401, UNAUTHORIZED)

    def check_model(name: str) -> None:
        if name != model_name:
            raise UnknownModel(f"The model {name!r} does not exist; this server serves {model_name!r}")

    def sampling(
        body: ChatCompletionRequest | CompletionRequest, prompt_tokens: int, max_tokens: int | None
    ) -> SamplingParams:
        return SamplingParams(
            # unset: whatever the context window leaves (at least 1, so an overlong prompt is refused as such)
            max_tokens=max_tokens
            if max_tokens is not None
            else max(1, engine.engine.max_model_len - prompt_tokens),
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=body.stop_strings,
            stop_token_ids=body.stop_token_ids,
            ignore_eos=body.ignore_eos,
        )

    def namespace(request: Request, body: ChatCompletionRequest | CompletionRequest) -> str:
        # tenants are kept apart by API key and by an explicit cache_salt
        return f"{request.headers.get('authorization', '')}\0{body.cache_salt or ''}"

    @app.exception_handler(WarmkvError)
    async def _warmkv_error(_: Request, err: WarmkvError) -> JSONResponse:
        status, kind, code = next(
            (v for t, v in _ERRORS.items() if isinstance(err, t)), (500, "server_error", None)
        )
        return JSONResponse(error_body(str(err), kind, code), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        # a check over the whole body names the field it refused in its context
        param = (first.get("ctx") or {}).get("param") or ".".join(str(p) for p in first.get("loc", ())[1:])
        param = param or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return JSONResponse(error_body(message, "invalid_request_error", None, param), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(err.detail), "invalid_request_error"), status_code=err.status_code)

    @app.exception_handler(_HTTPError)
    async def _http_error(_: Request, err: _HTTPError) -> JSONResponse:
        return JSONResponse(err.body, status_code=err.status)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, _: ClientGone) -> Response:
        # an everyday event (a user pressed stop), not a server error
        log.info("client disconnected before the response of %s was complete", request.url.path)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse(
            error_body(f"internal error: {type(err).__name__}", "server_error"), status_code=500
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "pending_requests": engine.num_pending}

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.pending.set(engine.num_pending)
        return Response(generate_latest(metrics.registry), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": started, "owned_by": "warmkv",
                "max_model_len": engine.engine.max_model_len}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        if len(body.messages) > settings.max_messages:
            raise InvalidRequest(f"messages: {len(body.messages)} messages; this server takes at most "
                                 f"{settings.max_messages} (--max-messages)")  # fmt: skip
        tenant = namespace(request, body)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        choice = body.tool_choice
        tool_choice = choice if isinstance(choice, str | None) else choice.model_dump()
        prompt = await off_loop(lambda: build_chat_prompt(
            tokenizer, template, parser, messages, tools, tool_choice, turns, tenant,
            stable_tokens=settings.stable_tokens,
        ))  # fmt: skip
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        record = RequestRecord(id=f"chatcmpl-{uuid.uuid4().hex}", endpoint="chat")
        params = sampling(body, len(prompt.token_ids), max_tokens)
        generation = Generation(engine, record, prompt.token_ids, params, tenant, prompt.spans)
        if prompt.forced_prefix:  # a forced call ends at its end marker; nothing after it is wanted
            params.stop.append(parser.end)
        fmt = _ChatFormat(record.id, model_name, ReplyReader(prompt, parser), body.include_usage)

        def remember_turn(sequence: Sequence) -> None:
            # the prompt, and the prompt with the reply as generated: the next turn's history starts so
            reply = sequence.output_ids
            if reply and reply[-1] in tokenizer.all_special_ids:
                reply = reply[:-1]  # the end-of-turn token: the template writes it back itself
            turns.remember(tenant, prompt.text, prompt.token_ids)
            reply_text = tokenizer.decode(reply, skip_special_tokens=False)
            turns.remember(tenant, prompt.text + reply_text, prompt.token_ids + reply)
            if settings.predictive_prefill and fmt.reader.calls:
                reply_message = {"role": "assistant", "content": None,
                                 "tool_calls": [call.to_openai() for call in fmt.reader.calls]}  # fmt: skip
                predicted = build_chat_prompt(
                    tokenizer, template, parser, [*messages, reply_message], tools, None, turns, tenant,
                    add_generation_prompt=False, stable_tokens=settings.stable_tokens,
                )  # fmt: skip
                turns.remember(tenant, predicted.text, predicted.token_ids)
                engine.prefill_when_idle(predicted.token_ids, tenant)

        return await run(request, generation, fmt, stream=body.stream, on_finish=remember_turn)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        if isinstance(body.prompt, str):
            text = body.prompt
            prompt_ids = await off_loop(lambda: list(tokenizer(text)["input_ids"]))
        else:
            prompt_ids = body.prompt
            if any(not 0 <= t < model.config.vocab_size for t in prompt_ids):
                raise InvalidRequest(f"prompt token ids must be in [0, {model.config.vocab_size})")
        record = RequestRecord(id=f"cmpl-{uuid.uuid4().hex}", endpoint="completions")
        params = sampling(body, len(prompt_ids), body.max_tokens)
        generation = Generation(engine, record, prompt_ids, params, namespace(request, body))
        return await run(
            request, generation, _CompletionFormat(record.id, model_name, body.include_usage), body.stream
        )

    async def run(
        request: Request,
        generation: Generation,
        fmt: _Format,
        stream: bool,
        on_finish: Callable[[Sequence], None] = lambda _: None,
    ) -> Response:
        record = generation.record
        try:
            first = await _until_disconnect(request, generation.first())
        except BaseException as err:
            record.status = 499 if isinstance(err, ClientGone) else _error_kind(err)[0]
            account(record, metrics, request_log)
            raise
        if stream:
            return StreamingResponse(
                _stream(first, generation, fmt, on_finish), media_type="text/event-stream"
            )
        try:
            outputs = [first, *(await _until_disconnect(request, _collect(generation)))]
        except ClientGone:
            record.status = 499
            raise
        finally:
            account(record, metrics, request_log)
        body = fmt.whole(outputs, generation.usage())
        on_finish(outputs[-1].sequence)  # after formatting: the reply's tool calls are known by then
        return JSONResponse(body)

    async def _stream(
        first: StepOutput, generation: Generation, fmt: _Format, on_finish: Callable[[Sequence], None]
    ) -> AsyncIterator[str]:
        record = generation.record
        try:
            yield _sse(fmt.opening())
            for chunk in fmt.delta(first):
                yield _sse(chunk)
            last = first
            async for last in generation:
                for chunk in fmt.delta(last):
                    yield _sse(chunk)
            on_finish(last.sequence)
            if fmt.include_usage:
                yield _sse(fmt.usage_chunk(generation.usage()))
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            record.status = 499  # client gone: leaving the iteration cancelled the request
            raise
        except WarmkvError as err:
            record.status = 500
            yield _sse(error_body(str(err), "server_error"))
        finally:
            account(record, metrics, request_log)

    return app


def _error_kind(err: BaseException) -> tuple[int, str, str | None]:
    """HTTP status, OpenAI error type and code of an error (subclasses map like their base)."""
    return next((v for t, v in _ERRORS.items() if isinstance(err, t)), (500, "server_error", None))


class _HTTPError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status, self.body = status, body


async def _collect(generation: Generation) -> list[StepOutput]:
    return [output async for output in generation]


async def _until_disconnect(request: Request, work: Any) -> Any:
    """Await `work`, cancelling it (and so the generation) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.2)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ClientGone
    finally:
        if not task.done():
            task.cancel()


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class _Format:
    """How one endpoint shapes outputs: a whole response, or stream chunks."""

    object_name = ""
    include_usage = False

    def __init__(self, request_id: str, model: str) -> None:
        self.id, self.model, self.created = request_id, model, int(time.time())

    def envelope(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": choices, **extra}  # fmt: skip

    def opening(self) -> dict[str, Any]:
        raise NotImplementedError

    def delta(self, output: StepOutput) -> list[dict[str, Any]]:
        raise NotImplementedError

    def whole(self, outputs: list[StepOutput], usage: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self.envelope([], usage=usage), "object": self.chunk_object}

    chunk_object = ""


class _ChatFormat(_Format):
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, request_id: str, model: str, reader: ReplyReader, include_usage: bool) -> None:
        super().__init__(request_id, model)
        self.include_usage = include_usage
        self.reader = reader
        self._calls_sent = 0

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        chunk = {**self.envelope([choice]), "object": self.chunk_object}
        return chunk | ({"usage": None} if self.include_usage else {})

    def opening(self) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""})

    def delta(self, output: StepOutput) -> list[dict[str, Any]]:
        text = self._content_of(output)
        chunks = [self._chunk({"content": text})] if text else []
        calls = self.reader.calls
        chunks += [
            self._chunk({"tool_calls": [calls[i].to_openai(i)]}) for i in range(self._calls_sent, len(calls))
        ]
        self._calls_sent = len(calls)
        if output.finished:
            chunks.append(self._chunk({}, self._finish_reason(output)))
        return chunks

    def whole(self, outputs: list[StepOutput], usage: dict[str, Any]) -> dict[str, Any]:
        content = "".join(self._content_of(output) for output in outputs)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if self.reader.calls:
            message |= {"content": content or None, "tool_calls": [c.to_openai() for c in self.reader.calls]}
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": self._finish_reason(outputs[-1]),
        }
        return self.envelope([choice], usage=usage)

    def _content_of(self, output: StepOutput) -> str:
        text = self.reader.feed(output.text)
        return text + self.reader.finish() if output.finished else text

    def _finish_reason(self, output: StepOutput) -> str:
        return "tool_calls" if self.reader.calls else output.sequence.finish_reason.value  # type: ignore[union-attr]


class _CompletionFormat(_Format):
    object_name = chunk_object = "text_completion"

    def __init__(self, request_id: str, model: str, include_usage: bool) -> None:
        super().__init__(request_id, model)
        self.include_usage = include_usage

    def _choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def opening(self) -> dict[str, Any]:
        return self.envelope([self._choice("", None)])

    def delta(self, output: StepOutput) -> list[dict[str, Any]]:
        reason = output.sequence.finish_reason.value if output.finished else None  # type: ignore[union-attr]
        return [self.envelope([self._choice(output.text, reason)])] if output.text or reason else []

    def whole(self, outputs: list[StepOutput], usage: dict[str, Any]) -> dict[str, Any]:
        text = "".join(output.text for output in outputs)
        reason = outputs[-1].sequence.finish_reason.value  # type: ignore[union-attr]
        return self.envelope([self._choice(text, reason)], usage=usage)
