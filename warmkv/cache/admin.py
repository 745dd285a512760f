"""`warmkv cache stats|ls|clear|verify`: look after the disk tier without a running server."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from warmkv.cache.tiers.base import SUFFIX
from warmkv.errors import CacheCorruption


@dataclass(slots=True)
class VerifyReport:
    checked: int = 0
    corrupt: int = 0


def _model_dirs(kv_dir: Path) -> list[Path]:
    return sorted(p for p in kv_dir.iterdir() if p.is_dir()) if kv_dir.is_dir() else []


def _files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob(f"*/*{SUFFIX}"))


def stats(kv_dir: Path) -> list[str]:
    lines = [f"{'fingerprint':34} {'blocks':>8} {'MiB':>10}  last used"]
    for model_dir in _model_dirs(kv_dir):
        files = _files(model_dir)
        size = sum(f.stat().st_size for f in files)
        last = max((f.stat().st_mtime for f in files), default=None)
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(last)) if last else "-"
        lines.append(f"{model_dir.name:34} {len(files):>8} {size / 2**20:>10.1f}  {when}")
    return lines


def listing(kv_dir: Path) -> list[str]:
    lines = []
    for model_dir in _model_dirs(kv_dir):
        for file in _files(model_dir):
            stat = file.stat()
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stat.st_mtime))
            lines.append(f"{model_dir.name} {file.stem} {stat.st_size:>10} {when}")
    return lines


def clear(kv_dir: Path) -> int:
    """Delete every stored block; returns how many there were."""
    count = 0
    for model_dir in _model_dirs(kv_dir):
        count += len(_files(model_dir))
        shutil.rmtree(model_dir)
    return count


def verify(kv_dir: Path) -> VerifyReport:
    """Read every block and check it; corrupt ones are deleted, as a server would on load."""
    from warmkv.cache.tiers.codec import decode_block  # torch: only verification needs it
    from warmkv.cache.tiers.disk import read_file

    report = VerifyReport()
    for model_dir in _model_dirs(kv_dir):
        for file in _files(model_dir):
            report.checked += 1
            try:
                decode_block(read_file(file), model_dir.name, bytes.fromhex(file.stem))
            except (CacheCorruption, OSError, ValueError):
                report.corrupt += 1
                file.unlink(missing_ok=True)
    return report


def explain(trace: Path) -> list[str]:
    """A per-request cache report from a `--trace` file, like a hosted API's cache dashboard."""
    lines = [f"{'#':>3} {'request':14} {'prompt':>7} {'cached':>7} {'hit':>5}  {'from':18} why not more"]
    prompt_total = cached_total = 0
    for number, line in enumerate(trace.read_text().splitlines(), 1):
        entry = json.loads(line)
        prompt, cached = entry["prompt_tokens"], entry["cached_tokens"]
        prompt_total, cached_total = prompt_total + prompt, cached_total + cached
        miss = (entry.get("cache") or {}).get("miss") or {}
        why = miss.get("text", "fully cached" if cached == prompt else "-")
        hit = f"{100 * cached / prompt:.0f}%" if prompt else "-"
        lines.append(f"{number:>3} {entry['id'][-14:]:14} {prompt:>7} {cached:>7} {hit:>5}  "
                     f"{entry.get('cache_source', '-'):18} {why}")  # fmt: skip
    share = 100 * cached_total / prompt_total if prompt_total else 0.0
    lines.append(f"total: {cached_total} of {prompt_total} prompt tokens from cache ({share:.1f}%)")
    return lines
