"""One record per request: a log line for people, a JSON line for tools (--trace FILE)."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from warmkv.cache.miss_reasons import MissReason
from warmkv.engine.sequence import Sequence

log = logging.getLogger("warmkv.server")


@dataclass(slots=True)
class RequestRecord:
    id: str
    endpoint: str
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cache_source: str = "none"  # where the cached tokens came from: "none", "live:32+disk:64", ...
    cache: dict[str, Any] = field(default_factory=dict)  # the cache decision, for the trace
    completion_tokens: int = 0
    ttft_ms: float | None = None
    decode_tok_s: float | None = None
    finish_reason: str | None = None
    status: int = 200
    preemptions: int = 0  # times the scheduler took its KV back for older sequences
    swapped_bytes: int = 0  # of its KV, copied to the host tier and back
    recomputed_tokens: int = 0  # tokens computed again after a preemption

    def note_cache(self, sequence: Sequence) -> None:
        hit = sequence.cache_hit
        self.cached_tokens = sequence.num_cached
        if hit is None:
            return
        self.cache_source = hit.source
        self.cache = {
            "tokens_by_tier": {tier.value: n for tier, n in hit.tokens_by_tier.items()},
            "stopped_by": hit.stopped_by,
            "load_bytes": hit.load_bytes,
            "load_seconds": round(hit.load_seconds, 6),
            "miss": None,
        }

    def note_miss(self, miss: MissReason | None) -> None:
        """Why the rest of the prompt was computed, once known (worked out after the first token is out)."""
        if self.cache and miss is not None:  # empty: no lookup was made
            self.cache["miss"] = miss.to_json()

    def note_scheduling(self, sequence: Sequence) -> None:
        self.preemptions = sequence.preemptions
        self.swapped_bytes = sequence.swapped_out_bytes + sequence.swapped_in_bytes
        self.recomputed_tokens = sequence.num_recomputed

    @property
    def computed_tokens(self) -> int:
        # a refused request (400, 404, 429, ...) computed nothing; 499: the client left mid-way
        refused = 400 <= self.status < 500 and self.status != 499
        return 0 if refused else self.prompt_tokens - self.cached_tokens

    def line(self) -> str:
        ttft = f"{self.ttft_ms:.1f}ms" if self.ttft_ms is not None else "-"
        rate = f"{self.decode_tok_s:.1f} tok/s" if self.decode_tok_s is not None else "-"
        return (
            f"{self.id} {self.endpoint} status={self.status} prompt={self.prompt_tokens} "
            f"cached={self.cached_tokens} ({self.cache_source}) computed={self.computed_tokens} "
            f"completion={self.completion_tokens} ttft={ttft} decode={rate} finish={self.finish_reason}"
            + (
                f" preempted={self.preemptions} swapped={self.swapped_bytes / 1e6:.1f}MB "
                f"recomputed={self.recomputed_tokens}"
                if self.preemptions
                else ""
            )
            + (f" miss: {self.miss_summary()}" if self.cache.get("miss") else "")
        )

    def miss_summary(self) -> str:
        """The miss reason without prompt text: excerpts of what changed are logged at debug level only."""
        miss = self.cache["miss"]
        if miss["request_excerpt"] is None:
            return str(miss["text"])
        where = f"{miss['role']} message #{miss['message_index']}" if miss["role"] else "the prompt"
        return f"{where} changed; recomputed from token {miss['token']} (excerpts at --log-level debug)"


class RequestLog:
    def __init__(self, trace_path: Path | None) -> None:
        self._trace = trace_path.open("a", encoding="utf-8") if trace_path else None
        self._lock = threading.Lock()

    def write(self, record: RequestRecord) -> None:
        log.info(record.line())
        if record.cache.get("miss") and record.cache["miss"]["request_excerpt"] is not None:
            log.debug("%s miss: %s", record.id, record.cache["miss"]["text"])  # quotes the prompt
        if self._trace is None:
            return
        entry = {"time": time.time(), **asdict(record), "computed_tokens": record.computed_tokens}
        with self._lock:
            self._trace.write(json.dumps(entry) + "\n")
            self._trace.flush()

    def close(self) -> None:
        if self._trace is not None:
            self._trace.close()
