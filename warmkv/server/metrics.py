"""Prometheus metrics of one server: request counts, token counts by fate, latency histograms."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from warmkv.cache.tiers.base import TierName, TierStats


class TierCollector(Collector):
    """Per-tier cache numbers, read from the cache at scrape time."""

    def __init__(self, stats: Callable[[], dict[TierName, TierStats]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._stats()
        gauges = {"bytes": "Bytes of KV held", "blocks": "KV blocks held"}
        counters = {
            "hits": "Blocks found in the tier",
            "misses": "Blocks looked for and not found",
            "evictions": "Blocks evicted (demoted to the tier below, if any)",
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


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "warmkv_requests", "Requests by endpoint and status", ["endpoint", "status"], registry=r
        )
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

    def watch_cache(self, stats: Callable[[], dict[TierName, TierStats]]) -> None:
        self.registry.register(TierCollector(stats))
