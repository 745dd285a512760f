"""Prometheus metrics of one server: every response by status, request and token counts, prefix-cache hits
and misses per tier (blocks and tokens), latency histograms. The README's "Metrics" table lists them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, ClassVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from warmkv.cache.tiers.base import TierName, TierStats

if TYPE_CHECKING:
    from warmkv.engine.llm_engine import SchedulerStats


class TierCollector(Collector):
    """Per-tier cache numbers, read from the cache at scrape time."""

    def __init__(self, stats: Callable[[], dict[TierName, TierStats]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._stats()
        gauges = {"bytes": "Bytes of KV held", "blocks": "KV blocks held"}
        counters = {  # hits and misses are counted per request, by ServerMetrics.count_lookup
            "evictions": "Blocks evicted (demoted to the tier below, if any)",
            "writes": "Blocks stored in the tier (live: indexed, computed or loaded from a tier below)",
            "skipped_writes": "Writes skipped because the writer's queue was full",
            "corrupt": "Stored blocks that failed verification and were deleted",
        }
        for name, help_text in gauges.items():
            family = GaugeMetricFamily(f"warmkv_cache_{name}", help_text, labels=["tier"])
            for tier, tier_stats in stats.items():
                family.add_metric([tier.value], getattr(tier_stats, name))
            yield family
        up = GaugeMetricFamily(
            "warmkv_cache_tier_up", "1 while the tier serves; 0 while it is off (unwritable, unreachable)",
            labels=["tier"],
        )  # fmt: skip
        for tier, tier_stats in stats.items():
            up.add_metric([tier.value], 1.0 if tier_stats.up else 0.0)
        yield up
        for name, help_text in counters.items():
            family = CounterMetricFamily(f"warmkv_cache_{name}", help_text, labels=["tier"])
            for tier, tier_stats in stats.items():
                family.add_metric([tier.value], getattr(tier_stats, name))
            yield family


class SchedulerCollector(Collector):
    """The scheduler's counters (preemptions, swaps), read from the engine at scrape time."""

    COUNTERS: ClassVar[dict[str, str]] = {
        "preemptions": "Running sequences preempted to make room for older ones",
        "swapped_out_bytes": "KV of preempted sequences copied to the host tier",
        "swapped_in_bytes": "KV of resumed sequences loaded back from the host tier",
        "recomputed_tokens": "Tokens of resumed sequences whose KV was computed a second time",
        "failed_sequences": "Requests failed on their own while the rest of their batch went on",
    }

    def __init__(self, stats: Callable[[], SchedulerStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        stats = self._stats()
        for name, help_text in self.COUNTERS.items():
            yield CounterMetricFamily(f"warmkv_{name}", help_text, value=getattr(stats, name))


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "warmkv_requests", "Generation requests by endpoint and outcome status (499: client gone; "
            "500 mid-stream included)", ["endpoint", "status"], registry=r,
        )  # fmt: skip
        self.responses = Counter(
            "warmkv_http_responses", "Every HTTP response by route and status, as sent (404 and validation "
            "400s included; unknown paths are route=\"unmatched\")", ["route", "status"], registry=r,
        )  # fmt: skip
        tier = ["tier"]
        self.hit_blocks = Counter("warmkv_cache_hits", "Whole KV blocks of prompts served by the tier",
                                  tier, registry=r)  # fmt: skip
        self.miss_blocks = Counter("warmkv_cache_misses", "Whole KV blocks of prompts looked for in the tier "
                                   "and not served by it", tier, registry=r)  # fmt: skip
        self.hit_tokens = Counter("warmkv_cache_hit_tokens", "Prompt tokens served by the tier", tier,
                                  registry=r)  # fmt: skip
        self.miss_tokens = Counter("warmkv_cache_miss_tokens", "Prompt tokens looked for in the tier and not "
                                   "served by it", tier, registry=r)  # fmt: skip
        self._tiers: list[TierName] = []  # none until watch_cache: a server without a prefix cache
        self._block_size = 1
        self.prompt_tokens = Counter("warmkv_prompt_tokens", "Prompt tokens received", registry=r)
        self.cached_tokens = Counter("warmkv_cached_tokens", "Prompt tokens whose KV was reused", registry=r)
        self.computed_tokens = Counter("warmkv_computed_tokens", "Prompt tokens computed", registry=r)
        self.completion_tokens = Counter("warmkv_completion_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "warmkv_time_to_first_token_seconds",
            "Time from request to first token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.decode_rate = Histogram(
            "warmkv_decode_tokens_per_second",
            "Decode speed of each request after its first token",
            buckets=(1, 5, 10, 25, 50, 100, 200, 400, 800),
            registry=r,
        )
        self.pending = Gauge("warmkv_pending_requests", "Requests submitted and not finished", registry=r)
        self.load_bandwidth = Histogram(
            "warmkv_cache_load_bytes_per_second",
            "Bandwidth of each lower-tier load into the pool",
            buckets=(1e8, 3e8, 1e9, 3e9, 1e10, 3e10, 1e11),
            registry=r,
        )

    def watch_cache(self, stats: Callable[[], dict[TierName, TierStats]], block_size: int) -> None:
        self.registry.register(TierCollector(stats))
        self._block_size = block_size
        self._tiers = list(stats())  # the lookup order: live first, then each tier below
        for tier in self._tiers:  # present from the first scrape, at zero
            for counter in (self.hit_blocks, self.miss_blocks, self.hit_tokens, self.miss_tokens):
                counter.labels(tier.value)

    def count_lookup(self, prompt_tokens: int, tokens_by_tier: dict[str, int]) -> None:
        """One served prompt's lookup: each tier is asked for what the tiers above it did not serve, so a
        token no tier held is a miss at every tier."""
        looked_for = prompt_tokens
        for tier in self._tiers:
            served = min(tokens_by_tier.get(tier.value, 0), looked_for)
            self.hit_tokens.labels(tier.value).inc(served)
            self.miss_tokens.labels(tier.value).inc(looked_for - served)
            size = self._block_size
            self.hit_blocks.labels(tier.value).inc(served // size)
            self.miss_blocks.labels(tier.value).inc(looked_for // size - served // size)
            looked_for -= served

    def watch_scheduler(self, stats: Callable[[], SchedulerStats]) -> None:
        self.registry.register(SchedulerCollector(stats))


class ResponseCounter:
    """ASGI middleware counting every response by route and status as it starts (validation and routing
    errors never reach a handler, so they are counted here)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = scope.get("route")  # set in this same scope by the router on a match
                path = getattr(route, "path", "unmatched")  # never the raw path: bounded label values
                self.metrics.responses.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
