"""`warmkv cache clear|verify` touch only warmkv's blocks, say what they deleted, and fail on corruption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from warmkv.cache import admin
from warmkv.cache.tiers.codec import BlockLayout
from warmkv.cache.tiers.disk import DiskTier, block_path
from warmkv.cli import main

FINGERPRINT = "ab" * 16
BLOCK_SHAPE = (2, 2, 16, 1, 8)


def stored_blocks(kv_dir: Path, count: int) -> list[Path]:
    """Blocks written by the disk tier itself, as a server would leave them."""
    tier = DiskTier(kv_dir, FINGERPRINT, BlockLayout(BLOCK_SHAPE, torch.float32), capacity_bytes=1 << 30)
    keys = [bytes([i]) * 16 for i in range(count)]
    for i, key in enumerate(keys):
        tier.put(key, torch.full(BLOCK_SHAPE, float(i)))
    tier.flush()
    tier.close()
    return [block_path(tier.directory, key) for key in keys]


def foreign_files(kv_dir: Path) -> list[Path]:
    """A user's own things beside (and among) warmkv's: none of them may be touched."""
    files = [
        kv_dir / "photos" / "holiday.jpg",
        kv_dir / "otherapp" / "ab" / f"{'ab' * 16}.kv",  # named like a block, in a foreign folder
        kv_dir / "notes.txt",
        kv_dir / FINGERPRINT / "README",  # inside a fingerprint folder, but not a block
        kv_dir / FINGERPRINT / "cd" / f"{'cd' * 16}.kv",  # named like a block, without a warmkv header
    ]
    for file in files:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(b"precious user data " * 10)
    (kv_dir / "0123456789abcdef0123456789abcdef").mkdir()  # fingerprint-shaped, empty: nothing to delete
    return files


def test_clear_deletes_only_warmkv_blocks_and_reports_them(tmp_path: Path) -> None:
    blocks = stored_blocks(tmp_path, 3)
    foreign = foreign_files(tmp_path)
    size = sum(b.stat().st_size for b in blocks)
    report = admin.clear(tmp_path)
    assert (report.deleted_files, report.deleted_bytes) == (3, size)
    assert not any(b.exists() for b in blocks)
    assert all(f.read_bytes() == b"precious user data " * 10 for f in foreign)
    assert set(report.foreign) == {tmp_path / "photos", tmp_path / "otherapp", tmp_path / "notes.txt",
                                   foreign[3], foreign[4]}  # fmt: skip
    assert not (tmp_path / FINGERPRINT / "01").exists()  # the emptied shard folder went too
    assert (tmp_path / FINGERPRINT / "README").exists()


def test_verify_deletes_only_corrupt_warmkv_blocks(tmp_path: Path) -> None:
    blocks = stored_blocks(tmp_path, 3)
    foreign = foreign_files(tmp_path)
    damaged = bytearray(blocks[1].read_bytes())
    damaged[-5] ^= 0x10
    blocks[1].write_bytes(bytes(damaged))
    report = admin.verify(tmp_path)
    assert report.checked == 3 and [path for path, _ in report.corrupt] == [blocks[1]]
    assert report.deleted_bytes == len(damaged) and "checksum" in report.corrupt[0][1]
    assert blocks[0].exists() and blocks[2].exists() and not blocks[1].exists()
    assert all(f.exists() for f in foreign)


def test_cli_clear_says_what_it_deleted_and_left(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stored_blocks(tmp_path, 2)
    foreign_files(tmp_path)
    main(["cache", "clear", "--kv-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "deleted 2 KV blocks" in out and "left alone" in out and "photos" in out


@pytest.mark.parametrize("action", ["stats", "ls", "clear", "verify"])
def test_cli_refuses_a_kv_dir_that_is_not_there(tmp_path: Path, action: str) -> None:
    """A mistyped --kv-dir is not an empty cache (clear said "deleted 0" and exited 0)."""
    with pytest.raises(SystemExit) as exited:
        main(["cache", action, "--kv-dir", str(tmp_path / "typo")])
    assert exited.value.code == f"warmkv: error: --kv-dir {tmp_path / 'typo'}: no such folder"


def test_cli_explain_names_what_it_lacks(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["cache", "explain"])
    assert "cache explain needs a trace file written by `warmkv serve --trace`" in str(exited.value.code)
    with pytest.raises(SystemExit) as exited:
        main(["cache", "explain", str(tmp_path / "none.jsonl")])
    assert "no such trace file" in str(exited.value.code) and "None" not in str(exited.value.code)


def test_explain_skips_lines_that_are_not_requests_and_names_them(tmp_path: Path) -> None:
    """A trace cut by a crash, a blank line or someone else's JSON: the report names each line it skipped
    and still totals the others (it was a traceback)."""
    good = {"id": "chatcmpl-abc", "prompt_tokens": 100, "cached_tokens": 64, "cache_source": "live:64"}
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join([json.dumps(good), '{"a": 1}', "[]", "", json.dumps(good)[:30]]) + "\n")
    report = admin.explain(trace)
    skipped = [line.split()[:2] for line in report[2:5]]
    assert skipped == [["2", "skipped:"], ["3", "skipped:"], ["5", "skipped:"]]
    assert report[1].split()[:4] == ["1", "chatcmpl-abc", "100", "64"]
    assert report[-1] == "total: 64 of 100 prompt tokens from cache (64.0%)"


def test_cli_verify_exits_non_zero_on_corruption(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocks = stored_blocks(tmp_path, 2)
    main(["cache", "verify", "--kv-dir", str(tmp_path)])  # all sound: exits normally
    assert "2 KV blocks" in capsys.readouterr().out
    blocks[0].write_bytes(blocks[0].read_bytes()[:-1])
    with pytest.raises(SystemExit) as exited:
        main(["cache", "verify", "--kv-dir", str(tmp_path)])
    assert exited.value.code != 0 and "1 corrupt" in str(exited.value.code)
    assert f"corrupt, deleted: {blocks[0]}" in capsys.readouterr().out
