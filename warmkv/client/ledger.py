"""One record per request and warm-up, written as JSON lines: the input of `warmkv report`."""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(slots=True, frozen=True)
class Prices:
    """US dollars per million tokens."""

    input: float
    cached_input: float
    output: float = 0.0

    def saved(self, cached_tokens: int) -> float:
        return cached_tokens * (self.input - self.cached_input) / 1e6

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        computed = (prompt_tokens - cached_tokens) * self.input
        return (computed + cached_tokens * self.cached_input + completion_tokens * self.output) / 1e6


@dataclass(slots=True, frozen=True)
class TurnRecord:
    time: float
    conversation: str
    turn: int
    kind: str  # "request" or "warmup"
    model: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reason: str
    latency_s: float
    warmup_benefit_tokens: int | None = None  # cached tokens a preceding warm-up added to this request
    cost_saved: float | None = None
    cost: float | None = None

    @property
    def hit_fraction(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class CacheLog:
    """Appends records to a JSON-lines file (thread-safe) and keeps them in memory."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self.records: list[TurnRecord] = []
        self._lock = threading.Lock()

    def append(self, record: TurnRecord) -> None:
        with self._lock:
            self.records.append(record)
            if self.path:
                with self.path.open("a") as f:
                    f.write(json.dumps(asdict(record)) + "\n")


def read_log(path: Path) -> list[TurnRecord]:
    return [TurnRecord(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
