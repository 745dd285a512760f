"""Replay results: totals per policy against the oracle, the terminal table, JSON and plots."""

from __future__ import annotations

import importlib.util
import json
import statistics
from dataclasses import asdict
from itertools import accumulate
from pathlib import Path
from typing import Any

from warmkv.bench.replay import TurnResult


def summarize(turns: list[TurnResult], oracle: list[int]) -> dict[str, Any]:
    prompt = sum(t.prompt_tokens for t in turns)
    cached = sum(t.cached_tokens for t in turns)
    reusable = sum(oracle)
    ttfts = sorted(t.ttft_s for t in turns)
    shapes = sorted({t.shape for t in turns})
    pairs = list(zip(turns, oracle, strict=True))
    return {
        "requests": len(turns),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "oracle_tokens": reusable,
        "computed_tokens": prompt - cached,
        "hit_rate": cached / prompt if prompt else 0.0,
        "efficiency": cached / reusable if reusable else 1.0,
        "ttft_mean_s": statistics.fmean(ttfts),
        "ttft_p50_s": ttfts[len(ttfts) // 2],
        "ttft_p90_s": ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.9))],
        "efficiency_by_shape": {
            shape: _ratio([t.cached_tokens for t, _ in pairs if t.shape == shape],
                          [o for t, o in pairs if t.shape == shape])
            for shape in shapes
        },
        "turns": [
            asdict(t) | {"oracle_tokens": o, "computed_tokens": t.prompt_tokens - t.cached_tokens}
            for t, o in pairs
        ],
    }


def oracle_row(prompts: list[int], oracle: list[int]) -> dict[str, Any]:
    total = sum(prompts)
    return {"requests": len(prompts), "prompt_tokens": total, "cached_tokens": sum(oracle),
            "oracle_tokens": sum(oracle), "computed_tokens": total - sum(oracle),
            "hit_rate": sum(oracle) / total if total else 0.0, "efficiency": 1.0}  # fmt: skip


def _ratio(cached: list[int], oracle: list[int]) -> float:
    return sum(cached) / sum(oracle) if sum(oracle) else 1.0


def table(rows: dict[str, dict[str, Any]]) -> list[str]:
    head = f"{'policy':24} {'prompt':>8} {'cached':>8} {'oracle':>8} {'computed':>9} {'hit':>6} {'eff':>6} " \
           f"{'TTFT mean':>10} {'p50':>8} {'p90':>8}"  # fmt: skip
    lines = [head]
    for name, row in rows.items():
        times = [_ms(row.get(k)) for k in ("ttft_mean_s", "ttft_p50_s", "ttft_p90_s")]
        tokens = f"{row['prompt_tokens']:>8} {row['cached_tokens']:>8} {row['oracle_tokens']:>8}"
        lines.append(f"{name:24} {tokens} {row['computed_tokens']:>9} {row['hit_rate']:>6.1%} "
                     f"{row['efficiency']:>6.1%} {times[0]:>10} {times[1]:>8} {times[2]:>8}")  # fmt: skip
    return lines


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def plots_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def plot(rows: dict[str, dict[str, Any]], stem: Path) -> list[Path]:
    """Per-turn TTFT and cumulative computed tokens per policy, as PNG (matplotlib: [bench] extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {name: row["turns"] for name, row in rows.items() if "turns" in row}
    if not runs:
        return []
    first = next(iter(runs.values()))
    x = [t["index"] for t in first]
    curves = {
        "ttft": ("TTFT (ms)", {n: [t["ttft_s"] * 1000 for t in turns] for n, turns in runs.items()}),
        "computed": ("cumulative computed prompt tokens", {
            **{n: list(accumulate(t["computed_tokens"] for t in turns)) for n, turns in runs.items()},
            "oracle": list(accumulate(t["prompt_tokens"] - t["oracle_tokens"] for t in first)),
        }),
    }  # fmt: skip
    written = []
    for kind, (ylabel, series) in curves.items():
        fig, ax = plt.subplots(figsize=(10, 5))
        for name, ys in series.items():
            ax.plot(x, ys, "k--" if name == "oracle" else ".-", label=name, markersize=3)
        if kind == "ttft":
            ax.set_yscale("log")
        ax.set(xlabel="request", ylabel=ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
        path = stem.with_name(f"{stem.name}-{kind}.png")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
