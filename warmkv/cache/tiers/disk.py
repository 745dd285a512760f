"""Local-disk tier: one file per block under a directory per model fingerprint; survives restarts.

A file is written to a temporary name and renamed into place, so a crash never leaves a half-written
block under a real name. Each file carries its fingerprint, key, shape and a checksum of header and
payload; a file that fails any check is deleted and never served. Writes happen on a background thread
behind a bounded queue: when the queue is full the write is skipped and counted, never waited for.

Files hold prompt-derived data, so they are created readable by their owner only (a wider mode is a
setting for shared set-ups). A directory that cannot be written (read-only, full, foreign-owned) turns the
tier off with one warning; requests go on from memory, and the writer probes the directory again every
RETRY_S seconds, turning the tier back on once it can write.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from warmkv.cache.background import BackgroundWorker, EngineCpuWork
from warmkv.cache.tiers.base import SUFFIX, TierName, TierStats
from warmkv.cache.tiers.codec import BlockLayout, decode_block, encode_parts
from warmkv.errors import CacheCorruption

if TYPE_CHECKING:  # names for type hints only: `warmkv cache` reads files without loading torch
    import torch

    _Write = tuple[bytes, torch.Tensor, Callable[[], None] | None]  # a block, and what to call once written

log = logging.getLogger("warmkv.cache")

RETRY_S = 60.0  # between probes of a directory that could not be written
WAIT_CHECK_S = 0.1  # a put waiting for room in the queue looks again this often


class _Probe:
    """A writer-queue item: try the directory again."""


def read_file(path: Path, buffer: bytearray | None = None) -> bytearray:
    """The file's bytes, in `buffer` when given (grown as needed): a reused buffer is not faulted in again."""
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        data = buffer if buffer is not None else bytearray(size)
        if len(data) != size:
            try:
                data[:] = bytes(size) if len(data) < size else data[:size]
            except BufferError:  # a block read earlier still views it: read into a new buffer
                data = bytearray(size)
        f.readinto(data)
    return data


def _write_all(descriptor: int, parts: list[bytes | memoryview]) -> None:
    """Write every byte of `parts` in order: one system call when the file takes them all at once."""
    views = [memoryview(part) for part in parts]
    while views:
        written = os.writev(descriptor, views)
        if written == 0:  # no progress (nothing a file does; never spin on it)
            raise OSError(errno.EIO, "the file took none of the block's bytes")
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views:
            views[0] = views[0][written:]


def block_location(key: bytes) -> tuple[str, str]:
    """A block's folder and file name under its tier's directory."""
    name = key.hex()
    return name[:2], name + SUFFIX


def block_path(directory: Path, key: bytes) -> Path:
    folder, name = block_location(key)
    return directory / folder / name


class DiskTier:
    name = TierName.DISK

    def __init__(
        self, root: Path, fingerprint: str, layout: BlockLayout, capacity_bytes: int, queue_size: int = 1024,
        file_mode: int = 0o600, retry_s: float = RETRY_S, engine_work: EngineCpuWork | None = None,
    ) -> None:  # fmt: skip
        self.fingerprint = fingerprint
        self.layout = layout
        self.directory = root / fingerprint
        self._directory = str(self.directory)
        self._folders: set[str] = set()  # block folders known to exist: one stat fewer per write
        self.capacity_bytes = capacity_bytes
        self.file_mode = file_mode
        self.folder_mode = file_mode | (file_mode & 0o444) >> 2  # searchable by whoever may read
        self.stats = TierStats()
        self._up = False
        self._warned = False  # one warning per outage
        self._retry_s, self._retry_at = retry_s, 0.0
        self._files: OrderedDict[bytes, int] = OrderedDict()  # key -> file size, least recently used first
        self._lock = threading.Lock()
        self._queued: set[bytes] = set()
        self._queue_size = queue_size  # in blocks: the writer's queue holds lists of them
        self._room = threading.Condition(self._lock)  # notified as queued blocks are written
        self._writer: BackgroundWorker[list[_Write] | _Probe] = BackgroundWorker(
            "warmkv-disk-writer", self._write_queued, queue_size, engine_work=engine_work,
            backlogged=lambda: len(self._queued) * 2 >= queue_size,
        )  # fmt: skip
        self._probe()
        # reading and checksumming release the GIL: a long hit loads on several cores at once
        self._local = threading.local()  # each reader thread's reusable buffer
        self._readers = ThreadPoolExecutor(
            max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="warmkv-disk-read"
        )

    @property
    def enabled(self) -> bool:
        """Whether the tier serves and stores blocks; while it is off, asking schedules a retry when due."""
        if not self._up and time.monotonic() >= self._retry_at:
            self._retry_at = time.monotonic() + self._retry_s
            self._writer.put(_Probe())  # on the writer thread: the caller never waits for the disk
        return self._up

    # -- the engine's side ------------------------------------------------------------------------

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return self.enabled and key in self._files

    def get(self, key: bytes) -> torch.Tensor | None:
        return self._read(key, None)

    def read_many(self, keys: list[bytes], consume: Callable[[int, torch.Tensor], None]) -> list[bool]:
        """Read blocks on several threads; each is handed to consume(index, kv) while its (reused) buffer
        is valid. Returns which keys were read."""

        def one(index: int, key: bytes) -> bool:
            buffer = getattr(self._local, "buffer", None)
            if buffer is None:
                buffer = self._local.buffer = bytearray()
            kv = self._read(key, buffer)
            if kv is not None:
                consume(index, kv)
            return kv is not None

        return list(self._readers.map(one, range(len(keys)), keys))

    def _read(self, key: bytes, buffer: bytearray | None) -> torch.Tensor | None:
        path = block_path(self.directory, key)
        try:
            block = decode_block(read_file(path, buffer), self.fingerprint, key, self.layout)
        except FileNotFoundError:
            self._forget(key, miss=True)
            return None
        except OSError as err:  # unreadable (permissions, I/O): a miss; the file is not proven bad
            log.warning("cannot read KV block %s: %s", path.name, err)
            self._forget(key, miss=True)
            return None
        except CacheCorruption as err:
            log.warning("dropping corrupt KV block %s: %s", path.name, err)
            self._forget(key, corrupt=True)
            with contextlib.suppress(OSError):  # a read-only directory keeps it; it is never served again
                path.unlink(missing_ok=True)
            return None
        with self._lock:  # readers run on several threads
            if key in self._files:
                self._files.move_to_end(key)
            self.stats.hits += 1
        # recency survives a restart (the scan orders files by modification time); only a hint, so a
        # directory that refuses it costs nothing
        with contextlib.suppress(OSError):
            os.utime(path)
        return block.kv

    def wants(self, key: bytes) -> bool:
        """Whether a put of this block would store it: the tier is up and has it neither on disk nor
        queued (lets a caller skip copying a block the disk has)."""
        with self._lock:
            return self._up and key not in self._files and key not in self._queued

    def put(
        self, key: bytes, kv: torch.Tensor, wait: bool = False, done: Callable[[], None] | None = None
    ) -> None:
        """Queue a block for writing; `kv` must not change until `done` is called (on the writer's thread,
        once the block is written, or at once when it is not: stored already, the tier down, skipped) or,
        without `done`, ever (pass a copy). With the queue full, the write is skipped, or (wait=True, off
        the request path) waited for."""
        self.put_many([(key, kv, done)], wait)

    def put_many(self, writes: list[_Write], wait: bool = False) -> None:
        """`put` of several blocks with one look at the bookkeeping and one queue item: a step demoting a
        hundred blocks wakes the writer once, not a hundred times (each wake takes the interpreter lock
        from the engine's thread). The queue holds at most `queue_size` blocks; those past it are skipped,
        or (wait=True) waited for."""
        queued: list[_Write] = []
        unqueued: list[_Write] = []  # stored or queued already, the tier down, or no room: not written now
        skipped = 0
        with self._room:
            while wait and self._up and self._queued and len(self._queued) + len(writes) > self._queue_size:
                self._room.wait(timeout=WAIT_CHECK_S)  # (the tier may go down meanwhile)
            room = len(writes) if wait else self._queue_size - len(self._queued)
            for write in writes:
                if not self._up or write[0] in self._files or write[0] in self._queued:
                    unqueued.append(write)
                elif len(queued) >= room:
                    unqueued.append(write)
                    skipped += 1
                else:
                    self._queued.add(write[0])
                    queued.append(write)
        if queued and not self._writer.put(queued, wait):
            with self._lock:
                self._queued.difference_update(key for key, _, _ in queued)
            unqueued += queued
            skipped += len(queued)
        if skipped:
            with self._lock:
                self.stats.skipped_writes += skipped
        for _, _, done in unqueued:
            if done is not None:
                done()

    def evict(self) -> None:
        """Delete the least recently used block's file (nothing below the disk keeps it)."""
        with self._lock:
            if not self._files:
                return
            key, size = self._files.popitem(last=False)
            self.stats.evictions += 1
            self.stats.blocks, self.stats.bytes = len(self._files), self.stats.bytes - size
        block_path(self.directory, key).unlink(missing_ok=True)

    def flush(self) -> None:
        """Wait until every queued block is on disk."""
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
        self._readers.shutdown()

    # -- the writer thread ------------------------------------------------------------------------

    def _write_queued(self, batch: list[list[_Write] | _Probe]) -> None:
        for item in batch:
            if isinstance(item, _Probe):
                self._probe()
                continue
            for n, (key, kv, done) in enumerate(item):
                if n:
                    self._writer.pause_for_engine()  # a demotion's hundred blocks, between engine steps
                try:
                    if self._up:
                        self._write(key, kv)
                except OSError as err:
                    self._disable(err)
                except Exception:  # this block's own failure: the others are written, every slot released
                    log.exception("writing KV block %s failed", key.hex())
                finally:
                    with self._room:
                        self._queued.discard(key)
                        self._room.notify_all()
                    if done is not None:
                        done()

    def _write(self, key: bytes, kv: torch.Tensor) -> None:
        # os-level calls and one writev: a step's blocks are written beside the engine thread, and every
        # stretch of Python here is time the engine's thread may wait for the interpreter lock
        header, payload = encode_parts(self.fingerprint, key, kv)
        folder_name, file_name = block_location(key)
        folder = os.path.join(self._directory, folder_name)
        path = os.path.join(folder, file_name)
        temporary = f"{path}.tmp{threading.get_ident()}"
        if folder not in self._folders:
            self._make_folder(Path(folder))
            self._folders.add(folder)
        try:
            descriptor = self._open(temporary)
        except FileNotFoundError:  # its folder was removed under us (a `warmkv cache clear`): made again
            self._make_folder(Path(folder))
            descriptor = self._open(temporary)
        try:
            try:
                _write_all(descriptor, [header, payload])
            finally:
                os.close(descriptor)
            os.replace(temporary, path)  # atomic: readers see the whole file or none
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        size = len(header) + len(payload)
        with self._lock:
            self._files[key] = size
            self.stats.blocks, self.stats.bytes = len(self._files), self.stats.bytes + size
            self.stats.writes += 1
        while self.stats.bytes > self.capacity_bytes and self._files:
            self.evict()

    def _open(self, path: str) -> int:
        """A new file's descriptor, with exactly the tier's mode, whatever the umask (a file whose mode cannot
        be set is removed again: it is not left behind)."""
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, self.file_mode)
        try:
            os.fchmod(descriptor, self.file_mode)
        except OSError:
            os.close(descriptor)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return descriptor

    def _create(self, path: Path) -> BinaryIO:
        return os.fdopen(self._open(str(path)), "wb")

    def _make_folder(self, folder: Path) -> None:
        if folder.is_dir():  # the usual case: one stat
            return
        for missing in reversed([folder, *folder.parents]):  # the root's own parents first
            if not missing.is_dir():
                missing.mkdir(mode=self.folder_mode, exist_ok=True)
                os.chmod(missing, self.folder_mode)  # folders it creates; the user's own stay as they are

    # -- bookkeeping ------------------------------------------------------------------------------

    def _probe(self) -> None:
        """Turn the tier on if its directory can be written (a file created, then removed), reading what
        it holds; else leave it off (one warning per outage) until the next probe."""
        if self._up:
            return
        try:
            self._make_folder(self.directory)
            probe = self.directory / f".probe{threading.get_ident()}"
            with self._create(probe) as f:
                f.write(b"warmkv")
            probe.unlink()
            files, size = self._scan()
        except OSError as err:
            self._disable(err)
            return
        with self._lock:
            self._files = files
            self.stats.blocks, self.stats.bytes = len(files), size
            self._up = True
        if self._warned:
            log.warning("disk KV tier %s is writable again: back on", self.directory)
            self._warned = False

    def _scan(self) -> tuple[OrderedDict[bytes, int], int]:
        # stale temporaries are what a crash mid-write leaves; they were never under a real name
        for temporary in self.directory.glob(f"*/*{SUFFIX}.tmp*"):
            temporary.unlink(missing_ok=True)
        found = []
        for path in self.directory.glob(f"*/*{SUFFIX}"):
            try:
                stat = path.stat()
                found.append((stat.st_mtime_ns, bytes.fromhex(path.stem), stat.st_size))
            except (OSError, ValueError):
                continue
        files = OrderedDict((key, size) for _, key, size in sorted(found))
        return files, sum(files.values())

    def _forget(self, key: bytes, miss: bool = False, corrupt: bool = False) -> None:
        with self._lock:
            self.stats.misses += miss
            self.stats.corrupt += corrupt
            size = self._files.pop(key, None)
            if size is not None:
                self.stats.blocks, self.stats.bytes = len(self._files), self.stats.bytes - size

    def _disable(self, err: OSError) -> None:
        with self._lock:
            self._up = False
            self._retry_at = time.monotonic() + self._retry_s
        if not self._warned:
            log.warning("disk KV tier disabled (%s): serving from memory tiers only; retrying every %.0f s",
                        err, self._retry_s)  # fmt: skip
            self._warned = True
