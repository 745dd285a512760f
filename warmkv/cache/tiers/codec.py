"""One stored block as bytes, the same on disk and in the shared store: a header naming the model
fingerprint, key, dtype and shape, then the payload, with a CRC-32 over both.

A stored block comes from outside the process (a file anyone may edit, a store any replica writes), so
decoding trusts nothing: the checksum covers the header as well as the payload, and the shape and dtype
must be the model's own KV block layout before a byte of it reaches the pool.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from warmkv.errors import CacheCorruption

if TYPE_CHECKING:  # torch is loaded by the functions that need it: `warmkv cache` reads headers only
    import torch

MAGIC = b"WKV3"
_OLDER_MAGICS = (b"WKV2",)  # earlier warmkv formats: never decoded, but still recognised as warmkv's
_DTYPES = {"float32": 1, "bfloat16": 2, "float16": 3}  # torch dtype names
_MAX_DIMS = 5
# magic, dtype, ndim, shape, fingerprint, key, payload length, then a CRC-32 of everything before it and of
# the payload. CRC-32 finds torn writes and flipped bits at several GB/s; foreign files are caught by the
# fingerprint and key. The fingerprint and key sit where every format since WKV2 has them.
_HEADER = struct.Struct(f"<4sBB{_MAX_DIMS}I16s16sQI")
HEADER_SIZE = _HEADER.size
_CHECKED = HEADER_SIZE - 4  # the header bytes the checksum covers: all but the checksum itself


@dataclass(slots=True, frozen=True)
class BlockLayout:
    """Shape and dtype of one block of the model's KV: what every stored block of its fingerprint must be."""

    shape: tuple[int, ...]
    dtype: torch.dtype


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
    shape = list(kv.shape) + [0] * (_MAX_DIMS - kv.dim())
    fields = _HEADER.pack(
        MAGIC, _DTYPES[_dtype_name(kv.dtype)], kv.dim(), *shape, bytes.fromhex(fingerprint), key,
        len(payload), 0,
    )[:_CHECKED]  # fmt: skip
    return fields + struct.pack("<I", zlib.crc32(payload, zlib.crc32(fields))), payload


def decode_block(
    data: bytearray, fingerprint: str, key: bytes | None = None, layout: BlockLayout | None = None
) -> StoredBlock:
    """The block in `data` (read into a bytearray: the tensor shares its memory); CacheCorruption, and
    nothing else, if anything about it is wrong. `layout`: the shape and dtype the block must have."""
    if len(data) < HEADER_SIZE:
        raise CacheCorruption("truncated header")
    magic, dtype_code, ndim, *rest = _HEADER.unpack_from(data)
    dims, (stored_fingerprint, stored_key, length, checksum) = rest[:_MAX_DIMS], rest[_MAX_DIMS:]
    if magic != MAGIC:
        raise CacheCorruption("not a warmkv KV file (or an older format)")
    if stored_fingerprint != bytes.fromhex(fingerprint):
        raise CacheCorruption("written by another model, dtype or layout")
    if key is not None and stored_key != key:
        raise CacheCorruption("key does not match the file name")
    # views released on the way out, even by an error: the caller reuses `data` as a read buffer
    with memoryview(data) as whole, whole[:_CHECKED] as fields, whole[HEADER_SIZE:] as payload:
        if len(payload) != length:
            raise CacheCorruption(f"truncated payload ({len(payload)} of {length} bytes)")
        if zlib.crc32(payload, zlib.crc32(fields)) != checksum:
            raise CacheCorruption("checksum mismatch")
    import torch

    name = next((d for d, code in _DTYPES.items() if code == dtype_code), None)
    if name is None or not 0 < ndim <= _MAX_DIMS:
        raise CacheCorruption(f"unknown dtype code {dtype_code} or {ndim} dimensions")
    dtype, shape = getattr(torch, name), tuple(dims[:ndim])
    if layout is not None and (shape, dtype) != (layout.shape, layout.dtype):
        raise CacheCorruption(f"a {dtype} block of shape {list(shape)}; the model's blocks are "
                              f"{layout.dtype} of shape {list(layout.shape)}")  # fmt: skip
    if math.prod(shape) * dtype.itemsize != length:
        raise CacheCorruption(f"shape {list(shape)} does not match the {length}-byte payload")
    kv = torch.frombuffer(data, dtype=torch.uint8, offset=HEADER_SIZE).view(dtype).reshape(shape)
    return StoredBlock(stored_key, kv)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def stored_identity(head: bytes) -> tuple[str, bytes] | None:
    """Fingerprint (hex) and key named by the first HEADER_SIZE bytes of a stored block, or None when they
    are not a warmkv block header. Nothing else is checked: this tells warmkv's files from anyone else's."""
    if len(head) < HEADER_SIZE or head[: len(MAGIC)] not in (MAGIC, *_OLDER_MAGICS):
        return None
    fields = _HEADER.unpack_from(head)
    return fields[3 + _MAX_DIMS].hex(), fields[4 + _MAX_DIMS]
