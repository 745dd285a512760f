"""Helper processes of the benchmarks (redis-server, the router, peer servers): waiting until one is
ready, stopping one as an operator would."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

from warmkv.errors import WarmkvError


def wait_ready(process: subprocess.Popen, ready: Callable[[], bool], what: str, timeout_s: float,
               poll_s: float = 0.05) -> None:  # fmt: skip
    """Wait until `ready()` says the process answers; an error naming `what` if it exits first or the
    time runs out."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline or process.poll() is not None:
            raise WarmkvError(f"{what} did not start")
        time.sleep(poll_s)


def terminate(process: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM, then SIGKILL after `grace_s`."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
