"""`warmkv serve` as a user runs it: a separate process, stopped with SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from warmkv.server.embedded import free_port

MODEL = "SmolLM2-135M-Instruct"


def launch(*flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "warmkv.cli",
            "serve",
            "--port",
            str(port),
            "--kv-pool-tokens",
            "4096",
            *flags,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        assert time.monotonic() < deadline, "server did not come up"
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight_then_exits(tmp_path: Path) -> None:
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:")
    process, url = launch("--chat-template", str(template))
    result: dict = {}

    def long_request() -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to fifty."}],
                "max_tokens": 40, "ignore_eos": True, "temperature": 0}  # fmt: skip
        result["response"] = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)

    worker = threading.Thread(target=long_request)
    worker.start()
    time.sleep(1.0)  # the request is being served
    process.send_signal(signal.SIGTERM)
    worker.join(120)
    output, _ = process.communicate(timeout=60)
    # uvicorn re-raises the signal once shutdown is complete, so the exit status says SIGTERM
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output
    response = result["response"]
    assert response.status_code == 200, output
    usage = response.json()["usage"]
    assert usage["completion_tokens"] == 40
    # "user: Count to fifty.\nassistant:" rendered by the override, not SmolLM2's ChatML template
    assert usage["prompt_tokens"] < 15
    assert "prompt=" in output and "cached=" in output  # the per-request log line


def stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    return output


@pytest.mark.slow
def test_restart_reuses_prefix_from_disk(tmp_path: Path) -> None:
    kv_dir = tmp_path / "kv"
    history = [
        {"role": "system", "content": "You are a meticulous assistant for a coding agent. " * 12},
        {"role": "user", "content": "List the files you would read first."},
    ]
    body = {"model": MODEL, "max_tokens": 8, "temperature": 0}
    process, url = launch("--kv-dir", str(kv_dir))
    first = httpx.post(f"{url}/v1/chat/completions", json={**body, "messages": history}, timeout=60).json()
    stop(process)

    history += [
        {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
        {"role": "user", "content": "Now read them."},
    ]
    process, url = launch("--kv-dir", str(kv_dir), "--trace", str(tmp_path / "trace.jsonl"))
    second = httpx.post(f"{url}/v1/chat/completions", json={**body, "messages": history}, timeout=60).json()
    output = stop(process)
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= first["usage"]["prompt_tokens"] - 16, output  # all but the last partial block
    assert second["usage"]["prompt_cache_miss_tokens"] == second["usage"]["prompt_tokens"] - cached
    trace = (tmp_path / "trace.jsonl").read_text()
    assert '"cache_source": "disk:' in trace, trace
