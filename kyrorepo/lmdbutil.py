"""LMDB helpers shared by the local caches (index cache, audit log)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
import sys
from collections.abc import Callable

LMDB_MAGIC = 0xBEEFC0DE
_META = struct.Struct("<II16x4s92xQQ")  # magic, version, page size (free db pad), last page, txn id
_META_OFFSET = 16  # after the page header


def lmdb_file_intact(path: str) -> bool:
    """False when the LMDB environment in ``path`` is shorter than its newest meta page says.

    LMDB maps the file: opening a truncated one crashes the process with SIGBUS instead of
    raising, so a cache is checked with this before it is opened.
    """
    try:
        with open(os.path.join(path, "data.mdb"), "rb") as f:
            head = f.read(_META_OFFSET + _META.size)
            if len(head) < _META_OFFSET + _META.size:
                return not head
            magic, _, psize_raw, last, txnid = _META.unpack_from(head, _META_OFFSET)
            psize = int.from_bytes(psize_raw, "little")
            if magic != LMDB_MAGIC or psize < 512 or psize & (psize - 1):
                return False
            f.seek(psize)
            other = f.read(_META_OFFSET + _META.size)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return True
    if len(other) == _META_OFFSET + _META.size:
        magic2, _, _, last2, txnid2 = _META.unpack_from(other, _META_OFFSET)
        if magic2 == LMDB_MAGIC and txnid2 > txnid:
            last = last2
    return size >= (last + 1) * psize


_MADV_DONTNEED = 4  # Linux
SMALL_FILE = 16 * 1024 * 1024  # a file this small is left mapped: it cannot add more RSS than its size
_madvise: Callable[..., int] | None = None


def _libc_madvise() -> Callable[..., int] | None:
    global _madvise
    if _madvise is None and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            _madvise = ctypes.CDLL(None).madvise
    return _madvise


def _mappings_of(target: str) -> list[tuple[int, int]]:
    """Address ranges at which this process maps the file ``target`` (a real path)."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return []
    if target not in maps:
        return []
    out = []
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == target:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end))
    return out


class MappedPages:
    """Unmaps from this process the pages of one file that it touched through mmap.

    The LMDB index is memory-mapped: a lookup reads a few B-tree pages, and the kernel
    maps the page-cache pages around them too (about 150 KiB per random lookup in the
    index of an 8 GiB repository), so RSS grew with the repository (1 GiB backed up
    into a 32 GiB repository: RssFile 120 MiB, peak RSS 266 MiB). ``MADV_DONTNEED`` on a
    read-only shared file mapping only drops the page table entries: the pages stay in
    the page cache, the next access maps them again, LMDB's readers (and a write
    transaction, which never writes through the map) see the same bytes.

    A file of at most ``SMALL_FILE`` bytes is left mapped (the index of a repository of
    up to about 2 GiB): its pages cannot add more RSS than that, and dropping them every
    few dozen lookups made each lookup fault them in again (27,000 lookups of a restore
    took 0.15 s instead of 0.05 s).

    ``release`` is called every few dozen lookups, so it must be cheap: the address
    range is found once in /proc/self/maps, then only checked with a readlink of
    /proc/self/map_files (is that exact range still a mapping of this file?) before
    each use. Advising a stale range that now holds other memory would zero it; a
    range that is no longer this file's mapping is looked up again. Linux only; a
    no-op elsewhere or on any error.
    """

    def __init__(self, path: str) -> None:
        self.target = os.path.realpath(path)
        self._ranges: list[tuple[int, int]] = []

    def _still_mapped(self) -> bool:
        try:
            return bool(self._ranges) and all(
                os.readlink(f"/proc/self/map_files/{start:x}-{end:x}") == self.target for start, end in self._ranges)
        except OSError:
            return False

    def release(self) -> None:
        madvise = _libc_madvise()
        if madvise is None:
            return
        try:
            if os.stat(self.target).st_size <= SMALL_FILE:
                return
        except OSError:
            return
        if not self._still_mapped():
            self._ranges = _mappings_of(self.target)
        for start, end in self._ranges:
            madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)

