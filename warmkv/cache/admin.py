"""`warmkv cache stats|ls|clear|verify`: look after the disk tier without a running server.

`--kv-dir` can point anywhere, so these commands touch only what they can prove is warmkv's: a folder named
like a model fingerprint, holding block files named like a key whose header names that same fingerprint and
key. Anything else is left alone and reported.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from warmkv.cache.tiers.codec import HEADER_SIZE, decode_block, stored_identity
from warmkv.cache.tiers.disk import read_file
from warmkv.errors import CacheCorruption

_FINGERPRINT = re.compile(r"[0-9a-f]{32}")
# a block, or the temporary it is written to before the rename (tmp + writer thread id)
_BLOCK_FILE = re.compile(r"(?P<key>[0-9a-f]{32})\.kv(?P<temporary>\.tmp\d+)?")


@dataclass(slots=True)
class ModelFolder:
    path: Path
    blocks: list[Path] = field(default_factory=list)
    temporaries: list[Path] = field(default_factory=list)  # left by a crash mid-write (or being written)


@dataclass(slots=True)
class Survey:
    """What a kv-dir holds: warmkv's model folders, and every other entry (never touched)."""

    models: list[ModelFolder] = field(default_factory=list)
    foreign: list[Path] = field(default_factory=list)


@dataclass(slots=True)
class ClearReport:
    deleted_files: int = 0
    deleted_bytes: int = 0
    foreign: list[Path] = field(default_factory=list)


@dataclass(slots=True)
class VerifyReport:
    checked: int = 0
    corrupt: list[tuple[Path, str]] = field(default_factory=list)  # deleted, with the reason
    deleted_bytes: int = 0
    foreign: list[Path] = field(default_factory=list)


def survey(kv_dir: Path) -> Survey:
    found = Survey()
    if not kv_dir.is_dir():
        return found
    for entry in sorted(kv_dir.iterdir()):
        if entry.is_dir() and not entry.is_symlink() and _FINGERPRINT.fullmatch(entry.name):
            found.models.append(_model_folder(entry, found.foreign))
        else:
            found.foreign.append(entry)
    return found


def _model_folder(path: Path, foreign: list[Path]) -> ModelFolder:
    folder = ModelFolder(path)
    for shard in sorted(path.iterdir()):
        if not (shard.is_dir() and not shard.is_symlink() and re.fullmatch(r"[0-9a-f]{2}", shard.name)):
            foreign.append(shard)
            continue
        for file in sorted(shard.iterdir()):
            name = _BLOCK_FILE.fullmatch(file.name)
            if name is None or not _is_block(file, path.name, name["key"]):
                foreign.append(file)
            elif name["temporary"]:
                folder.temporaries.append(file)
            else:
                folder.blocks.append(file)
    return folder


def _is_block(file: Path, fingerprint: str, key_hex: str) -> bool:
    """Whether a file is where the block of this key goes, and its header names the same fingerprint and
    key: a warmkv block (whole or damaged past its header)."""
    if file.parent.name != key_hex[:2] or file.is_symlink() or not file.is_file():
        return False
    try:
        with file.open("rb") as f:
            head = f.read(HEADER_SIZE)
    except OSError:
        return False
    return stored_identity(head) == (fingerprint, bytes.fromhex(key_hex))


def stats(kv_dir: Path) -> list[str]:
    lines = [f"{'fingerprint':34} {'blocks':>8} {'MiB':>10}  last used"]
    for model in survey(kv_dir).models:
        files = [f.stat() for f in model.blocks]
        size = sum(f.st_size for f in files)
        last = max((f.st_mtime for f in files), default=None)
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(last)) if last else "-"
        lines.append(f"{model.path.name:34} {len(files):>8} {size / 2**20:>10.1f}  {when}")
    return lines


def listing(kv_dir: Path) -> list[str]:
    lines = []
    for model in survey(kv_dir).models:
        for file in model.blocks:
            stat = file.stat()
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stat.st_mtime))
            lines.append(f"{model.path.name} {file.stem} {stat.st_size:>10} {when}")
    return lines


def clear(kv_dir: Path) -> ClearReport:
    """Delete every warmkv block (and stale temporary) under kv_dir, then the folders they leave empty."""
    found = survey(kv_dir)
    report = ClearReport(foreign=found.foreign)
    for model in found.models:
        for file in model.blocks + model.temporaries:
            report.deleted_bytes += _delete(file)
            report.deleted_files += 1
        _remove_empty_folders(model.path)
    return report


def verify(kv_dir: Path) -> VerifyReport:
    """Read every block and check it as a server would on load; corrupt ones are deleted."""
    found = survey(kv_dir)
    report = VerifyReport(foreign=found.foreign)
    for model in found.models:
        for file in model.blocks:
            report.checked += 1
            try:
                decode_block(read_file(file), model.path.name, bytes.fromhex(file.name[:32]))
            except (CacheCorruption, OSError) as err:
                report.corrupt.append((file, str(err)))
                report.deleted_bytes += _delete(file)
    return report


def _delete(file: Path) -> int:
    try:
        size = file.stat().st_size
        file.unlink()
    except FileNotFoundError:  # a running server evicted it meanwhile
        return 0
    return size


def _remove_empty_folders(model_dir: Path) -> None:
    for folder in [*sorted(model_dir.iterdir()), model_dir]:
        with contextlib.suppress(OSError):
            os.rmdir(folder)  # only ever removes an empty folder


def explain(trace: Path) -> list[str]:
    """A per-request cache report from a `--trace` file, like a hosted API's cache dashboard."""
    lines = [f"{'#':>3} {'request':14} {'prompt':>7} {'cached':>7} {'hit':>5}  {'from':18} why not more"]
    prompt_total = cached_total = 0
    for number, line in enumerate(trace.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            prompt, cached = int(entry["prompt_tokens"]), int(entry["cached_tokens"])
            request, source = str(entry["id"])[-14:], entry.get("cache_source", "-")
            why = ((entry.get("cache") or {}).get("miss") or {}).get("text")
        except (ValueError, TypeError, KeyError, AttributeError) as err:  # cut by a crash, or not a trace's
            skipped = f"not a request of `warmkv serve --trace` ({type(err).__name__})"
            lines.append(f"{number:>3} skipped: {skipped}")
            continue
        prompt_total, cached_total = prompt_total + prompt, cached_total + cached
        why = why or ("fully cached" if cached == prompt else "-")
        hit = f"{100 * cached / prompt:.0f}%" if prompt else "-"
        lines.append(f"{number:>3} {request:14} {prompt:>7} {cached:>7} {hit:>5}  {source:18} {why}")
    share = 100 * cached_total / prompt_total if prompt_total else 0.0
    lines.append(f"total: {cached_total} of {prompt_total} prompt tokens from cache ({share:.1f}%)")
    return lines
