"""The identity of KV: which weights, dtype, layout and tokenizer produced it.

Every stored unit is keyed under this fingerprint, so KV computed by one model, quantisation or dtype is
never served to another.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from warmkv.paths import cache_home

FORMAT_VERSION = 2  # the stored block format (codec.MAGIC): blocks of an older one are never looked for
_CHUNK = 1 << 24


def model_fingerprint(
    folder: Path, dtype: torch.dtype, block_size: int, kv_layout: tuple[int, ...], in_memory_id: str | None
) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for part in (FORMAT_VERSION, str(dtype), block_size, kv_layout, in_memory_id):
        digest.update(repr(part).encode())
    weights = [] if in_memory_id else sorted(folder.glob("*.safetensors"))
    if not weights and not in_memory_id:
        raise ValueError(f"{folder} has no weights to identify the KV by")
    for file in weights + sorted(folder.glob("tokenizer*.json")):
        digest.update(file.name.encode())
        digest.update(file_digest(file).encode())
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """Digest of a file's bytes, remembered per (path, size, mtime) so large weights are hashed once."""
    stat = path.stat()
    memo_key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_file = cache_home() / "digests.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, json.JSONDecodeError):
        memo = {}
    if memo_key in memo:
        return memo[memo_key]
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    memo[memo_key] = digest.hexdigest()
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = memo_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(memo))
        temporary.replace(memo_file)
    except OSError:
        pass  # only a speed-up; the digest itself is right
    return memo[memo_key]
