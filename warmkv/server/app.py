"""The OpenAI-compatible HTTP API. Handlers validate, hand the prompt to the engine, and format output;
cache decisions live in the engine and cache packages."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
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
from warmkv.chat.structure import reply_grammar
from warmkv.chat.tool_calls import PARSERS
from warmkv.chat.turns import TurnMemory
from warmkv.engine.async_engine import AsyncEngine
from warmkv.engine.grammar import Grammar, GrammarCompiler
from warmkv.engine.llm_engine import StepOutput
from warmkv.engine.sampling import SamplingParams, TokenLogprobs
from warmkv.engine.sequence import Sequence
from warmkv.errors import (
    ContextOverflow,
    EngineFailure,
    InvalidRequest,
    QueueFull,
    UnknownModel,
    WarmkvError,
)
from warmkv.server.generation import Generation, account
from warmkv.server.logprobs import chat_logprobs, completion_logprobs
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
    grammars = GrammarCompiler(tokenizer, engine.engine.eos_token_ids)
    metrics = ServerMetrics()
    turns = TurnMemory()
    if engine.engine.prefix_cache is not None:
        metrics.watch_cache(engine.engine.prefix_cache.stats)
    request_log = RequestLog(settings.trace)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        engine.shutdown()
        request_log.close()

    app = FastAPI(title="warmkv", lifespan=lifespan)

    async def authorized(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
            raise _HTTPError(
                401, error_body("Incorrect API key provided", "invalid_request_error", "invalid_api_key")
            )

    def check_model(name: str) -> None:
        if name != model_name:
            raise UnknownModel(f"The model {name!r} does not exist; this server serves {model_name!r}")

    def sampling(
        body: ChatCompletionRequest | CompletionRequest,
        prompt_tokens: int,
        max_tokens: int | None,
        logprobs: int | None,
        grammar: Grammar | None = None,
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
            min_p=body.min_p,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty,
            logit_bias=body.logit_bias or {},
            logprobs=logprobs,
            grammar=grammar,
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
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        reason = str(first.get("msg")).removeprefix("Value error, ")
        message = f"{param}: {reason}" if param else reason
        return JSONResponse(error_body(message, "invalid_request_error", None, param), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(err.detail), "invalid_request_error"), status_code=err.status_code)

    @app.exception_handler(_HTTPError)
    async def _http_error(_: Request, err: _HTTPError) -> JSONResponse:
        return JSONResponse(err.body, status_code=err.status)

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
        tenant = namespace(request, body)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        choice = body.tool_choice
        tool_choice = choice if isinstance(choice, str | None) else choice.model_dump()
        prompt = build_chat_prompt(
            tokenizer,
            template,
            parser,
            messages,
            tools,
            tool_choice,
            turns,
            tenant,
            stable_tokens=settings.stable_tokens,
        )
        response_format = body.response_format.model_dump(by_alias=True) if body.response_format else None
        parallel = body.parallel_tool_calls is not False
        grammar = reply_grammar(tools, tool_choice, response_format, parser, parallel)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        record = RequestRecord(id=f"chatcmpl-{uuid.uuid4().hex}", endpoint="chat")
        # compiling takes milliseconds (a second for the first grammar: the vocabulary is indexed)
        compiled = await asyncio.to_thread(grammars.compile, grammar) if grammar is not None else None
        params = sampling(body, len(prompt.token_ids), max_tokens, body.top_logprobs_count, compiled)
        # one call at most, without a grammar to say so: the reply ends with the first call's end marker
        one_call_by_stop = grammar is None and bool(prompt.tool_names) and not parallel
        if one_call_by_stop:
            params.stop.append(parser.end)
        generation = Generation(engine, record, prompt.token_ids, params, tenant, prompt.spans, body.n)
        fmts = [
            _ChatFormat(record.id, model_name, ReplyReader(prompt, parser, one_call_by_stop),
                        body.include_usage, index, tokenizer)
            for index in range(body.n)
        ]  # fmt: skip
        fmt = fmts[0]

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

        # the conversation goes on with one of the choices: the first is remembered
        return await run(request, generation, fmts, stream=body.stream, on_finish=remember_turn)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        if isinstance(body.prompt, str):
            prompt_ids = list(tokenizer(body.prompt)["input_ids"])
        else:
            prompt_ids = body.prompt
            if any(not 0 <= t < model.config.vocab_size for t in prompt_ids):
                raise InvalidRequest(f"prompt token ids must be in [0, {model.config.vocab_size})")
        record = RequestRecord(id=f"cmpl-{uuid.uuid4().hex}", endpoint="completions")
        params = sampling(body, len(prompt_ids), body.max_tokens, body.logprobs)
        generation = Generation(engine, record, prompt_ids, params, namespace(request, body), n=body.n)
        fmts = [
            _CompletionFormat(record.id, model_name, body.include_usage, index, tokenizer)
            for index in range(body.n)
        ]
        return await run(request, generation, fmts, body.stream)

    async def run(
        request: Request,
        generation: Generation,
        fmts: list[_Format],
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
                _stream(first, generation, fmts, on_finish), media_type="text/event-stream"
            )
        try:
            outputs = [first, *(await _until_disconnect(request, _collect(generation)))]
        except ClientGone:
            record.status = 499
            raise
        finally:
            account(record, metrics, request_log)
        by_choice = [[o for o in outputs if generation.choice_of(o) == i] for i, _ in enumerate(fmts)]
        choices = [fmt.whole_choice(choice) for fmt, choice in zip(fmts, by_choice, strict=True)]
        on_finish(by_choice[0][-1].sequence)  # after formatting: the reply's tool calls are known by then
        return JSONResponse(fmts[0].envelope(choices, usage=generation.usage()))

    async def _stream(
        first: StepOutput, generation: Generation, fmts: list[_Format], on_finish: Callable[[Sequence], None]
    ) -> AsyncIterator[str]:
        record = generation.record
        try:
            for fmt in fmts:
                yield _sse(fmt.opening())
            for chunk in fmts[0].delta(first):
                yield _sse(chunk)
            async for output in generation:
                for chunk in fmts[generation.choice_of(output)].delta(output):
                    yield _sse(chunk)
            on_finish(first.sequence)
            if fmts[0].include_usage:
                yield _sse(fmts[0].usage_chunk(generation.usage()))
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
    """How one endpoint shapes one choice's outputs: a whole response, or stream chunks."""

    object_name = ""
    chunk_object = ""
    include_usage = False

    def __init__(self, request_id: str, model: str, index: int = 0, tokenizer: Any = None) -> None:
        self.id, self.model, self.created = request_id, model, int(time.time())
        self.index = index  # of the choice
        self.tokenizer = tokenizer  # for log-probs' token texts
        self._logprobs: list[TokenLogprobs] = []  # not yet sent

    def envelope(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": choices, **extra}  # fmt: skip

    def opening(self) -> dict[str, Any]:
        raise NotImplementedError

    def delta(self, output: StepOutput) -> list[dict[str, Any]]:
        raise NotImplementedError

    def whole_choice(self, outputs: list[StepOutput]) -> dict[str, Any]:
        raise NotImplementedError

    def whole(self, outputs: list[StepOutput], usage: dict[str, Any]) -> dict[str, Any]:
        return self.envelope([self.whole_choice(outputs)], usage=usage)

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self.envelope([], usage=usage), "object": self.chunk_object}

    def _take_logprobs(self, outputs: list[StepOutput]) -> list[TokenLogprobs] | None:
        """Log-probs of these outputs and any held back; None when the request asked for none."""
        if outputs[-1].sequence.params.logprobs is None:
            return None
        taken = self._logprobs + [o.logprobs for o in outputs if o.logprobs is not None]
        self._logprobs = []
        return taken


class _ChatFormat(_Format):
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, request_id: str, model: str, reader: ReplyReader, include_usage: bool, index: int,
                 tokenizer: Any) -> None:  # fmt: skip
        super().__init__(request_id, model, index, tokenizer)
        self.include_usage = include_usage
        self.reader = reader
        self._calls_sent = 0

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": self.index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
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
        logprobs = self._take_logprobs([output])
        if not chunks and logprobs:
            self._logprobs = logprobs  # the token's text is held back: its log-prob goes with it
        elif logprobs is not None:
            chunks[0]["choices"][0]["logprobs"] = chat_logprobs(logprobs, self.tokenizer)
        return chunks

    def whole_choice(self, outputs: list[StepOutput]) -> dict[str, Any]:
        content = "".join(self._content_of(output) for output in outputs)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if self.reader.calls:
            message |= {"content": content or None, "tool_calls": [c.to_openai() for c in self.reader.calls]}
        logprobs = self._take_logprobs(outputs)
        return {
            "index": self.index,
            "message": message,
            "logprobs": None if logprobs is None else chat_logprobs(logprobs, self.tokenizer),
            "finish_reason": self._finish_reason(outputs[-1]),
        }

    def _content_of(self, output: StepOutput) -> str:
        text = self.reader.feed(output.text)
        return text + self.reader.finish() if output.finished else text

    def _finish_reason(self, output: StepOutput) -> str:
        return "tool_calls" if self.reader.calls else output.sequence.finish_reason.value  # type: ignore[union-attr]


class _CompletionFormat(_Format):
    object_name = chunk_object = "text_completion"

    def __init__(self, request_id: str, model: str, include_usage: bool, index: int, tokenizer: Any) -> None:
        super().__init__(request_id, model, index, tokenizer)
        self.include_usage = include_usage
        self._text_offset = 0  # characters of the completion sent, where the next tokens' text starts

    def _choice(self, text: str, finish_reason: str | None, outputs: list[StepOutput]) -> dict[str, Any]:
        logprobs = self._take_logprobs(outputs) if outputs else None
        if logprobs is not None:
            logprobs = completion_logprobs(logprobs, self.tokenizer, self._text_offset)
            self._text_offset += sum(len(token) for token in logprobs["tokens"])
        return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def opening(self) -> dict[str, Any]:
        return self.envelope([self._choice("", None, [])])

    def delta(self, output: StepOutput) -> list[dict[str, Any]]:
        reason = output.sequence.finish_reason.value if output.finished else None  # type: ignore[union-attr]
        if not (output.text or reason):
            self._logprobs += [output.logprobs] if output.logprobs is not None else []
            return []
        return [self.envelope([self._choice(output.text, reason, [output])])]

    def whole_choice(self, outputs: list[StepOutput]) -> dict[str, Any]:
        text = "".join(output.text for output in outputs)
        reason = outputs[-1].sequence.finish_reason.value  # type: ignore[union-attr]
        return self._choice(text, reason, outputs)
