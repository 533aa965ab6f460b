"""Pack files: PACK_MAGIC | sealed blobs | sealed trailer | footer (docs/format.md, "Packs").

The pack id is the unkeyed BLAKE3 of the whole pack, so anybody holding the files can
check a pack against its name without the key. This module builds and parses bytes;
it does no I/O.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable

import blake3

from kyrorepo.blob import BlobCodec
from kyrorepo.errors import IntegrityError
from kyrorepo.format import (
    PACK_FOOTER,
    PACK_MAGIC,
    BlobType,
    PackEntry,
    decode_footer,
    decode_trailer,
    encode_footer,
    encode_trailer,
)


def pack_name(pack_id: bytes) -> str:
    h = pack_id.hex()
    return f"data/{h[:2]}/{h}"


def pack_hasher(threads: bool = True) -> "blake3.blake3":
    """The hash naming a pack (unkeyed BLAKE3 of its bytes), to be fed piece by piece; on all
    cores when ``threads``. That costs 20-30% more CPU time per byte (2.2-2.6 instead of
    2.6-3.7 GB per CPU second here), so a caller whose other work already keeps every core
    busy passes False."""
    return blake3.blake3(max_threads=blake3.blake3.AUTO if threads else 1)


def pack_id_of(data: bytes | bytearray | memoryview) -> bytes:
    h = pack_hasher()
    h.update(data)
    return h.digest()


DEFAULT_CAPACITY = 17 * 1024 * 1024  # a 16 MiB pack, the blob that fills it, its trailer


class PackBuffers:
    """Pack buffers handed from one pack to the next, so that filling a pack touches no new memory.

    A fresh 16 MiB buffer per pack, plus the bytes copy handed to the backend, cost
    8,192 page faults per pack (0.5M per GiB, about 1.3 s of system time per GiB on the
    project machine, where touching memory a process has not used before is expensive).
    A buffer is a private anonymous mapping: its pages are touched only as a pack fills
    them, it is given back to the system as soon as it is dropped (glibc's heap would
    keep it, fragmented, see ``restore.tune_allocator``), and a ``PackBuilder`` takes
    one when its first blob arrives and gives it back once its pack is saved or dropped.
    One pack being filled while the one before is saved is the steady state of the
    backup pipeline: the saved pack's buffer is idle by the time the next pack starts,
    so one idle buffer is kept (``keep``); a third one, needed only while a save falls
    behind, is dropped when it comes back (an idle buffer counts in RSS as much as a
    busy one). Thread-safe.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY, keep: int = 1) -> None:
        self.capacity = capacity
        self.keep = keep
        self._idle: list[mmap.mmap] = []
        self._taken = 0
        self._changed = threading.Condition()

    def take(self, at_least: int = 0) -> mmap.mmap:
        with self._changed:
            self._taken += 1
            self._changed.notify_all()
            if self._idle and len(self._idle[-1]) >= at_least:
                return self._idle.pop()
        return mmap.mmap(-1, max(self.capacity, at_least), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def give(self, buf: mmap.mmap) -> None:
        """Keep ``buf`` for another pack, or drop it (it is unmapped once no view of it is left)."""
        with self._changed:
            self._taken -= 1
            self._changed.notify_all()
            if len(self._idle) < self.keep:
                self._idle.append(buf)

    def wait_for_room(self, limit: int, unless: Callable[[], bool]) -> None:
        """Block while ``limit`` buffers are taken, unless ``unless()`` says a buffer is not needed.

        Only for a caller that holds no buffer and no lock a buffer holder needs: the
        buffers come back from packs being saved by another thread.
        """
        with self._changed:
            while self._taken >= limit and not unless():
                self._changed.wait()

    def clear(self) -> None:
        """Let the idle buffers go (after a backup, so a long-lived process does not keep them)."""
        with self._changed:
            self._idle.clear()


class PackBuilder:
    """Collects sealed blobs; ``finish`` appends the sealed trailer and footer.

    The pack is assembled in a buffer from ``buffers`` (or from buffers of its own) that
    is usually larger than the pack: ``size`` bytes of it are in use. ``finish`` returns
    a view of those bytes, valid until ``release`` gives the buffer back for another pack.
    """

    def __init__(self, codec: BlobCodec, buffers: PackBuffers | None = None) -> None:
        self.codec = codec
        self.entries: list[PackEntry] = []
        self.size = len(PACK_MAGIC)
        self._buffers = buffers if buffers is not None else PackBuffers(keep=0)
        self._buf: mmap.mmap | None = None

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def holds_buffer(self) -> bool:
        return self._buf is not None

    def _open(self) -> None:
        """Take a buffer and start it with the pack magic, when the pack gets its first bytes."""
        if self._buf is None:
            self._buf = self._buffers.take()
            self._buf[:len(PACK_MAGIC)] = PACK_MAGIC
            self.size = len(PACK_MAGIC)

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` to the end of the pack, moving to a larger buffer if it does not fit."""
        self._open()
        assert self._buf is not None
        start = self.size
        end = start + len(data)
        if end > len(self._buf):
            larger = self._buffers.take(at_least=max(end, 2 * len(self._buf)))
            with memoryview(self._buf) as old:
                larger[:start] = old[:start]
            self._buffers.give(self._buf)
            self._buf = larger
        self._buf[start:end] = data
        self.size = end

    def add(self, btype: BlobType, bid: bytes, sealed: bytes | bytearray | memoryview, raw_length: int) -> None:
        self._open()
        self.entries.append(PackEntry(bid, btype, self.size, len(sealed), raw_length))
        self._write(sealed)

    def finish(self) -> tuple[bytes, memoryview, tuple[PackEntry, ...]]:
        """Return (pack id, view of the pack bytes, entries); the view lives until ``release``."""
        plain = encode_trailer(self.entries)
        tid = self.codec.keys.blob_id(plain)
        sealed = self.codec.encode(BlobType.TRAILER, tid, plain)
        self._write(sealed)
        self._write(encode_footer(tid, len(sealed)))
        assert self._buf is not None
        data = memoryview(self._buf)[:self.size]
        return pack_id_of(data), data, tuple(self.entries)

    def release(self) -> None:
        """Give the buffer back for another pack; every view ``finish`` returned must be unused."""
        buf, self._buf = self._buf, None
        if buf is not None:
            self._buffers.give(buf)


TailLoader = Callable[[int, int], bytes]  # (offset, length) -> bytes


def read_trailer(codec: BlobCodec, pack_length: int, load: TailLoader, what: str) -> tuple[PackEntry, ...]:
    """Read and open a pack's trailer, loading only the pack's tail through ``load``."""
    if pack_length < len(PACK_MAGIC) + PACK_FOOTER.size:
        raise IntegrityError(f"{what} is too short ({pack_length} bytes) to be a pack")
    footer = load(pack_length - PACK_FOOTER.size, PACK_FOOTER.size)
    tid, tlen = decode_footer(footer, what)
    start = pack_length - PACK_FOOTER.size - tlen
    if start < len(PACK_MAGIC):
        raise IntegrityError(f"{what}: trailer length {tlen} does not fit the pack")
    plain = codec.decode(BlobType.TRAILER, tid, load(start, tlen), f"{what} trailer")
    entries = decode_trailer(plain, what)
    check_layout(entries, start, what)
    return entries


def check_layout(entries: tuple[PackEntry, ...], body_end: int, what: str) -> None:
    """Blobs must lie inside the pack body, in order, without overlapping."""
    pos = len(PACK_MAGIC)
    for e in entries:
        if e.offset < pos or e.offset + e.length > body_end:
            raise IntegrityError(f"{what}: blob {e.id.hex()[:16]} lies outside the pack body")
        pos = e.offset + e.length


def parse_pack(codec: BlobCodec, data: bytes, what: str) -> tuple[PackEntry, ...]:
    """Entries of a whole pack held in memory."""
    return read_trailer(codec, len(data), lambda off, n: data[off:off + n], what)
