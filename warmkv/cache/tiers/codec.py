"""One stored block as bytes, the same on disk and in the shared store: a header naming the model
fingerprint, key, dtype and shape, a CRC-32 of the payload, then the payload."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from warmkv.errors import CacheCorruption

if TYPE_CHECKING:  # torch is loaded by the functions that need it: `warmkv cache stats` reads headers only
    import torch

MAGIC = b"WKV2"
_DTYPES = {"float32": 1, "bfloat16": 2, "float16": 3}  # torch dtype names
# magic, dtype, ndim, shape, fingerprint, key, CRC-32 of the payload, payload length. CRC-32 finds torn
# writes and flipped bits at several GB/s; foreign files are caught by the fingerprint and key
_HEADER = struct.Struct("<4sBB5I16s16sIQ")


@dataclass(slots=True, frozen=True)
class StoredBlock:
    key: bytes
    kv: torch.Tensor


def encode_block(fingerprint: str, key: bytes, kv: torch.Tensor) -> bytes:
    return b"".join(encode_parts(fingerprint, key, kv))


def encode_parts(fingerprint: str, key: bytes, kv: torch.Tensor) -> tuple[bytes, memoryview]:
    """Header and payload; the payload is a view of the tensor's memory, not a copy (a block is large)."""
    import torch

    payload = memoryview(kv.contiguous().view(torch.uint8).numpy()).cast("B")
    shape = list(kv.shape) + [0] * (5 - kv.dim())
    header = _HEADER.pack(
        MAGIC,
        _DTYPES[str(kv.dtype).removeprefix("torch.")],
        kv.dim(),
        *shape,
        bytes.fromhex(fingerprint),
        key,
        _checksum(payload),
        len(payload),
    )
    return header, payload


def decode_block(data: bytearray, fingerprint: str, key: bytes | None = None) -> StoredBlock:
    """The block in `data` (read into a bytearray: the tensor shares its memory); CacheCorruption if anything
    about it is wrong."""
    if len(data) < _HEADER.size:
        raise CacheCorruption("truncated header")
    magic, dtype_code, ndim, *rest = _HEADER.unpack_from(data)
    shape, (stored_fingerprint, stored_key, checksum, length) = rest[:5][:ndim], rest[5:]
    if magic != MAGIC:
        raise CacheCorruption("not a warmkv KV file (or an older format)")
    if stored_fingerprint != bytes.fromhex(fingerprint):
        raise CacheCorruption("written by another model, dtype or layout")
    if key is not None and stored_key != key:
        raise CacheCorruption("key does not match the file name")
    # views released on the way out, even by an error: the caller reuses `data` as a read buffer
    with memoryview(data) as whole, whole[_HEADER.size :] as payload:
        if len(payload) != length:
            raise CacheCorruption(f"truncated payload ({len(payload)} of {length} bytes)")
        if _checksum(payload) != checksum:
            raise CacheCorruption("checksum mismatch")
    import torch

    dtype = next((name for name, code in _DTYPES.items() if code == dtype_code), None)
    if dtype is None:
        raise CacheCorruption(f"unknown dtype code {dtype_code}")
    payload_bytes = torch.frombuffer(data, dtype=torch.uint8, offset=_HEADER.size)
    kv = payload_bytes.view(getattr(torch, dtype)).reshape(shape)
    return StoredBlock(stored_key, kv)


def _checksum(payload: bytes | memoryview) -> int:
    return zlib.crc32(payload)
