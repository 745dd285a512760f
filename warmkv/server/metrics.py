"""Prometheus metrics of one server: request counts, token counts by fate, latency histograms."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
