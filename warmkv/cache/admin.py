"""`warmkv cache stats|ls|clear|verify`: look after the disk tier without a running server."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from warmkv.cache.tiers.disk import SUFFIX, decode_block, read_file
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
