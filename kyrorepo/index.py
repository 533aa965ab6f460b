"""The local LMDB cache of the repository index, and the files cache.

Lives in the cache directory (never in the repository: repositories sit on NFS, where
LMDB does not work), one environment per repository id. Named databases:

* ``blobs``    blob id -> pack id | type u8 | offset u32 | length u32 | raw length u32
* ``packs``    pack id -> pack length u64 | blob count u32
* ``segments`` index segment name -> b"" : the exact set the cache was built from
* ``loading``  index segment name -> b"" : a segment whose blobs are being added in
               several transactions; some of its blobs may be in ``blobs`` already
* ``files``    source NUL path -> msgpack [size, mtime_ns, ctime_ns, inode, digest] of the
               last backup of that source (unchanged-file detection; losing it only costs a re-read)

The cache never claims a blob the repository no longer has: ``sync`` compares the
``segments`` set with the repository's ``index/`` listing before each operation, adds
new segments, and rebuilds from scratch when any known segment has disappeared (prune
removes segments only after writing their replacements). Entries are added only for
segments that are already saved in the repository.

A segment is added in write transactions of at most ``TXN_ENTRIES`` blob entries, and
the index pages they mapped are released every ``RELEASE_EVERY`` entries, so that
adding a segment costs a bounded amount of memory whatever the sizes of the segment
and of the index (docs/performance.md, "Scaling with repository size"). The first of
those transactions records the segment in ``loading``, the last moves it to
``segments``: a process killed in between leaves blobs of a segment that ``sync`` does
not count as loaded, so ``sync`` adds it again, or rebuilds the cache if the segment
has left the repository meanwhile.
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import lmdb
import msgpack

from kyrorepo.format import BlobType, PackEntry, PackInfo, blob_type
from kyrorepo.ids import ID_LEN
from kyrorepo.lmdbutil import MappedPages, lmdb_file_intact

MAP_SIZE = 1 << 40  # address space only; the file grows as needed
# Blob entries per write transaction of ``add_segment``: LMDB holds a private copy of
# every page a transaction changes until it commits (up to 4 KiB per random entry), so
# this bounds the anonymous memory of an index write to about 4 MiB (3,900 entries in
# one transaction into the index of an 8 GiB repository: 13 MiB), for the same time.
# A backup's segment at 32 KiB chunks (8 packs, ~3,500 entries) takes 4 transactions.
TXN_ENTRIES = 1024
# Entries looked up or written between releases of the mapped index pages: a random
# lookup maps about 150 KiB (measured: the kernel maps the page-cache pages around the
# few it reads), so this bounds what a burst of lookups adds to RSS to about 10 MiB.
RELEASE_EVERY = 64
LOC = struct.Struct(f"<{ID_LEN}sBIII")  # a blob's location record: pack id, type, offset, length, raw length
_PACK = struct.Struct("<QI")


class BlobLocation(NamedTuple):
    """Where a blob is: its pack, type, offset and sealed length, and its plaintext length."""

    pack_id: bytes
    type: BlobType
    offset: int
    length: int
    raw_length: int


def decode_location(raw: bytes | memoryview) -> BlobLocation:
    pid, bt, off, ln, rl = LOC.unpack(raw)
    return BlobLocation(pid, blob_type(bt), off, ln, rl)


def entry_record(pack_id: bytes, e: PackEntry) -> bytes:
    """The location record (``LOC``) of pack entry ``e`` of pack ``pack_id``: the layout of the
    cache's ``blobs`` values, and of verify's work index, which is compared with the cache
    record for record."""
    return LOC.pack(pack_id, e.type, e.offset, e.length, e.raw_length)


def record_pack(raw: bytes) -> bytes:
    """A location record's pack id, the rest left undecoded."""
    return raw[:ID_LEN]


class IndexCache:
    def __init__(self, path: str) -> None:
        os.makedirs(path, mode=0o700, exist_ok=True)
        self.path = path
        self._pages = MappedPages(os.path.join(path, "data.mdb"))
        self.env = lmdb.open(path, map_size=MAP_SIZE, max_dbs=8, subdir=True,
                             readahead=False, metasync=False, sync=True)
        self.env.reader_check()
        self.blobs = self.env.open_db(b"blobs")
        self.packs = self.env.open_db(b"packs")
        self.segments = self.env.open_db(b"segments")
        self.loading = self.env.open_db(b"loading")
        self.files = self.env.open_db(b"files")

    def close(self) -> None:
        self.env.close()

    def _txn(self, write: bool = False) -> lmdb.Transaction:
        try:
            return self.env.begin(write=write)
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)
            return self.env.begin(write=write)

    # --- lookups ------------------------------------------------------------------------

    def lookup(self, bid: bytes) -> BlobLocation | None:
        with self._txn() as txn:
            raw = txn.get(bid, db=self.blobs)
        return None if raw is None else decode_location(raw)

    def lookup_many(self, ids: Iterable[bytes]) -> Iterator[tuple[bytes, BlobLocation | None]]:
        """Look ``ids`` up in one transaction, releasing the pages they map as it goes."""
        with self._txn() as txn:
            for n, bid in enumerate(ids, 1):
                raw = txn.get(bid, db=self.blobs)
                if n % RELEASE_EVERY == 0:
                    self.release_pages()
                yield bid, (None if raw is None else decode_location(raw))
        self.release_pages()

    def has(self, bid: bytes) -> bool:
        with self._txn() as txn:
            return txn.get(bid, db=self.blobs) is not None

    def iter_blobs(self) -> Iterator[tuple[bytes, BlobLocation]]:
        """Every indexed blob, releasing the mapped pages as it goes (a walk maps the whole file)."""
        for bid, raw in self.iter_records():
            yield bid, decode_location(raw)

    def iter_records(self) -> Iterator[tuple[bytes, bytes]]:
        """Every indexed blob as stored: (id, location record: pack id | type u8 | offset u32 |
        length u32 | raw length u32), in id order."""
        with self._txn() as txn:
            for n, (k, v) in enumerate(txn.cursor(db=self.blobs), 1):
                if n % (RELEASE_EVERY * 16) == 0:
                    self.release_pages()
                yield bytes(k), bytes(v)
        self.release_pages()

    def iter_packs(self) -> Iterator[tuple[bytes, int, int]]:
        """(pack id, length, blob count) of every indexed pack."""
        with self._txn() as txn:
            for k, v in txn.cursor(db=self.packs):
                length, count = _PACK.unpack(v)
                yield bytes(k), length, count

    def pack_length(self, pack_id: bytes) -> int | None:
        with self._txn() as txn:
            raw = txn.get(pack_id, db=self.packs)
        return None if raw is None else _PACK.unpack(raw)[0]

    def counts(self) -> tuple[int, int, int]:
        with self._txn() as txn:
            return (txn.stat(self.blobs)["entries"], txn.stat(self.packs)["entries"],
                    txn.stat(self.segments)["entries"])

    def segment_names(self) -> set[str]:
        """Segments whose every blob is in the cache."""
        with self._txn() as txn:
            return {bytes(k).decode() for k, _ in txn.cursor(db=self.segments)}

    def loading_names(self) -> set[str]:
        """Segments some of whose blobs may be in the cache: a process adding them stopped
        (or is still adding them)."""
        with self._txn() as txn:
            return {bytes(k).decode() for k, _ in txn.cursor(db=self.loading)}

    def release_pages(self) -> None:
        """Drop the index pages this process mapped from its RSS; they stay in the page cache."""
        self._pages.release()

    # --- updates ------------------------------------------------------------------------

    def add_segment(self, name: str, packs: Iterable[PackInfo]) -> None:
        """Record a saved index segment and every blob it lists (see the module docstring)."""
        packs = list(packs)
        items = sorted((e.id, entry_record(p.pack_id, e)) for p in packs for e in p.entries)
        key = name.encode()
        starts = range(0, len(items), TXN_ENTRIES) if items else range(1)
        for start in starts:
            first, last = start == 0, start + TXN_ENTRIES >= len(items)
            with self._txn(write=True) as txn:
                if first and not last:
                    txn.put(key, b"", db=self.loading)
                self._put_blobs(txn, items[start:start + TXN_ENTRIES])
                if last:
                    for p in packs:
                        txn.put(p.pack_id, _PACK.pack(p.pack_length, len(p.entries)), db=self.packs)
                    txn.put(key, b"", db=self.segments)
                    txn.delete(key, db=self.loading)
            self.release_pages()

    def _put_blobs(self, txn: lmdb.Transaction, items: list[tuple[bytes, bytes]]) -> None:
        """Put blob entries (in id order, so that neighbours share leaves), releasing mapped pages as it goes."""
        cursor = txn.cursor(db=self.blobs)
        for start in range(0, len(items), RELEASE_EVERY):
            if start:
                self.release_pages()
            cursor.putmulti(items[start:start + RELEASE_EVERY])

    def clear_index(self) -> None:
        with self._txn(write=True) as txn:
            for db in (self.blobs, self.packs, self.segments, self.loading):
                txn.drop(db, delete=False)

    def sync(self, repo_segments: set[str], load: Callable[[str], list[PackInfo]]) -> int:
        """Bring the cache in line with the repository's segment set; return segments loaded.

        A segment left half-added (in ``loading``) is added again if the repository still
        has it; if not, its blobs may be in the cache for a segment that is gone, and the
        cache is rebuilt.
        """
        known = self.segment_names()
        if (known | self.loading_names()) - repo_segments:
            self.clear_index()
            known = set()
        new = sorted(repo_segments - known)
        for name in new:
            self.add_segment(name, load(name))
        self.release_pages()
        return len(new)

    # --- files cache --------------------------------------------------------------------

    @staticmethod
    def _file_key(source: str, path: bytes) -> bytes:
        return source.encode() + b"\0" + path

    def file_stat(self, source: str, path: bytes) -> tuple[int, int, int, int, bytes] | None:
        with self._txn() as txn:
            raw = txn.get(self._file_key(source, path), db=self.files)
        if raw is None:
            return None
        try:
            size, mtime, ctime, ino, digest = msgpack.unpackb(raw)
            return int(size), int(mtime), int(ctime), int(ino), bytes(digest)
        except (ValueError, TypeError):
            return None

    def put_file_stats(self, source: str, items: Iterable[tuple[bytes, tuple[int, int, int, int, bytes]]]) -> None:
        with self._txn(write=True) as txn:
            for path, st in items:
                txn.put(self._file_key(source, path), msgpack.packb(list(st)), db=self.files)
        self.release_pages()


def open_cache(cache_root: str, repo_id: str) -> IndexCache:
    path = os.path.join(cache_root, repo_id, "index")
    if not lmdb_file_intact(path):
        # Opening a truncated LMDB file would crash with SIGBUS: it is only a cache.
        shutil.rmtree(path, ignore_errors=True)
    try:
        return IndexCache(path)
    except lmdb.Error:
        # A damaged cache is only a cache: throw it away and start again.
        shutil.rmtree(path, ignore_errors=True)
        return IndexCache(path)

