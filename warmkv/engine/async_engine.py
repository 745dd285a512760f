"""The engine on its own thread, fed from asyncio.

The step loop owns the engine: requests and cancellations reach it as commands, and outputs go back to
each request's asyncio queue. So the event loop never waits for a forward pass, and no two threads ever
touch the KV pool at once.

A request's own failure (bad parameters, its prefix load, its forward or sampling) fails that request only.
Anything else escaping the engine (a scheduler bug: its state can no longer be trusted) stops the thread
for good: every pending and later request gets an error, `failure` says why, and `on_failure` tells the
server, which reports it on /health and exits.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from warmkv.engine.llm_engine import LLMEngine, StepOutput, work_on
from warmkv.engine.sampling import SamplingParams
from warmkv.engine.sequence import Sequence
from warmkv.errors import EngineFailure, EngineStopped, QueueFull, WarmkvError

# quiet this long before idle-time disk writes start: a client's next request right after a reply is not
# idle time, an agent's tool call is
IDLE_WRITE_DELAY_S = 0.5

log = logging.getLogger("warmkv.engine")

_Outputs = asyncio.Queue[StepOutput | BaseException]  # one request's outputs, read on its event loop
_Delivery = tuple[_Outputs, StepOutput | BaseException]


@dataclass(slots=True)
class _Submit:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str
    cache_namespace: str
    anchors: tuple[int, ...]
    cache_breakpoint: int
    loop: asyncio.AbstractEventLoop
    outputs: _Outputs


@dataclass(slots=True)
class _Abort:
    request_id: str


@dataclass(slots=True)
class _Prefill:
    prompt_ids: list[int]
    cache_namespace: str


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_pending: int = 256) -> None:
        self.engine = engine
        self.max_pending = max_pending
        self._commands: queue.SimpleQueue[_Submit | _Abort | _Prefill | None] = queue.SimpleQueue()
        self._requests: dict[str, tuple[Sequence, _Submit]] = {}
        self._pending = 0  # submitted and not yet finished; read from the event loop
        self.failure: str | None = None  # why the engine thread died, once it has
        self.on_failure: Callable[[str], None] = lambda reason: None  # called on the engine thread
        # a submit either sees `failure` or is failed by the dying thread, never left in the queue
        self._submitting = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="warmkv-engine", daemon=True)
        self._thread.start()

    @property
    def num_pending(self) -> int:
        return self._pending

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, cache_namespace: str = "",
        anchors: tuple[int, ...] = (), cache_breakpoint: int = 0,
    ) -> AsyncIterator[StepOutput]:  # fmt: skip
        """Outputs of one request. Refusals (too long, queue full) raise here, before anything is queued;
        leaving the iteration early (client gone) cancels the request."""
        self.engine.check_fits(len(prompt_ids), params.max_tokens)
        if self._pending >= self.max_pending:
            raise QueueFull(f"the server is at its limit of {self.max_pending} pending requests; retry later")
        outputs: _Outputs = asyncio.Queue()
        loop = asyncio.get_running_loop()
        with self._submitting:
            if self.failure is not None:
                raise EngineStopped(self.failure)
            self._pending += 1
            submit = _Submit(
                prompt_ids, params, request_id, cache_namespace, anchors, cache_breakpoint, loop, outputs
            )
            self._commands.put(submit)
        return self._outputs(request_id, outputs)

    async def _outputs(
        self, request_id: str, outputs: _Outputs
    ) -> AsyncIterator[StepOutput]:
        finished = False
        try:
            while True:
                output = await outputs.get()
                if isinstance(output, BaseException):
                    finished = True  # the engine already dropped it
                    raise output
                if output.finished:
                    finished = True
                    break
                yield output
        finally:
            # runs before the last output is handed over: a caller that stops reading there leaks nothing
            self._pending -= 1
            if not finished:
                self._commands.put(_Abort(request_id))
        yield output

    def prefill_when_idle(self, prompt_ids: list[int], cache_namespace: str = "") -> None:
        """Cache a prompt's KV in idle time; it yields to every request and is dropped if it does not fit."""
        self._commands.put(_Prefill(prompt_ids, cache_namespace))

    def shutdown(self) -> None:
        """Cancel what is still running, stop the step loop, and flush the cache to disk."""
        self._commands.put(None)
        self._thread.join(timeout=30)
        self.engine.close()

    # -- the engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            work_on(self.engine.model.device)
            self._loop()
        except BaseException as err:  # whatever it is, it must not leave requests hanging
            self._die(err)

    def _die(self, err: BaseException) -> None:
        log.critical("the engine thread died; no request can be served", exc_info=err)
        with self._submitting:
            self.failure = f"the engine stopped: {type(err).__name__}: {err}"
        stopped = EngineStopped(self.failure)
        self._fail_all(stopped, abort=False)  # the engine's own state is not to be trusted any more
        while True:  # what was submitted and not yet applied
            try:
                command = self._commands.get(block=False)
            except queue.Empty:
                break
            if isinstance(command, _Submit):
                command.loop.call_soon_threadsafe(command.outputs.put_nowait, stopped)
        self.on_failure(self.failure)

    def _loop(self) -> None:
        busy_until = time.monotonic()
        while True:
            # block only when idle, and then only until idle-time disk writes are due; a busy engine drains
            # the commands between steps
            wait, timeout = not self.engine.has_work, None
            if wait:
                due = busy_until + IDLE_WRITE_DELAY_S - time.monotonic()
                timeout = due if due > 0 else self._write_idle()
                wait = timeout != 0
            while True:
                try:
                    command = self._commands.get(block=wait, timeout=timeout)
                except queue.Empty:
                    break
                if command is None:
                    return self._abort_all()
                self._apply(command)
                wait = False
            if self.engine.has_work:
                self._step()
                busy_until = time.monotonic()

    def _write_idle(self) -> float | None:
        """Idle-time disk writes are optional: a failure is logged, never worth the engine thread."""
        try:
            return self.engine.write_idle()
        except Exception as err:
            log.warning("idle-time disk writes stopped until the next idle time: %s", err)
            return None

    def _apply(self, command: _Submit | _Abort | _Prefill) -> None:
        if isinstance(command, _Prefill):
            try:
                self.engine.add_request(
                    command.prompt_ids, SamplingParams(max_tokens=0), cache_namespace=command.cache_namespace,
                    background=True,
                )  # fmt: skip
            except Exception as err:  # idle-time work is optional: never worth a request, or the thread
                log.info("idle-time prefill skipped: %s", err)
            return
        if isinstance(command, _Abort):
            entry = self._requests.pop(command.request_id, None)
            if entry is not None:
                self.engine.abort(entry[0])
            return
        try:
            sequence = self.engine.add_request(
                command.prompt_ids, command.params, command.request_id, command.cache_namespace,
                anchors=command.anchors, cache_breakpoint=command.cache_breakpoint,
            )  # fmt: skip
        except Exception as err:  # this request's own problem: it alone is refused
            error = err if isinstance(err, WarmkvError) else EngineFailure(f"{type(err).__name__}: {err}")
            command.loop.call_soon_threadsafe(command.outputs.put_nowait, error)
            return
        self._requests[command.request_id] = (sequence, command)

    def _step(self) -> None:
        # a step's outputs go to each event loop in one call: every call_soon_threadsafe wakes the loop
        # through a socket and gives up the interpreter lock, which the engine's thread then waits to get
        # back from the loop it just woke (a step of 50 streams waited 50 times)
        deliveries: dict[asyncio.AbstractEventLoop, list[_Delivery]] = {}
        finished = []
        for output in self.engine.step():
            entry = self._requests.get(output.sequence.request_id)
            if entry is None:
                continue
            if output.finished:
                finished.append(output.sequence.request_id)
            submit = entry[1]
            message = output if output.error is None else output.error
            deliveries.setdefault(submit.loop, []).append((submit.outputs, message))
        for loop, messages in deliveries.items():
            loop.call_soon_threadsafe(_deliver, messages)
        for request_id in finished:  # only once delivered: should a delivery fail, _die still fails them
            del self._requests[request_id]

    def _fail_all(self, error: BaseException, abort: bool = True) -> None:
        for sequence, submit in self._requests.values():
            if abort:
                self.engine.abort(sequence)
            submit.loop.call_soon_threadsafe(submit.outputs.put_nowait, error)
        self._requests.clear()

    def _abort_all(self) -> None:
        self._fail_all(EngineFailure("the server is shutting down"))


def _deliver(messages: list[_Delivery]) -> None:
    """On the event loop: a step's outputs into their requests' queues, in the step's order."""
    for outputs, message in messages:
        outputs.put_nowait(message)
