"""`warmkv report LOG`: per-turn hit rate, tokens and money saved, and why each turn missed."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from warmkv.client.ledger import Prices, TurnRecord, read_log


def _money(value: float | None) -> str:
    return "-" if value is None else f"${value:.4f}"


def report(path: Path, prices: Prices | None = None) -> list[str]:
    records = read_log(path)
    saved = (lambda r: prices.saved(r.cached_tokens)) if prices else (lambda r: r.cost_saved)
    lines = [f"{'conversation':16} {'turn':>4} {'kind':7} {'prompt':>7} {'cached':>7} {'hit':>5} "
             f"{'saved':>9}  why not more"]  # fmt: skip
    by_conversation: dict[str, list[TurnRecord]] = defaultdict(list)
    for r in records:
        by_conversation[r.conversation].append(r)
        why = "" if r.kind == "warmup" else r.reason
        if r.warmup_benefit_tokens:
            why += f" (+{r.warmup_benefit_tokens} cached thanks to warm-up)"
        hit = f"{100 * r.hit_fraction:>4.0f}%"
        lines.append(f"{r.conversation[-16:]:16} {r.turn:>4} {r.kind:7} {r.prompt_tokens:>7} "
                     f"{r.cached_tokens:>7} {hit} {_money(saved(r)):>9}  {why}")  # fmt: skip
    lines.append("")
    for name, group in [*by_conversation.items(), ("all", records)]:
        requests = [r for r in group if r.kind == "request"]
        warmups = [r for r in group if r.kind == "warmup"]
        prompt = sum(r.prompt_tokens for r in requests)
        cached = sum(r.cached_tokens for r in requests)
        money = [saved(r) for r in requests]
        warm_cost = [prices.cost(r.prompt_tokens, r.cached_tokens, r.completion_tokens) if prices else r.cost
                     for r in warmups]  # fmt: skip
        total = f"${sum(money):.4f} saved" if money and None not in money else ""
        if warmups and None not in warm_cost:
            total += f", warm-ups cost ${sum(warm_cost):.4f}"  # type: ignore[arg-type]
        share = 100 * cached / prompt if prompt else 0.0
        lines.append(f"{name}: {len(requests)} requests, {len(warmups)} warm-ups; {cached} of {prompt} "
                     f"prompt tokens cached ({share:.1f}%) {total}".rstrip())  # fmt: skip
    return lines
