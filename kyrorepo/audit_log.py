"""The local audit log: which packs a data audit has read, when, and what it found.

``verify --full-scan`` and ``verify --read-data-subset`` record every pack they read, so
that repeated subset audits read the least recently checked packs first and cover the
whole repository, and an interrupted full scan can resume where it stopped.

Lives in the cache directory beside the index cache, one LMDB environment per
repository: ``<cache root>/<repository id>/audit``. Named databases:

* ``packs`` pack id -> msgpack ``[checked_ns, first_seen_ns, ok, damage]``; ``checked_ns``
  is 0 for a pack seen but never read, ``damage`` a list of ``[blob id or b"", object,
  reason]`` found by the last read.
* ``meta``  ``b"scan"`` -> msgpack ``{"started_ns", "scope", "finished"}``: the last full scan.

It is only a record: losing it loses the history (the next subset audit starts a new
cycle), never data. A broken one is thrown away like the index cache.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Iterable, Iterator

import lmdb
import msgpack

from kyrorepo.lmdbutil import lmdb_file_intact

MAP_SIZE = 1 << 36
_SCAN_KEY = b"scan"
_BATCH = 1024

DamageNote = tuple[bytes, str, str]  # (blob id or b"", object, reason)


@dataclass(frozen=True)
class PackRecord:
    checked_ns: int
    first_seen_ns: int
    ok: bool
    damage: tuple[DamageNote, ...] = ()


@dataclass(frozen=True)
class ScanRun:
    started_ns: int
    scope: str
    finished: bool


def _encode(rec: PackRecord) -> bytes:
    return msgpack.packb([rec.checked_ns, rec.first_seen_ns, rec.ok, [list(d) for d in rec.damage]],
                         use_bin_type=True)


def _decode(raw: bytes) -> PackRecord | None:
    try:
        checked, seen, ok, damage = msgpack.unpackb(raw, raw=False)
        notes = tuple((bytes(b), str(o), str(r)) for b, o, r in damage)
        return PackRecord(int(checked), int(seen), bool(ok), notes)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return None  # an unreadable record counts as "never checked"


class AuditLog:
    def __init__(self, path: str) -> None:
        os.makedirs(path, mode=0o700, exist_ok=True)
        self.path = path
        self.env = lmdb.open(path, map_size=MAP_SIZE, max_dbs=4, subdir=True, readahead=False,
                             metasync=False, sync=False)
        self.env.reader_check()
        self.packs = self.env.open_db(b"packs")
        self.meta = self.env.open_db(b"meta")

    def close(self) -> None:
        self.env.sync(True)
        self.env.close()

    def get(self, pack_id: bytes) -> PackRecord | None:
        with self.env.begin() as txn:
            raw = txn.get(pack_id, db=self.packs)
        return None if raw is None else _decode(raw)

    def record(self, pack_id: bytes, ok: bool, damage: Iterable[DamageNote], now_ns: int) -> None:
        """Record that ``pack_id`` was read at ``now_ns`` (committed at once: a scan resumes from here)."""
        with self.env.begin(write=True) as txn:
            raw = txn.get(pack_id, db=self.packs)
            old = None if raw is None else _decode(raw)
            seen = old.first_seen_ns if old is not None and old.first_seen_ns else now_ns
            txn.put(pack_id, _encode(PackRecord(now_ns, seen, ok, tuple(damage))), db=self.packs)

    def see(self, pack_ids: Iterable[bytes], now_ns: int) -> None:
        """Note the first time each pack was seen (the age of a never-checked pack counts from it)."""
        with self.env.begin(write=True) as txn:
            for pid in pack_ids:
                if txn.get(pid, db=self.packs) is None:
                    txn.put(pid, _encode(PackRecord(0, now_ns, True)), db=self.packs)

    def pack_ids(self) -> Iterator[bytes]:
        """Every recorded pack id, in batches of short read transactions."""
        last: bytes | None = None
        while True:
            with self.env.begin() as txn:
                cur = txn.cursor(db=self.packs)
                ok = cur.first() if last is None else cur.set_range(last)
                batch: list[bytes] = []
                while ok and len(batch) < _BATCH:
                    key = bytes(cur.key())
                    if key != last:
                        batch.append(key)
                    ok = cur.next()
            if not batch:
                return
            yield from batch
            last = batch[-1]

    def forget(self, pack_ids: Iterable[bytes]) -> None:
        with self.env.begin(write=True) as txn:
            for pid in pack_ids:
                txn.delete(pid, db=self.packs)

    # --- full scans -------------------------------------------------------------------------

    def start_scan(self, scope: str, now_ns: int) -> ScanRun:
        run = ScanRun(now_ns, scope, False)
        self._put_scan(run)
        return run

    def finish_scan(self, run: ScanRun) -> None:
        self._put_scan(ScanRun(run.started_ns, run.scope, True))

    def last_scan(self) -> ScanRun | None:
        with self.env.begin() as txn:
            raw = txn.get(_SCAN_KEY, db=self.meta)
        if raw is None:
            return None
        try:
            d = msgpack.unpackb(raw, raw=False)
            return ScanRun(int(d["started_ns"]), str(d["scope"]), bool(d["finished"]))
        except (ValueError, TypeError, KeyError, msgpack.ExtraData, msgpack.FormatError):
            return None

    def _put_scan(self, run: ScanRun) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(_SCAN_KEY, msgpack.packb({"finished": run.finished, "scope": run.scope,
                                              "started_ns": run.started_ns}), db=self.meta)


def open_audit_log(cache_root: str, repo_id: str) -> AuditLog:
    path = os.path.join(cache_root, repo_id, "audit")
    if not lmdb_file_intact(path):
        shutil.rmtree(path, ignore_errors=True)
    try:
        return AuditLog(path)
    except lmdb.Error:
        shutil.rmtree(path, ignore_errors=True)  # only a record: start a new one
        return AuditLog(path)
