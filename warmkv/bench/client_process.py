"""The replays' client in a process of its own, sending one chat request at a time.

A client in the server's process shares its interpreter lock with the server's threads: reading the first
streamed token waits for the engine thread's Python, and the server's threads wait for the client's, a cost
no user's agent (a process of its own) pays. On the H100's host, the tau-bench trace's median TTFT was 22.98
ms with the client in the benchmark's process against 21.05 ms with it in a process of its own (a timestamp
trace through the embedded server: bench/results/ttft-trace-breakdown-nvidia-h100-80gb-hbm3.json).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from dataclasses import asdict
from types import TracebackType

import httpx

from warmkv.bench.load import Endpoint, RequestResult, send_chat
from warmkv.bench.trace import TraceRequest
from warmkv.errors import WarmkvError


class ClientProcess:
    """`send_chat` run by a child process: each request is written to it as a JSON line, its result read
    back the same way."""

    def __init__(self) -> None:
        self._child = subprocess.Popen(
            [sys.executable, "-m", "warmkv.bench.client_process"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )  # fmt: skip

    @property
    def pid(self) -> int:
        return self._child.pid

    def send(self, endpoint: Endpoint, model: str, request: TraceRequest, turn: int, reply_tokens: int,
             run_started: float, ignore_eos: bool = True) -> RequestResult:  # fmt: skip
        """As send_chat (its arguments, its result), from the child process."""
        started_s = time.perf_counter() - run_started
        order = {"endpoint": asdict(endpoint), "model": model, "request": asdict(request), "turn": turn,
                 "reply_tokens": reply_tokens, "ignore_eos": ignore_eos}  # fmt: skip
        assert self._child.stdin is not None and self._child.stdout is not None
        try:
            self._child.stdin.write(json.dumps(order) + "\n")
            self._child.stdin.flush()
        except BrokenPipeError:
            pass  # the child is gone: the empty read below says so
        answer = self._child.stdout.readline()
        if not answer:
            try:
                status: int | str | None = self._child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                status = "none yet"
            raise WarmkvError(f"the replay's client process stopped (exit status {status})")
        result = RequestResult(**json.loads(answer))
        result.started_s = started_s  # the child's clock started with its request
        return result

    def close(self) -> None:
        if self._child.stdin is not None:
            # a child that stopped cannot take what a failed send left buffered (send said it stopped)
            with contextlib.suppress(BrokenPipeError):
                self._child.stdin.close()
        try:
            self._child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._child.kill()
            self._child.wait()

    def __enter__(self) -> ClientProcess:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def main() -> None:
    results, sys.stdout = sys.stdout, sys.stderr  # stdout carries results alone: any other print goes aside
    with httpx.Client(timeout=httpx.Timeout(600, connect=10)) as http:
        for line in sys.stdin:
            order = json.loads(line)
            result = send_chat(
                http, Endpoint(**order["endpoint"]), order["model"], TraceRequest(**order["request"]),
                order["turn"], order["reply_tokens"], time.perf_counter(), order["ignore_eos"],
            )  # fmt: skip
            print(json.dumps(asdict(result)), file=results, flush=True)


if __name__ == "__main__":
    main()
