"""A throw-away redis-server on a loopback port, for benchmarks and tests of the shared tier."""

from __future__ import annotations

import shutil
import socket
import subprocess

import redis

from warmkv.bench.processes import wait_ready
from warmkv.errors import WarmkvError


class RedisProcess:
    """No persistence; stop() kills it as a crash would."""

    def __init__(self, *options: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise WarmkvError("redis-server is not installed (Debian: apt-get install redis-server)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             *options],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        self.client = redis.Redis.from_url(self.url)
        try:
            wait_ready(self.process, self._answers, "redis-server", timeout_s=10)
        except WarmkvError:
            self.stop()
            raise

    def _answers(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
