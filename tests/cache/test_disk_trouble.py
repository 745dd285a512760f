"""The disk tier under a hostile file system: private file modes, a directory that cannot be written (the
tier turns off with one warning, and back on once it can write), a read that cannot touch a timestamp, a
block folder removed under the tier, a write the file system takes only part of."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from warmkv.cache.config import CacheConfig
from warmkv.cache.tiers.codec import BlockLayout
from warmkv.cache.tiers.disk import DiskTier, block_path
from warmkv.errors import WarmkvError

FINGERPRINT = "cd" * 16
SHAPE = (2, 1, 4, 1, 8)
KV = torch.arange(64, dtype=torch.float32).reshape(SHAPE)
KEY = b"\x07" * 16


def disk_tier(root: Path, **options: Any) -> DiskTier:
    return DiskTier(root, FINGERPRINT, BlockLayout(SHAPE, torch.float32), capacity_bytes=1 << 30, **options)


def make_read_only(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write under `root` fails as on a read-only mount (as root, chmod alone would not stop us)."""

    def refuse(real: Callable[..., Any], writes_only: bool = False) -> Callable[..., Any]:
        def guarded(path: Any, *args: Any, **kwargs: Any) -> Any:
            flags = args[0] if args else 0
            writing = not writes_only or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if writing and str(path).startswith(str(root)):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real(path, *args, **kwargs)

        return guarded

    for name in ("mkdir", "unlink", "utime", "replace", "rename", "rmdir", "chmod"):
        monkeypatch.setattr(os, name, refuse(getattr(os, name)))
    monkeypatch.setattr(os, "open", refuse(os.open, writes_only=True))


def test_kv_files_and_folders_are_private_by_default(tmp_path: Path) -> None:
    tier = disk_tier(tmp_path / "kv")
    tier.put(KEY, KV)
    tier.close()
    path = block_path(tier.directory, KEY)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for folder in (path.parent, tier.directory, tmp_path / "kv"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def test_a_shared_group_mode_applies_to_files_and_folders(tmp_path: Path) -> None:
    old_umask = os.umask(0o077)  # the mode asked for wins over a strict umask
    try:
        tier = disk_tier(tmp_path, file_mode=0o640)
        tier.put(KEY, KV)
        tier.close()
    finally:
        os.umask(old_umask)
    path = block_path(tier.directory, KEY)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750


@pytest.mark.parametrize("mode", [0o644 | 0o100, 0o400, 0o1600])
def test_kv_dir_mode_must_be_a_plain_owner_writable_file_mode(mode: int) -> None:
    with pytest.raises(WarmkvError, match="--kv-dir-mode"):
        CacheConfig(kv_file_mode=mode)


def test_read_only_dir_turns_the_tier_off_once_then_back_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    make_read_only(tmp_path, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="warmkv.cache"):
        tier = disk_tier(tmp_path, retry_s=0.05)
        assert not tier.enabled
        tier.put(KEY, KV)  # refused quietly: the tier is off
        time.sleep(0.2)
        assert not tier.enabled  # a failed re-probe
        tier.flush()
    assert sum("disk KV tier disabled" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.undo()  # the disk is writable again
    deadline = time.monotonic() + 10
    while not tier.enabled:
        assert time.monotonic() < deadline, "the tier never came back"
        time.sleep(0.05)
    tier.put(KEY, KV)
    tier.close()
    assert block_path(tier.directory, KEY).is_file()


def test_a_read_does_not_fail_because_the_timestamp_cannot_be_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tier = disk_tier(tmp_path)
    tier.put(KEY, KV)
    tier.flush()

    def refuse_utime(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")  # a file another user owns

    monkeypatch.setattr(os, "utime", refuse_utime)
    assert torch.equal(tier.get(KEY), KV)
    assert tier.stats.hits == 1 and tier.enabled
    tier.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder")
def test_a_foreign_owned_dir_turns_the_tier_off(tmp_path: Path) -> None:
    tmp_path.chmod(0o555)
    try:
        tier = disk_tier(tmp_path)
        assert not tier.enabled and tier.stats.blocks == 0
        tier.close()
    finally:
        tmp_path.chmod(0o755)


def test_a_block_folder_removed_under_the_tier_is_made_again(tmp_path: Path) -> None:
    """The tier remembers the block folders it made; one removed since (a `warmkv cache clear` beside a
    running server) is made again, and the block is written and read back whole."""
    tier = disk_tier(tmp_path)
    tier.put(KEY, KV, wait=True)
    tier.flush()
    shutil.rmtree(block_path(tier.directory, KEY).parent)
    other = b"\x07" + b"\x08" * 15  # the same folder (named by the key's first byte)
    tier.put(other, KV + 1, wait=True)
    tier.flush()
    assert torch.equal(tier.get(other), KV + 1)
    assert tier.stats.writes == 2 and tier.enabled
    tier.close()


def test_a_file_system_taking_part_of_a_write_still_gets_the_whole_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.writev

    def a_few_bytes(descriptor: int, buffers: list[Any]) -> int:  # as a write interrupted by a signal
        return real(descriptor, [memoryview(buffers[0])[:7]])

    monkeypatch.setattr(os, "writev", a_few_bytes)
    tier = disk_tier(tmp_path)
    tier.put(KEY, KV, wait=True)
    tier.flush()
    monkeypatch.undo()
    assert torch.equal(tier.get(KEY), KV)
    assert tier.stats.corrupt == 0
    tier.close()


def test_a_file_whose_mode_cannot_be_set_is_not_left_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that refuses chmod (some network mounts): the write fails, the tier turns off, and no
    temporary file is left in the directory."""
    tier = disk_tier(tmp_path)

    def refuse(descriptor: int, mode: int) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "fchmod", refuse)
    tier.put(KEY, KV, wait=True)
    tier.flush()
    assert not tier.enabled
    assert [p for p in tier.directory.rglob("*") if p.is_file()] == []
    tier.close()
