"""The cache policies `warmkv bench replay` compares, each as the `warmkv serve` flags that produce it on
our engine (so any row can be reproduced by hand)."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(slots=True, frozen=True)
class Capacities:
    pool_tokens: int  # the GPU tier (the engine's KV pool): smaller than the working set
    host_tokens: int
    checkpoint_align: int
    checkpoint_interval: int

    def times(self, n: int) -> Capacities:
        """The memory of n servers with these capacities, on one."""
        return replace(self, pool_tokens=self.pool_tokens * n, host_tokens=self.host_tokens * n)


@dataclass(slots=True, frozen=True)
class Policy:
    name: str
    description: str
    flags: tuple[str, ...]


def policies(caps: Capacities) -> dict[str, Policy]:
    host = ("--host-cache-tokens", str(caps.host_tokens))
    gpu_only = ("--host-cache-tokens", "0", "--no-disk-cache")
    text_keyed = ("--no-stable-tokens", "--no-predictive-prefill")  # whole-text tokenisation, nothing more
    checkpoints = ("--hit-policy", "checkpoints", "--checkpoint-align", str(caps.checkpoint_align),
                   "--checkpoint-interval", str(caps.checkpoint_interval))  # fmt: skip
    units = ("--hit-policy", "units")
    write_through = ("--kv-disk-write", "through")
    rows = [
        Policy("no_cache", "every prompt computed in full", ("--no-prefix-cache",)),
        Policy("gpu_lru", "GPU-only LRU of token blocks (vLLM prefix caching)", (*gpu_only, *text_keyed)),
        Policy("ds4", "cold anchor + interval checkpoints, no refresh", (*checkpoints, *host, *text_keyed)),
        Policy("deepseek_units", "DeepSeek-API-style 64-token units", (*units, *host, *text_keyed)),
        Policy("warmkv", "warmkv: every tier and feature", host),
        Policy("warmkv_no_host", "warmkv without the host RAM tier", ("--host-cache-tokens", "0")),
        Policy("warmkv_no_disk", "warmkv without the disk tier", (*host, "--no-disk-cache")),
        Policy("warmkv_write_through", "warmkv writing each block to disk at once", (*host, *write_through)),
        Policy("warmkv_no_stable_tokens", "warmkv tokenising whole texts", (*host, "--no-stable-tokens")),
        Policy("warmkv_gpu_only", "warmkv with the GPU tier alone", gpu_only),
    ]
    return {p.name: p for p in rows}


DEFAULT_POLICIES = ("no_cache", "gpu_lru", "ds4", "deepseek_units", "warmkv")


@dataclass(slots=True, frozen=True)
class ClusterVariant:
    name: str
    description: str
    routed: bool  # through `warmkv router`; else round-robin over the replicas
    shared: bool  # with the shared Redis tier


def cluster_variants(replicas: int) -> list[ClusterVariant]:
    """The rows of warmkv on N replicas: round-robin or routed, each with and without the shared tier."""
    variants = []
    for routed in (False, True):
        for shared in (False, True):
            name = f"{replicas}x_{'router' if routed else 'round_robin'}{'_shared' if shared else ''}"
            how = f"warmkv on {replicas} replicas, {'routed' if routed else 'round-robin'}"
            variants.append(
                ClusterVariant(name, how + (", shared Redis tier" if shared else ""), routed, shared)
            )
    return variants
