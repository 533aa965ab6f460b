"""Verify's own view of the index: a throwaway LMDB environment (docs/integrity.md, "Memory").

Verify never trusts the local index cache; it loads the index segments into this scratch
environment ``<cache root>/<repository id>/verify-<pid>-<token>``, removed at the end
(leftovers of killed runs are removed by the next run). Named databases:

* ``listed``   pack id -> size u64: the ``data/`` listing
* ``listing``  pack id | segment id -> pack length u64 | encoded trailer entries
* ``blobs``    blob id -> location(s) (duplicates kept), laid out like the index cache's
               ``blobs``: pack id | type u8 | offset u32 | length u32 | raw length u32
* ``damaged``  blob id -> damage record index u32
* ``memo``     b"t" + tree id / b"c" + content-list id -> the damage found below it
* ``needed``   pack id -> b"": packs the chosen backups use
* ``ok_packs`` pack id -> size u64: indexed packs present with the size the index records
* ``lru``      checked_ns u64 big endian | pack id -> size u64: subset audit order
"""

from __future__ import annotations

import os
import secrets
import shutil
import struct
from itertools import groupby
from typing import Iterable, Iterator

import lmdb

from kyrorepo.format import PackEntry, PackInfo, decode_trailer, encode_trailer
from kyrorepo.ids import ID_LEN
from kyrorepo.index import BlobLocation, decode_location, entry_record, record_pack
from kyrorepo.lmdbutil import MappedPages
from kyrorepo.locks import pid_alive

WORK_PREFIX = "verify-"
WORK_MAP_SIZE = 1 << 40
# writes per transaction: its dirty pages are anonymous memory, up to a page per random write
# into a large index (loading 270,000 blobs: 34 MB of anonymous memory with 10,000, 18 MB with
# 2,000, in the same time)
COMMIT_EVERY = 2_000
RELEASE_EVERY = 256  # accesses between releases of the mapped pages (16 µs each)
SCAN_BATCH = 1024

U64 = struct.Struct("<Q")
U32 = struct.Struct("<I")

Listing = tuple[bytes, int, tuple[PackEntry, ...]]  # (segment id, pack length, entries) of one indexed pack


def decode_listing(key: bytes, value: bytes) -> Listing:
    return key[ID_LEN:], U64.unpack_from(value)[0], decode_trailer(value[U64.size:], "verify work index")


def union_entries(listings: list[Listing]) -> tuple[PackEntry, ...]:
    """Every entry any listing of one pack names, once, in offset order."""
    seen: dict[PackEntry, None] = {}
    for _, _, entries in listings:
        seen.update(dict.fromkeys(entries))
    return tuple(sorted(seen, key=lambda e: e.offset))


def remove_stale(base: str) -> None:
    """Remove the work environments of runs that were killed (their process is gone)."""
    for entry in os.listdir(base):
        pid = entry[len(WORK_PREFIX):].split("-", 1)[0]
        if entry.startswith(WORK_PREFIX) and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(os.path.join(base, entry), ignore_errors=True)


class WorkIndex:
    """A throwaway LMDB environment: verify's view of the index, used from one thread.

    One write transaction serves reads and writes and is committed every
    ``COMMIT_EVERY`` writes; ``scan`` reads in batches so the commits never invalidate it.
    """

    def __init__(self, cache_root: str, repo_id: str) -> None:
        base = os.path.join(cache_root, repo_id)
        os.makedirs(base, mode=0o700, exist_ok=True)
        remove_stale(base)
        self.path = os.path.join(base, f"{WORK_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
        self.env = lmdb.open(self.path, map_size=WORK_MAP_SIZE, max_dbs=10, subdir=True, readahead=False,
                             sync=False, metasync=False)
        self.listed = self.env.open_db(b"listed")
        self.listing = self.env.open_db(b"listing")
        self.blobs = self.env.open_db(b"blobs", dupsort=True)
        self.damaged = self.env.open_db(b"damaged")
        self.memo = self.env.open_db(b"memo")
        self.needed = self.env.open_db(b"needed")
        self.ok_packs = self.env.open_db(b"ok_packs")
        self.lru = self.env.open_db(b"lru")
        self.txn = self.env.begin(write=True)
        self.distinct_blobs = 0
        self.any_damage = False  # set_damage was called: until then damage_of needs no look-up
        self._writes = 0
        self._pages = MappedPages(os.path.join(self.path, "data.mdb"))
        self._touched = 0

    def close(self) -> None:
        try:
            self.txn.abort()
            self.env.close()
        finally:
            shutil.rmtree(self.path, ignore_errors=True)

    def _tick(self, n: int = 1) -> None:
        """Count ``n`` writes (no cursor may be used after this call)."""
        self._writes += n
        if self._writes >= COMMIT_EVERY:
            self.txn.commit()
            self.txn = self.env.begin(write=True)
            self._writes = 0
        self._touch(n)

    def _touch(self, n: int = 1) -> None:
        """Count accesses; every ``RELEASE_EVERY`` drop the mapped pages they left in our RSS.

        Reads go through LMDB's memory map, and the kernel maps the page-cache pages
        around each one: over the index of an 8 GiB repository that was 100 MiB of RSS
        (``lmdbutil.MappedPages``; the pages stay in the page cache)."""
        self._touched += n
        if self._touched >= RELEASE_EVERY:
            self._touched = 0
            self._pages.release()

    # --- generic access ---------------------------------------------------------------------

    def put(self, db: lmdb._Database, key: bytes, value: bytes) -> None:
        self.txn.put(key, value, db=db)
        self._tick()

    def get(self, db: lmdb._Database, key: bytes) -> bytes | None:
        self._touch()
        return self.txn.get(key, db=db)

    def has_prefix(self, db: lmdb._Database, prefix: bytes) -> bool:
        self._touch()
        cur = self.txn.cursor(db=db)
        return cur.set_range(prefix) and cur.key().startswith(prefix)

    def clear(self, db: lmdb._Database) -> None:
        self.txn.drop(db, delete=False)

    def scan(self, db: lmdb._Database, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        last: bytes | None = None
        while True:
            cur = self.txn.cursor(db=db)
            ok = cur.set_range(prefix if last is None else last)
            batch: list[tuple[bytes, bytes]] = []
            while ok and len(batch) < SCAN_BATCH:
                key = cur.key()
                if not key.startswith(prefix):
                    break
                if key != last:
                    batch.append((key, cur.value()))
                ok = cur.next()
            if not batch:
                return
            self._touch(len(batch))
            yield from batch
            last = batch[-1][0]

    # --- pack sizes (listed, ok_packs) -------------------------------------------------------

    def put_size(self, db: lmdb._Database, pack_id: bytes, size: int) -> None:
        self.put(db, pack_id, U64.pack(size))

    def size(self, db: lmdb._Database, pack_id: bytes) -> int | None:
        raw = self.get(db, pack_id)
        return None if raw is None else U64.unpack(raw)[0]

    def sizes(self, db: lmdb._Database) -> Iterator[tuple[bytes, int]]:
        for pid, raw in self.scan(db):
            yield pid, U64.unpack(raw)[0]

    # --- the index segments (listing, blobs) ---------------------------------------------------

    def add_pack(self, segment: bytes, info: PackInfo) -> None:
        """Record one segment's listing of a pack and the location of every blob in it."""
        self.put(self.listing, info.pack_id + segment, U64.pack(info.pack_length) + encode_trailer(info.entries))
        entries = info.entries
        for start in range(0, len(entries), COMMIT_EVERY):
            cur = self.txn.cursor(db=self.blobs)
            part = entries[start:start + COMMIT_EVERY]
            for e in part:
                rec = entry_record(info.pack_id, e)
                if cur.put(e.id, rec, overwrite=False):  # the first location of this blob
                    self.distinct_blobs += 1
                else:
                    cur.put(e.id, rec, dupdata=True)
            self._tick(len(part))

    def location(self, bid: bytes) -> BlobLocation | None:
        """The first recorded location of a blob."""
        raw = self.get(self.blobs, bid)
        return None if raw is None else decode_location(raw)

    def pack_of(self, bid: bytes) -> bytes | None:
        """The pack id of a blob's first location, the rest undecoded (the backup walk asks
        this once per chunk)."""
        raw = self.get(self.blobs, bid)
        return None if raw is None else record_pack(raw)

    def packs_of(self, bids: list[bytes]) -> list[bytes | None]:
        """``pack_of`` each blob, looked up together (the backup walk asks this for all the
        chunks of a file or content list at once)."""
        get, db = self.txn.get, self.blobs
        raws = [get(b, db=db) for b in bids]
        self._touch(len(bids))
        return [None if raw is None else record_pack(raw) for raw in raws]

    def holds_exactly(self, records: Iterable[tuple[bytes, bytes]]) -> bool:
        """Whether ``records`` (blob id, location record; in id order, each id once, as the index
        cache yields them) name every blob of this index, each with one of its locations here.

        A merge of the two orders (duplicates are kept in record order): a cursor step or two
        per record, where a look-up per record cost 3 µs (0.1 s of a 30,000-blob check). Nothing
        may be written meanwhile."""
        mine = self.txn.cursor(db=self.blobs).iternext()
        n = 0
        for rec in records:
            for have in mine:
                if have >= rec:
                    break
            else:
                return False
            if have != rec:
                return False
            n += 1
            if n % SCAN_BATCH == 0:
                self._touch(SCAN_BATCH)
        return n == self.distinct_blobs

    def iter_listings(self) -> Iterator[tuple[bytes, list[Listing]]]:
        """(pack id, its listings) for every indexed pack, in id order."""
        for pid, group in groupby(self.scan(self.listing), key=lambda kv: kv[0][:ID_LEN]):
            yield pid, [decode_listing(k, v) for k, v in group]

    def iter_listed_lengths(self) -> Iterator[tuple[bytes, list[int]]]:
        """(pack id, the pack length each of its listings records) for every indexed pack, in id
        order, the entries left undecoded."""
        for pid, group in groupby(self.scan(self.listing), key=lambda kv: kv[0][:ID_LEN]):
            yield pid, [U64.unpack_from(v)[0] for _, v in group]

    def job_listing(self, pack_id: bytes) -> bytes:
        """Every blob any segment lists in this pack, encoded as a trailer: the stored listing
        itself when one segment lists the pack (the usual case), without decoding it."""
        rows = list(self.scan(self.listing, pack_id))
        if len(rows) == 1:
            return rows[0][1][U64.size:]
        return encode_trailer(union_entries([decode_listing(k, v) for k, v in rows]))

    def listings(self, pack_id: bytes) -> list[Listing]:
        return [decode_listing(k, v) for k, v in self.scan(self.listing, pack_id)]

    # --- damaged blobs ---------------------------------------------------------------------------

    def damage_of(self, bid: bytes) -> int | None:
        if not self.any_damage:  # the walk of every undamaged repository asks this once per chunk
            return None
        raw = self.get(self.damaged, bid)
        return None if raw is None else U32.unpack(raw)[0]

    def set_damage(self, bid: bytes, idx: int) -> None:
        self.any_damage = True
        self.put(self.damaged, bid, U32.pack(idx))
