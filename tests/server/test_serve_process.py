"""`warmkv serve` as a user runs it: a separate process, stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from warmkv.server.embedded import free_port

from ..conftest import REPO_ROOT

MODEL = "SmolLM2-135M-Instruct"
# a loaded 2-core machine may need minutes for a first start (GGUF conversion, calibration); a process
# that exits is reported at once, so a generous deadline costs nothing when something is wrong
START_DEADLINE_S = float(os.environ.get("WARMKV_TEST_START_DEADLINE_S", "900"))


@dataclass
class ServeProcess:
    process: subprocess.Popen
    url: str
    log: Path  # stdout and stderr: a file, never a pipe nobody reads (a full pipe would stall the server)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> str:
        """SIGTERM, wait for the graceful shutdown, and return everything the server wrote."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=120)
        return self.output()


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Starts `warmkv serve` processes; every one is killed at teardown, whatever the test did."""
    started: list[ServeProcess] = []

    def start(*flags: str) -> ServeProcess:
        port = free_port()
        log = tmp_path / f"serve-{len(started)}.log"
        # this checkout's code, whatever the environment's install points at
        path = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
        env = {**os.environ, "PYTHONPATH": path}
        with log.open("w") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "warmkv", "serve", "--port", str(port), "--kv-pool-tokens", "4096",
                 *flags],
                stdout=sink, stderr=subprocess.STDOUT, text=True, env=env,
                start_new_session=True,  # its own process group: teardown kills whatever it started
            )  # fmt: skip
        running = ServeProcess(process, f"http://127.0.0.1:{port}", log)
        started.append(running)
        _wait_until_healthy(running)
        return running

    yield start
    for running in started:
        if running.process.poll() is None:
            os.killpg(running.process.pid, signal.SIGKILL)
            running.process.wait(timeout=60)


def _wait_until_healthy(running: ServeProcess) -> None:
    deadline = time.monotonic() + START_DEADLINE_S
    while True:
        if running.process.poll() is not None:
            pytest.fail(f"warmkv serve exited with {running.process.returncode}:\n{running.output()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no /health within {START_DEADLINE_S:.0f} s:\n{running.output()[-4000:]}")
        try:
            if httpx.get(f"{running.url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight_then_exits(
    launch: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:")
    server = launch("--chat-template", str(template))
    url = server.url
    result: dict = {}

    def long_request() -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to fifty."}],
                "max_tokens": 40, "ignore_eos": True, "temperature": 0}  # fmt: skip
        result["response"] = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)

    worker = threading.Thread(target=long_request)
    worker.start()
    time.sleep(1.0)  # the request is being served
    output = server.stop()
    worker.join(120)
    # uvicorn re-raises the signal once shutdown is complete, so the exit status says SIGTERM
    assert server.process.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output
    response = result["response"]
    assert response.status_code == 200, output
    usage = response.json()["usage"]
    assert usage["completion_tokens"] == 40
    # "user: Count to fifty.\nassistant:" rendered by the override, not SmolLM2's ChatML template
    assert usage["prompt_tokens"] < 15
    assert "prompt=" in output and "cached=" in output  # the per-request log line


@pytest.mark.slow
def test_restart_reuses_prefix_from_disk(launch: Callable[..., ServeProcess], tmp_path: Path) -> None:
    kv_dir = tmp_path / "kv"
    history = [
        {"role": "system", "content": "You are a meticulous assistant for a coding agent. " * 12},
        {"role": "user", "content": "List the files you would read first."},
    ]
    body = {"model": MODEL, "max_tokens": 8, "temperature": 0}
    server = launch("--kv-dir", str(kv_dir))
    first = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "messages": history}, timeout=60)
    server.stop()
    first = first.json()

    history += [
        {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
        {"role": "user", "content": "Now read them."},
    ]
    server = launch("--kv-dir", str(kv_dir), "--trace", str(tmp_path / "trace.jsonl"))
    second = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "messages": history}, timeout=60)
    output = server.stop()
    second = second.json()
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= first["usage"]["prompt_tokens"] - 16, output  # all but the last partial block
    assert second["usage"]["prompt_cache_miss_tokens"] == second["usage"]["prompt_tokens"] - cached
    trace = (tmp_path / "trace.jsonl").read_text()
    assert '"cache_source": "disk:' in trace, trace
    miss = json.loads(trace.splitlines()[-1])["cache"]["miss"]  # the prompt's start came from disk
    assert miss["kind"] == "new tokens" and "no earlier request" not in miss["text"], miss
