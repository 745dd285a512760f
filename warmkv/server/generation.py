"""One request's run through the engine: timing, usage numbers, and its log record.

A request asking for n choices runs n sequences. The first is submitted alone; the others follow once it
has produced its first token, so they find the prompt's KV in the prefix cache instead of computing it
n times. Their outputs are merged into one stream, each output's choice told by `choice_of`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

from warmkv.cache.miss_reasons import MissReason, explain_miss
from warmkv.chat.anchors import MessageSpan
from warmkv.engine.async_engine import AsyncEngine
from warmkv.engine.llm_engine import StepOutput
from warmkv.engine.sampling import SEED_RANGE, SamplingParams
from warmkv.engine.sequence import Sequence
from warmkv.server.metrics import ServerMetrics
from warmkv.server.request_log import RequestLog, RequestRecord


class Generation:
    def __init__(
        self,
        engine: AsyncEngine,
        record: RequestRecord,
        prompt_ids: list[int],
        params: SamplingParams,
        cache_namespace: str,
        spans: list[MessageSpan] | None = None,
        breakpoints: tuple[int, ...] = (),
        n: int = 1,
    ) -> None:
        self.record = record
        self.n = n
        record.prompt_tokens = len(prompt_ids)
        self._explain = lambda seq: self._miss(engine, prompt_ids, seq, spans or [])
        # message ends, and the offsets a client marked for caching: reused to the exact token (the
        # last breakpoint's blocks are also evicted last)
        anchors = tuple(sorted({span.end for span in spans or []} | set(breakpoints)))
        self._request_ids = [record.id, *(f"{record.id}-{i}" for i in range(1, n))]
        self._submit = lambda i: engine.generate(
            prompt_ids, _choice_params(params, i), self._request_ids[i], cache_namespace, anchors,
            max(breakpoints, default=0)
        )
        self._completion_tokens = [0] * n
        self._started = time.perf_counter()
        self._first_at: float | None = None
        self._unexplained: Sequence | None = None  # the first output's, until its miss is explained
        self._outputs: AsyncIterator[StepOutput] | None = None

    def __aiter__(self) -> AsyncIterator[StepOutput]:
        assert self._outputs is not None, "first() submits the request"
        return self._outputs

    def choice_of(self, output: StepOutput) -> int:
        return self._request_ids.index(output.sequence.request_id)

    async def first(self) -> StepOutput:
        """Submit and wait for the first output: refusals and failures surface here, while an HTTP status
        can still say so."""
        streams = [self._tracked(0, self._submit(0))]
        first = await anext(streams[0])
        try:
            streams += [self._tracked(i, self._submit(i)) for i in range(1, self.n)]
        except BaseException:
            for stream in streams:
                await stream.aclose()  # cancels the choices already running
            raise
        self._outputs = streams[0] if self.n == 1 else _merged(streams)
        return first

    async def _tracked(self, choice: int, outputs: AsyncIterator[StepOutput]) -> AsyncIterator[StepOutput]:
        async for output in outputs:
            first = self._first_at is None
            if first:
                self._first_at = time.perf_counter()
                self.record.ttft_ms = (self._first_at - self._started) * 1000
                self.record.note_cache(output.sequence)
                self._unexplained = output.sequence
            self._completion_tokens[choice] = len(output.sequence.output_ids)
            self.record.completion_tokens = sum(self._completion_tokens)
            if output.finished:
                self.record.note_scheduling(output.sequence)
                self.record.finish_reason = output.sequence.finish_reason.value  # type: ignore[union-attr]
            if output.finished and choice == 0:
                decoded = self._completion_tokens[0] - 1
                elapsed = time.perf_counter() - self._first_at
                self.record.decode_tok_s = decoded / elapsed if decoded > 0 and elapsed > 0 else None
            try:
                yield output
            finally:  # after the first token is out: explaining a miss reads the prompt (milliseconds)
                self.note_miss()

    def note_miss(self) -> None:
        """Explain the miss in the record, once: after the first token is out, at the latest when the
        request is accounted (a client gone before the stream went on)."""
        if self._unexplained is not None:
            sequence, self._unexplained = self._unexplained, None
            self.record.note_miss(self._explain(sequence))

    @staticmethod
    def _miss(
        engine: AsyncEngine, prompt_ids: list[int], seq: Sequence, spans: list[MessageSpan]
    ) -> MissReason | None:
        hit, llm = seq.cache_hit, engine.engine
        if hit is None:
            return None
        tokenizer, block_size = llm.model.tokenizer, llm.pool.block_size
        return explain_miss(prompt_ids, seq.num_cached, hit.stop, hit.stopped_by, hit.nearest, spans,
                            tokenizer, block_size)  # fmt: skip


def _choice_params(params: SamplingParams, choice: int) -> SamplingParams:
    """Choice i samples with seed + i (modulo 2**64, as the generator takes a seed): the choices differ,
    and the same request repeats them all, whatever seed it gives (the largest one too)."""
    if choice == 0 or params.seed is None:
        return params
    seed = params.seed + choice
    return dataclasses.replace(params, seed=seed - 2**64 if seed > SEED_RANGE[1] else seed)


async def _merged(streams: list[AsyncIterator[StepOutput]]) -> AsyncIterator[StepOutput]:
    """The outputs of several streams as they come; leaving early, or a failure, cancels them all."""
    arrivals: asyncio.Queue[StepOutput | BaseException | None] = asyncio.Queue()

    async def pump(stream: AsyncIterator[StepOutput]) -> None:
        try:
            async for output in stream:
                arrivals.put_nowait(output)
            arrivals.put_nowait(None)
        except Exception as err:
            arrivals.put_nowait(err)

    pumps = [asyncio.ensure_future(pump(stream)) for stream in streams]
    try:
        running = len(pumps)
        while running:
            arrival = await arrivals.get()
            if arrival is None:
                running -= 1
            elif isinstance(arrival, BaseException):
                raise arrival
            else:
                yield arrival
    finally:
        for task in pumps:
            task.cancel()


def account(record: RequestRecord, metrics: ServerMetrics, request_log: RequestLog) -> None:
    """Count a finished (or failed) request once, in the metrics and the log."""
    metrics.requests.labels(record.endpoint, str(record.status)).inc()
    if record.status == 200:
        metrics.count_lookup(record.prompt_tokens, record.cache.get("tokens_by_tier", {}))
        metrics.prompt_tokens.inc(record.prompt_tokens)
        metrics.cached_tokens.inc(record.cached_tokens)
        metrics.computed_tokens.inc(record.computed_tokens)
        metrics.completion_tokens.inc(record.completion_tokens)
        if record.ttft_ms is not None:
            metrics.ttft.observe(record.ttft_ms / 1000)
        if record.decode_tok_s is not None:
            metrics.decode_rate.observe(record.decode_tok_s)
        if record.cache.get("load_seconds"):
            metrics.load_bandwidth.observe(record.cache["load_bytes"] / record.cache["load_seconds"])
    request_log.write(record)
