"""Replay results: totals per policy against the oracle, the terminal table, JSON and plots."""

from __future__ import annotations

import importlib.util
import json
import statistics
from dataclasses import asdict
from itertools import accumulate
from pathlib import Path
from typing import Any

from warmkv.bench.replay import Restart, TurnResult


def summarize(turns: list[TurnResult], oracle: list[int]) -> dict[str, Any]:
    """Totals of the requests that succeeded (a failed one counts only as an error), overall and per shape."""
    pairs = list(zip(turns, oracle, strict=True))
    shapes = sorted({t.shape for t in turns})
    by_shape = {shape: _totals([p for p in pairs if p[0].shape == shape]) for shape in shapes}
    return {
        **_totals(pairs),
        "restarts": {kind.value: sum(t.restart is kind for t in turns) for kind in Restart if kind.value},
        "efficiency_by_shape": {shape: totals["efficiency"] for shape, totals in by_shape.items()},
        "by_shape": by_shape,
        "turns": [
            asdict(t) | {"oracle_tokens": o, "computed_tokens": t.prompt_tokens - t.cached_tokens}
            for t, o in pairs
        ],
    }


def _totals(pairs: list[tuple[TurnResult, int]]) -> dict[str, Any]:
    done = [(t, o) for t, o in pairs if not t.error]
    prompt = sum(t.prompt_tokens for t, _ in done)
    cached = sum(t.cached_tokens for t, _ in done)
    reusable = sum(o for _, o in done)
    ttfts = sorted(t.ttft_s for t, _ in done)
    busy = sum(t.latency_s for t, _ in done)  # time spent in requests: no idle gaps, no restarts
    return {
        "requests": len(pairs),
        "errors": len(pairs) - len(done),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "oracle_tokens": reusable,
        "computed_tokens": prompt - cached,
        "hit_rate": cached / prompt if prompt else 0.0,
        "efficiency": cached / reusable if reusable else 1.0,
        "ttft_mean_s": statistics.fmean(ttfts) if ttfts else None,
        "ttft_p50_s": ttfts[len(ttfts) // 2] if ttfts else None,
        "ttft_p90_s": ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.9))] if ttfts else None,
        "requests_per_s": len(done) / busy if busy else None,
        "prompt_tokens_per_s": prompt / busy if busy else None,
    }


def oracle_row(prompts: list[int], oracle: list[int]) -> dict[str, Any]:
    total = sum(prompts)
    return {"requests": len(prompts), "prompt_tokens": total, "cached_tokens": sum(oracle),
            "oracle_tokens": sum(oracle), "computed_tokens": total - sum(oracle),
            "hit_rate": sum(oracle) / total if total else 0.0, "efficiency": 1.0}  # fmt: skip


def table(rows: dict[str, dict[str, Any]]) -> list[str]:
    head = f"{'policy':24} {'prompt':>8} {'cached':>8} {'oracle':>8} {'computed':>9} {'hit':>6} {'eff':>6} " \
           f"{'TTFT mean':>10} {'p50':>8} {'p90':>8} {'req/s':>6} {'err':>4}"  # fmt: skip
    lines = [head]
    for name, row in rows.items():
        times = [_ms(row.get(k)) for k in ("ttft_mean_s", "ttft_p50_s", "ttft_p90_s")]
        tokens = f"{row['prompt_tokens']:>8} {row['cached_tokens']:>8} {row['oracle_tokens']:>8}"
        rate = f"{row['requests_per_s']:.2f}" if row.get("requests_per_s") else "-"
        lines.append(f"{name:24} {tokens} {row['computed_tokens']:>9} {row['hit_rate']:>6.1%} "
                     f"{row['efficiency']:>6.1%} {times[0]:>10} {times[1]:>8} {times[2]:>8} {rate:>6} "
                     f"{row.get('errors', 0):>4}")  # fmt: skip
    return lines


def shape_table(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Per shape: cached/oracle and TTFT p50/p90 of each row that replayed requests."""
    measured = {name: row for name, row in rows.items() if "by_shape" in row}
    shapes = sorted({shape for row in measured.values() for shape in row["by_shape"]})
    lines = [f"{'shape':16} {'policy':24} {'cached/oracle':>13} {'p50':>8} {'p90':>8} {'req/s':>6} "
             f"{'err':>4}"]
    for shape in shapes:
        for name, row in measured.items():
            cell = row["by_shape"].get(shape)
            if cell is None:
                continue
            rate = f"{cell['requests_per_s']:.2f}" if cell.get("requests_per_s") else "-"
            lines.append(f"{shape:16} {name:24} {cell['efficiency']:>13.1%} {_ms(cell['ttft_p50_s']):>8} "
                         f"{_ms(cell['ttft_p90_s']):>8} {rate:>6} {cell['errors']:>4}")  # fmt: skip
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
