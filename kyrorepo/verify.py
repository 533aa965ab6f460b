"""Integrity checks of a repository (docs/integrity.md).

* Structure (always): key objects parse, every index segment decodes, every indexed pack
  exists with the size the index records, every backup's trees and content lists decode
  and every blob they reference is indexed with the right type; pack trailers (the pack
  tail only) list every blob the index claims.
* Data (``full_scan`` or ``subset``): whole packs are read and checked against their name
  (unkeyed BLAKE3), and every indexed blob in them is opened, decompressed and re-hashed.
  Each pack read is recorded in the audit log (kyrorepo.audit_log): subset audits read
  the least recently checked packs first, and an interrupted full scan resumes.
* Restore drill (``restore_test``): restore into a temporary directory and compare every
  file with its recorded digest.

Every damaged object is reported with the backups and files that depend on it.

Memory does not grow with the repository: verify's own view of the index (blob
locations, pack listings, the damaged blobs, per-tree results) lives in a throwaway LMDB
environment ``<cache root>/<repository id>/verify-<pid>-<token>``, removed at the end;
only the damage found is held in Python. Packs are read and checked by a small thread
pool with a bounded number of packs in flight.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import struct
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import groupby
from typing import Callable, Iterable, Iterator, TypeVar

import lmdb
import msgpack

from kyrorepo.audit_log import AuditLog, DamageNote, ScanRun, open_audit_log
from kyrorepo.errors import IntegrityError, KyroError, NotFoundError, ObjectNotFoundError, UsageError
from kyrorepo.format import BlobType, PackEntry, decode_trailer, encode_trailer
from kyrorepo.ids import ID_LEN
from kyrorepo.keys import parse_key_file
from kyrorepo.pack import pack_id_of, pack_name, parse_pack
from kyrorepo.repository import Repository
from kyrorepo.locks import pid_alive
from kyrorepo.restore import RestoreOptions, run_restore
from kyrorepo.snapshot import Snapshot, load_snapshot
from kyrorepo.tree import DIR, FILE, SYMLINK, Node, decode_content, decode_tree
from kyrorepo.walk import walk

WORK_PREFIX = "verify-"
WORK_MAP_SIZE = 1 << 40
COMMIT_EVERY = 10_000
SCAN_BATCH = 1024
FILES_CAP = 1000  # affected files listed per damaged object (and remembered per tree)
READ_BLOCK = 1024 * 1024
DEFAULT_WORKERS = 4

_LOC = struct.Struct(f"<{ID_LEN}sBIII")  # pack id, type, offset, length, raw length
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")

Progress = Callable[[int, int], None]  # (bytes read delta, files delta: always 0 here)
T = TypeVar("T")
R = TypeVar("R")


# --- options and results ---------------------------------------------------------------


@dataclass(frozen=True)
class Subset:
    """``percent`` of the packs (least recently checked first), or group n of m (by pack id)."""

    percent: float | None = None
    group: tuple[int, int] | None = None


def parse_subset(text: str) -> Subset:
    t = text.strip()
    try:
        if t.endswith("%"):
            pct = float(t[:-1])
            if 0 < pct <= 100:
                return Subset(percent=pct)
        elif "/" in t:
            n, m = (int(x) for x in t.split("/", 1))
            if 1 <= n <= m:
                return Subset(group=(n, m))
    except ValueError:
        pass
    raise UsageError(f"read-data-subset {text!r} is not understood: use N% (0 < N <= 100) or N/M (1 <= N <= M)")


@dataclass
class VerifyOptions:
    backup_ids: tuple[str, ...] = ()
    source: str | None = None
    full_scan: bool = False
    subset: Subset | None = None
    resume: bool = False
    restore_test: bool = False
    restore_dir: str | None = None
    workers: int = DEFAULT_WORKERS
    progress: Progress | None = None

    def validate(self) -> "VerifyOptions":
        if self.subset is not None and (self.full_scan or self.resume):
            raise UsageError("--read-data-subset audits part of the data: do not combine it with --full-scan or --resume")
        if self.resume:
            self.full_scan = True
        if self.workers < 1:
            raise UsageError(f"--workers {self.workers} must be at least 1")
        return self

    @property
    def mode(self) -> str:
        return "full-scan" if self.full_scan else "subset" if self.subset is not None else "structure"


@dataclass
class Damage:
    object: str
    reason: str
    blobs: int = 0  # blobs lost with it
    index_level: bool = False  # 'repair index' fixes it
    pinned: bool = False  # its backups are known up front (a damaged backup object)
    backups: set[str] = field(default_factory=set)
    files: list[tuple[str, str]] = field(default_factory=list)  # (backup id, path), at most FILES_CAP
    files_total: int = 0

    @property
    def message(self) -> str:
        return f"{self.object}: {self.reason}"


@dataclass(frozen=True)
class Coverage:
    packs_total: int
    packs_covered: int
    bytes_total: int
    bytes_covered: int
    oldest_unchecked_pack: str | None
    oldest_unchecked_age: int | None  # seconds since it was last read (or first seen)

    @property
    def percent(self) -> float:
        return 100.0 if not self.packs_total else 100.0 * self.packs_covered / self.packs_total


@dataclass(frozen=True)
class RestoreDrill:
    backup_id: str
    files: int
    bytes: int
    ok: bool
    error: str = ""


@dataclass
class VerifyReport:
    repo_id: str
    mode: str
    keys: int = 0
    index_segments: int = 0
    packs: int = 0
    pack_bytes: int = 0
    unindexed_packs: int = 0
    backups: int = 0
    packs_checked: int = 0
    packs_resumed: int = 0
    blobs_checked: int = 0
    bytes_checked: int = 0
    damage: list[Damage] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    coverage: Coverage | None = None
    restore_tests: list[RestoreDrill] = field(default_factory=list)
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.damage

    def affected_backups(self) -> list[str]:
        return sorted({b for d in self.damage for b in d.backups})

    def affected_files(self) -> list[tuple[str, str]]:
        return sorted({f for d in self.damage for f in d.files})

    def hint(self) -> str:
        if any(d.index_level for d in self.damage):
            return "run 'kyrorepo repair index', then verify again"
        if any(d.blobs and d.backups for d in self.damage):
            return "run 'kyrorepo repair snapshots --dry-run' to see what a repair would drop"
        return "restore the damaged objects from a copy of the repository"

    def error(self) -> IntegrityError:
        first = self.damage[0].message
        return IntegrityError(
            f"verify found {len(self.damage)} damaged object(s) (first: {first}); "
            f"{len(self.affected_backups())} backup(s) and {len(self.affected_files())} file(s) affected: {self.hint()}"
        )


class Lost(Exception):
    """A blob cannot be read; ``idx`` is the damage record it belongs to."""

    def __init__(self, idx: int) -> None:
        super().__init__(idx)
        self.idx = idx


# --- helpers ---------------------------------------------------------------------------


def pack_id_from_name(name: str) -> bytes | None:
    """The pack id of a ``data/<2 hex>/<64 hex>`` name, or None."""
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != "data" or len(parts[2]) != 2 * ID_LEN or parts[1] != parts[2][:2]:
        return None
    try:
        return bytes.fromhex(parts[2])
    except ValueError:
        return None


def reason_of(exc: KyroError, what: str) -> str:
    """An error's message without the object name it starts with."""
    msg = exc.message
    return msg[len(what):].lstrip(": ") if msg.startswith(what) else msg


def bounded_map(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], window: int) -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` in order, at most ``window`` items in flight."""
    pending: deque[tuple[T, Future[R]]] = deque()
    for item in items:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= window:
            done, fut = pending.popleft()
            yield done, fut.result()
    while pending:
        done, fut = pending.popleft()
        yield done, fut.result()


class WorkIndex:
    """A throwaway LMDB environment: verify's view of the index, used from one thread.

    One write transaction serves reads and writes and is committed every
    ``COMMIT_EVERY`` writes; ``scan`` reads in batches so the commits never invalidate it.
    """

    def __init__(self, cache_root: str, repo_id: str) -> None:
        base = os.path.join(cache_root, repo_id)
        os.makedirs(base, mode=0o700, exist_ok=True)
        for entry in os.listdir(base):  # left by killed runs
            pid = entry[len(WORK_PREFIX):].split("-", 1)[0]
            if entry.startswith(WORK_PREFIX) and pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(os.path.join(base, entry), ignore_errors=True)
        self.path = os.path.join(base, f"{WORK_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
        self.env = lmdb.open(self.path, map_size=WORK_MAP_SIZE, max_dbs=10, subdir=True, readahead=False,
                             sync=False, metasync=False)
        self.listed = self.env.open_db(b"listed")  # pack id -> size u64 (data/ listing)
        self.listing = self.env.open_db(b"listing")  # pack id | segment id -> length u64 | entries
        self.blobs = self.env.open_db(b"blobs", dupsort=True)  # blob id -> location(s)
        self.damaged = self.env.open_db(b"damaged")  # blob id -> damage index u32
        self.memo = self.env.open_db(b"memo")  # b"t"+tree id / b"c"+content id -> result
        self.needed = self.env.open_db(b"needed")  # pack id -> b"" (packs the chosen backups use)
        self.ok_packs = self.env.open_db(b"ok_packs")  # pack id -> size u64 (present, right size)
        self.lru = self.env.open_db(b"lru")  # checked_ns u64 BE | pack id -> size u64
        self.txn = self.env.begin(write=True)
        self.distinct_blobs = 0
        self._writes = 0

    def close(self) -> None:
        try:
            self.txn.abort()
            self.env.close()
        finally:
            shutil.rmtree(self.path, ignore_errors=True)

    def _tick(self) -> None:
        self._writes += 1
        if self._writes >= COMMIT_EVERY:
            self.txn.commit()
            self.txn = self.env.begin(write=True)
            self._writes = 0

    def put(self, db: lmdb._Database, key: bytes, value: bytes) -> None:
        self.txn.put(key, value, db=db)
        self._tick()

    def get(self, db: lmdb._Database, key: bytes) -> bytes | None:
        return self.txn.get(key, db=db)

    def add_blob(self, bid: bytes, loc: bytes) -> None:
        if self.txn.get(bid, db=self.blobs) is None:
            self.distinct_blobs += 1
        self.txn.put(bid, loc, db=self.blobs, dupdata=True)
        self._tick()

    def has_blob_at(self, bid: bytes, loc: bytes) -> bool:
        return self.txn.cursor(db=self.blobs).set_key_dup(bid, loc)

    def has_prefix(self, db: lmdb._Database, prefix: bytes) -> bool:
        cur = self.txn.cursor(db=db)
        return cur.set_range(prefix) and cur.key().startswith(prefix)

    def clear(self, db: lmdb._Database) -> None:
        self.txn.drop(db, delete=False)

    def scan(self, db: lmdb._Database, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        last: bytes | None = None
        while True:
            cur = self.txn.cursor(db=db)
            ok = cur.set_range(prefix if last is None else last)
            batch = []
            while ok and len(batch) < SCAN_BATCH:
                key = cur.key()
                if not key.startswith(prefix):
                    break
                if key != last:
                    batch.append((key, cur.value()))
                ok = cur.next()
            if not batch:
                return
            yield from batch
            last = batch[-1][0]


@dataclass
class PackResult:
    pack_id: bytes
    blobs_ok: int = 0
    bytes_read: int = 0
    notes: list[DamageNote] = field(default_factory=list)
    trailer: frozenset[PackEntry] | None = None
    notice: str = ""


def scan_pack(repo: Repository, pack_id: bytes, size: int, entries: tuple[PackEntry, ...]) -> PackResult:
    """Read a whole pack: check it against its name, its trailer, and every blob in ``entries``."""
    name = pack_name(pack_id)
    obj = f"pack {name}"
    res = PackResult(pack_id)
    try:
        data = repo.backend.load(name)
    except ObjectNotFoundError:
        res.notes.append((b"", obj, "is missing (it disappeared during verify)"))
        return res
    res.bytes_read = len(data)
    if len(data) != size:
        res.notes.append((b"", obj, f"has {len(data)} bytes, {size} were listed"))
    try:
        res.trailer = frozenset(parse_pack(repo.codec, data, name))
    except IntegrityError as exc:
        res.notes.append((b"", obj, f"trailer is damaged ({reason_of(exc, name)})"))
    for e in entries:
        what = f"{e.type.name.lower()} blob {e.id.hex()[:16]} in pack {name}"
        try:
            repo.codec.decode(e.type, e.id, data[e.offset:e.offset + e.length], what)
            res.blobs_ok += 1
        except IntegrityError as exc:
            res.notes.append((e.id, what, reason_of(exc, what)))
    if pack_id_of(data) != pack_id and not res.notes:  # else the damage found explains it
        if res.trailer is not None and not res.trailer <= set(entries):
            res.notice = (f"{obj} does not match its name, but its damaged blobs are no longer indexed "
                          "('repair snapshots' dropped them): prune will remove it")
        else:
            res.notes.append((b"", obj, "content does not match its name, though every indexed blob in it "
                              "is intact: copy the pack from a copy of the repository"))
    return res


def read_trailer(repo: Repository, pack_id: bytes, size: int) -> tuple[PackEntry, ...] | KyroError:
    try:
        return repo.pack_trailer(pack_id, size)
    except (IntegrityError, ObjectNotFoundError) as exc:
        return exc


Listing = tuple[bytes, int, tuple[PackEntry, ...]]  # (segment id, pack length, entries) of one indexed pack


def _listing(key: bytes, value: bytes) -> Listing:
    return key[ID_LEN:], _U64.unpack_from(value)[0], decode_trailer(value[_U64.size:], "verify work index")


def _union(listings: list[Listing]) -> tuple[PackEntry, ...]:
    seen: dict[PackEntry, None] = {}
    for _, _, entries in listings:
        seen.update(dict.fromkeys(entries))
    return tuple(sorted(seen, key=lambda e: e.offset))


def _age_key(s: Snapshot) -> tuple[int, int, str]:
    return s.time, s.end_time, s.id


def _path(p: bytes) -> str:
    return "/" if not p else os.fsdecode(p)


# --- the verifier ----------------------------------------------------------------------


class Verifier:
    """Runs the checks; ``repair`` reuses its findings (``blob_damage``, ``tree_damage``...)."""

    def __init__(self, repo: Repository, opts: VerifyOptions) -> None:
        self.repo = repo
        self.opts = opts.validate()
        self.report = VerifyReport(repo.config.repo_id, opts.mode)
        self.work = WorkIndex(repo.cache_root, repo.config.repo_id)
        self.audit: AuditLog | None = None
        self.pool = ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="verify")
        self.window = 2 * opts.workers
        self.good_segments: list[str] = []
        self.snapshots: list[Snapshot] = []
        self.started_ns = time.time_ns()
        self._loaded: dict[str, Snapshot | None] = {}
        self._unindexed: int | None = None
        self._record_needed = True
        self._new_blob_damage = False

    def __enter__(self) -> "Verifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.work.close()
        if self.audit is not None:
            self.audit.close()

    def run(self) -> VerifyReport:
        t0 = time.monotonic()
        self.check_keys()
        self.list_packs()
        self.load_segments()
        self.check_presence()
        self.snapshots = self.load_backups()
        for snap in self.snapshots:
            self.attribute_backup(snap)
        self.audit = open_audit_log(self.repo.cache_root, self.repo.config.repo_id)
        if not self.opts.full_scan:
            self.check_trailers()
        if self.opts.full_scan or self.opts.subset is not None:
            self.scan_data()
        if self._new_blob_damage:
            self.reattribute()
        self.check_cache()
        self.report.coverage = self.coverage()
        if self.opts.restore_test:
            for snap in self.drill_targets():
                self.report.restore_tests.append(self.drill(snap))
        if self._unindexed is not None:
            d = self.report.damage[self._unindexed]
            d.reason = (f"{d.blobs} blob(s) that backups reference are in no readable index segment: "
                        "'kyrorepo repair index' finds them if their packs exist, else they are lost")
        self.report.duration = time.monotonic() - t0
        return self.report

    # --- damage ledger --------------------------------------------------------------------

    def add_damage(self, obj: str, reason: str, blobs: Iterable[bytes] = (), index_level: bool = False,
                   backup: str | None = None) -> int:
        idx = len(self.report.damage)
        d = Damage(obj, reason, index_level=index_level, pinned=backup is not None)
        if backup is not None:
            d.backups.add(backup)
        self.report.damage.append(d)
        for bid in blobs:
            if self.work.get(self.work.damaged, bid) is None:
                self.work.put(self.work.damaged, bid, _U32.pack(idx))
                d.blobs += 1
        return idx

    def add_note(self, note: DamageNote) -> int:
        bid, obj, reason = note
        if bid:
            known = self.blob_damage(bid)
            if known is not None:
                return known  # already found reading trees and content lists
            self._new_blob_damage = True
        return self.add_damage(obj, reason, [bid] if bid else (), index_level=obj.startswith("index segment"))

    def blob_damage(self, bid: bytes) -> int | None:
        raw = self.work.get(self.work.damaged, bid)
        return None if raw is None else _U32.unpack(raw)[0]

    def attribute(self, idx: int, backup: str, path: bytes) -> None:
        d = self.report.damage[idx]
        d.backups.add(backup)
        d.files_total += 1
        if len(d.files) < FILES_CAP:
            d.files.append((backup, _path(path)))

    # --- structure --------------------------------------------------------------------------

    def check_keys(self) -> None:
        ids = self.repo.key_ids()
        self.report.keys = len(ids)
        for kid in ids:
            what = f"key object keys/{kid}"
            try:
                parse_key_file(self.repo.backend.load(f"keys/{kid}"), kid)
            except ObjectNotFoundError:
                continue
            except IntegrityError as exc:
                self.add_damage(what, reason_of(exc, what))

    def list_packs(self) -> None:
        for name, size in self.repo.backend.list("data/"):
            pid = pack_id_from_name(name)
            if pid is None:
                self.report.notices.append(f"{name} is not a pack name: ignored")
            else:
                self.work.put(self.work.listed, pid, _U64.pack(size))

    def load_segments(self) -> None:
        for name in self.repo.object_names(BlobType.INDEX):
            what = f"index segment index/{name}"
            try:
                packs = self.repo.load_index_segment(name)
            except NotFoundError:
                continue  # removed meanwhile
            except IntegrityError as exc:
                self.add_damage(what, reason_of(exc, f"index/{name}") + ": run 'kyrorepo repair index'",
                                index_level=True)
                continue
            seg = bytes.fromhex(name)
            for p in packs:
                self.work.put(self.work.listing, p.pack_id + seg, _U64.pack(p.pack_length) + encode_trailer(p.entries))
                for e in p.entries:
                    self.work.add_blob(e.id, _LOC.pack(p.pack_id, int(e.type), e.offset, e.length, e.raw_length))
            self.good_segments.append(name)
        self.report.index_segments = len(self.good_segments)

    def iter_listings(self) -> Iterator[tuple[bytes, list[Listing]]]:
        """(pack id, its listings) for every indexed pack, in id order."""
        for pid, group in groupby(self.work.scan(self.work.listing), key=lambda kv: kv[0][:ID_LEN]):
            yield pid, [_listing(k, v) for k, v in group]

    def listings(self, pid: bytes) -> list[Listing]:
        return [_listing(k, v) for k, v in self.work.scan(self.work.listing, pid)]

    def check_presence(self) -> None:
        """Every indexed pack exists with its recorded size; note packs no segment lists."""
        for pid, listings in self.iter_listings():
            self.report.packs += 1
            obj = f"pack {pack_name(pid)}"
            raw = self.work.get(self.work.listed, pid)
            if raw is None:
                segs = ", ".join(f"index/{s.hex()[:16]}" for s, _, _ in listings)
                self.add_damage(obj, f"is missing (listed by index segment {segs}): restore it from a copy",
                                [e.id for e in _union(listings)])
                continue
            size = _U64.unpack(raw)[0]
            wrong = [n for _, n, _ in listings if n != size]
            if wrong:
                self.add_damage(obj, f"has {size} bytes, the index says {wrong[0]}: it is truncated or damaged",
                                [e.id for e in _union(listings)])
                continue
            self.report.pack_bytes += size
            self.work.put(self.work.ok_packs, pid, raw)
        count = nbytes = 0
        for pid, raw in self.work.scan(self.work.listed):
            if not self.work.has_prefix(self.work.listing, pid):
                count += 1
                nbytes += _U64.unpack(raw)[0]
        if count:
            self.report.unindexed_packs = count
            self.report.notices.append(
                f"{count} pack(s) ({nbytes} bytes) are listed by no index segment (left by an interrupted backup "
                "or 'repair snapshots', or their index was lost): if backups need them 'kyrorepo repair index' "
                "indexes them, else prune removes them")

    def compare_listings(self, pid: bytes, trailer: frozenset[PackEntry]) -> list[DamageNote]:
        """The index may omit blobs of a pack (repair drops damaged ones), never claim others."""
        notes: list[DamageNote] = []
        for seg, _, entries in self.listings(pid):
            extra = [e for e in entries if e not in trailer]
            if extra:
                notes.append((b"", f"index segment index/{seg.hex()}",
                              f"lists {len(extra)} blob(s) of pack {pack_name(pid)} that its trailer does not "
                              f"(first {extra[0].id.hex()[:16]}): run 'kyrorepo repair index'"))
        return notes

    def check_trailers(self) -> None:
        jobs = self.iter_scope()
        for (pid, _), result in bounded_map(self.pool, lambda job: read_trailer(self.repo, *job), jobs,
                                            4 * self.window):
            name = pack_name(pid)
            if isinstance(result, KyroError):
                self.add_damage(f"pack {name}", f"trailer cannot be read ({reason_of(result, name)}): its blobs "
                                "stay readable through the index; restore the pack from a copy of the repository")
            else:
                for note in self.compare_listings(pid, frozenset(result)):
                    self.add_note(note)

    def iter_scope(self) -> Iterator[tuple[bytes, int]]:
        """(pack id, size) of every present pack in scope: all, or those the chosen backups use."""
        for pid, raw in self.work.scan(self.work.ok_packs):
            if not self.opts.backup_ids or self.work.get(self.work.needed, pid) is not None:
                yield pid, _U64.unpack(raw)[0]

    # --- backups ------------------------------------------------------------------------------

    def load_one(self, name: str) -> Snapshot | None:
        if name not in self._loaded:
            what = f"backup object snapshots/{name}"
            try:
                self._loaded[name] = load_snapshot(self.repo, name)
            except NotFoundError:
                self._loaded[name] = None
            except IntegrityError as exc:
                self._loaded[name] = None
                self.add_damage(what, reason_of(exc, f"snapshots/{name}") + ": the whole backup is unreadable; "
                                "restore the object from a copy of the repository", backup=name)
        return self._loaded[name]

    def latest(self, names: list[str]) -> list[str]:
        newest: dict[str, Snapshot] = {}
        for name in names:
            s = self.load_one(name)
            if s is None or self.opts.source not in (None, s.source):
                continue
            if s.source not in newest or _age_key(s) > _age_key(newest[s.source]):
                newest[s.source] = s
        if not newest:
            raise NotFoundError("no readable backups to choose 'latest' from: run 'kyrorepo list'")
        return [s.id for s in newest.values()]

    def load_backups(self) -> list[Snapshot]:
        names = self.repo.object_names(BlobType.SNAPSHOT)
        chosen: list[str] = []
        for ref in self.opts.backup_ids or ():
            chosen += self.latest(names) if ref == "latest" else [
                self.repo.resolve_object(BlobType.SNAPSHOT, ref, "backup")]
        snaps = [self.load_one(n) for n in (dict.fromkeys(chosen) if self.opts.backup_ids else names)]
        self.report.backups = len(snaps)
        return [s for s in snaps if s is not None]

    def attribute_backup(self, snap: Snapshot) -> None:
        for path, idx in self.tree_damage(snap.tree):
            self.attribute(idx, snap.id, path)

    def reattribute(self) -> None:
        """Blob damage found by reading data: walk the backups again to find who depends on it."""
        self.work.clear(self.work.memo)
        for d in self.report.damage:
            if not d.pinned:
                d.backups.clear()
                d.files.clear()
                d.files_total = 0
        self._record_needed = False
        for snap in self.snapshots:
            self.attribute_backup(snap)

    def ref_damage(self, bid: bytes, btype: BlobType) -> int | None:
        """The damage a referenced blob belongs to, or None when it is indexed with its type."""
        idx = self.blob_damage(bid)
        if idx is not None:
            return idx
        raw = self.work.get(self.work.blobs, bid)
        if raw is None:
            if self._unindexed is None:
                # Only the index's fault when some packs are unindexed; else the data is gone.
                self._unindexed = self.add_damage("referenced blobs", "", index_level=self.report.unindexed_packs > 0)
            self.work.put(self.work.damaged, bid, _U32.pack(self._unindexed))
            self.report.damage[self._unindexed].blobs += 1
            return self._unindexed
        if raw[ID_LEN] != btype:
            return self.add_damage(f"blob {bid.hex()[:16]}", f"is indexed as a {BlobType(raw[ID_LEN]).name.lower()} "
                                   f"blob but referenced as a {btype.name.lower()} blob", [bid])
        if self._record_needed:
            self.work.put(self.work.needed, raw[:ID_LEN], b"")
        return None

    def load_meta(self, bid: bytes, btype: BlobType) -> bytes:
        """Load a tree or content-list blob through verify's own index; raise Lost."""
        idx = self.ref_damage(bid, btype)
        if idx is not None:
            raise Lost(idx)
        raw = self.work.get(self.work.blobs, bid)
        assert raw is not None
        pid, _, offset, length, _ = _LOC.unpack(raw)
        name = pack_name(pid)
        what = f"{btype.name.lower()} blob {bid.hex()[:16]} in pack {name}"
        try:
            sealed = self.repo.backend.load(name, offset, length)
        except ObjectNotFoundError:
            raise Lost(self.add_damage(f"pack {name}", "is missing", [bid])) from None
        if len(sealed) != length:
            raise Lost(self.add_damage(what, "is cut short: its pack is truncated", [bid]))
        try:
            return self.repo.codec.decode(btype, bid, sealed, what)
        except IntegrityError as exc:
            raise Lost(self.add_damage(what, reason_of(exc, what), [bid])) from None

    def tree_damage(self, tid: bytes) -> list[tuple[bytes, int]]:
        """Damaged paths below a tree, relative (b"" = the tree itself; "dir/" = a whole directory)."""
        key = b"t" + tid
        raw = self.work.get(self.work.memo, key)
        if raw is not None:
            return [(bytes(p), int(i)) for p, i in msgpack.unpackb(raw)]
        what = f"tree {tid.hex()[:16]}"
        pairs: list[tuple[bytes, int]] = []
        try:
            nodes = decode_tree(self.load_meta(tid, BlobType.TREE), what)
        except Lost as lost:
            pairs = [(b"", lost.idx)]
        except IntegrityError as exc:
            pairs = [(b"", self.add_damage(f"tree blob {tid.hex()[:16]}", reason_of(exc, what), [tid]))]
        else:
            for node in nodes:
                if node.type == DIR and node.subtree is not None:
                    pairs += [(node.name + b"/" + p, i) for p, i in self.tree_damage(node.subtree)]
                elif node.type == FILE:
                    i = self.file_damage(node)
                    if i is not None:
                        pairs.append((node.name, i))
                del pairs[FILES_CAP:]
        self.work.put(self.work.memo, key, msgpack.packb(pairs))
        return pairs

    def file_damage(self, node: Node) -> int | None:
        """The damage the first unreadable part of a file belongs to, or None."""
        if node.chunks is not None:
            found = [self.ref_damage(bid, BlobType.DATA) for bid, _ in node.chunks]
            return next((i for i in found if i is not None), None)
        if node.content is None:
            return None
        key = b"c" + node.content[0]
        raw = self.work.get(self.work.memo, key)
        if raw is not None:
            return _U32.unpack(raw)[0] if raw else None
        idx = self.content_damage(node.content[0], node.content[1])
        self.work.put(self.work.memo, key, b"" if idx is None else _U32.pack(idx))
        return idx

    def content_damage(self, bid: bytes, level: int) -> int | None:
        what = f"content list {bid.hex()[:16]}"
        try:
            got, refs = decode_content(self.load_meta(bid, BlobType.CONTENT), what)
        except Lost as lost:
            return lost.idx
        except IntegrityError as exc:
            return self.add_damage(what, reason_of(exc, what), [bid])
        if got != level:
            return self.add_damage(what, f"is level {got}, expected {level}", [bid])
        found = [self.ref_damage(c, BlobType.DATA) if level == 0 else self.content_damage(c, level - 1)
                 for c, _ in refs]
        return next((i for i in found if i is not None), None)

    # --- data ---------------------------------------------------------------------------------

    def scope_key(self) -> str:
        return "all" if not self.opts.backup_ids else ",".join(sorted(s.id for s in self.snapshots))

    def scan_data(self) -> None:
        assert self.audit is not None
        run: ScanRun | None = None
        if self.opts.full_scan:
            last = self.audit.last_scan()
            if self.opts.resume and last is not None and not last.finished and last.scope == self.scope_key():
                run = last
                self.started_ns = last.started_ns
            else:
                if self.opts.resume:
                    self.report.notices.append("no interrupted full scan of these backups to resume: scanning all")
                run = self.audit.start_scan(self.scope_key(), self.started_ns)
            packs: Iterator[tuple[bytes, int]] = self.resumable(run)
        else:
            packs = self.subset_packs()
        jobs = ((pid, size, _union(self.listings(pid))) for pid, size in packs)
        for _, res in bounded_map(self.pool, lambda job: scan_pack(self.repo, *job), jobs, self.window):
            self.take(res)
        if run is not None:
            self.audit.finish_scan(run)

    def resumable(self, run: ScanRun) -> Iterator[tuple[bytes, int]]:
        """Scope packs not yet read by ``run``; those it read report what it found then."""
        assert self.audit is not None
        for pid, size in self.iter_scope():
            rec = self.audit.get(pid)
            if rec is not None and rec.checked_ns >= run.started_ns:
                self.report.packs_resumed += 1
                for note in rec.damage:
                    self.add_note(note)
                continue
            yield pid, size

    def subset_packs(self) -> Iterator[tuple[bytes, int]]:
        assert self.audit is not None and self.opts.subset is not None
        if self.opts.subset.group is not None:
            n, m = self.opts.subset.group
            yield from ((p, s) for p, s in self.iter_scope() if int.from_bytes(p[:4], "big") % m == n - 1)
            return
        total = 0
        for pid, size in self.iter_scope():
            rec = self.audit.get(pid)
            self.work.put(self.work.lru, (rec.checked_ns if rec else 0).to_bytes(8, "big") + pid, _U64.pack(size))
            total += 1
        want = math.ceil(total * self.opts.subset.percent / 100)  # type: ignore[operator]
        for i, (key, raw) in enumerate(self.work.scan(self.work.lru)):
            if i >= want:
                return
            yield key[8:], _U64.unpack(raw)[0]

    def take(self, res: PackResult) -> None:
        assert self.audit is not None
        notes = list(res.notes)
        if res.trailer is not None and self.opts.full_scan:  # subset audits compared every trailer already
            notes += self.compare_listings(res.pack_id, res.trailer)
        for note in notes:
            self.add_note(note)
        if res.notice:
            self.report.notices.append(res.notice)
        self.audit.record(res.pack_id, not notes, notes, time.time_ns())
        self.report.packs_checked += 1
        self.report.blobs_checked += res.blobs_ok
        self.report.bytes_checked += res.bytes_read
        if self.opts.progress:
            self.opts.progress(res.bytes_read, 0)

    def coverage(self) -> Coverage:
        """How much of the scope an audit has read at least once, and the longest-unread pack."""
        assert self.audit is not None
        now = time.time_ns()
        total = covered = nbytes = covered_bytes = 0
        oldest: tuple[int, bytes] | None = None
        unseen: list[bytes] = []
        for pid, size in self.iter_scope():
            rec = self.audit.get(pid)
            total += 1
            nbytes += size
            if rec is not None and rec.checked_ns:
                covered += 1
                covered_bytes += size
            if rec is None or rec.checked_ns < self.started_ns:
                since = (rec.checked_ns or rec.first_seen_ns) if rec is not None else now
                if oldest is None or since < oldest[0]:
                    oldest = (since, pid)
            if rec is None:
                unseen.append(pid)
                if len(unseen) >= SCAN_BATCH:
                    self.audit.see(unseen, now)
                    unseen = []
        self.audit.see(unseen, now)
        if not self.opts.backup_ids:
            gone = [p for p in self.audit.pack_ids() if self.work.get(self.work.ok_packs, p) is None]
            self.audit.forget(gone)
        return Coverage(total, covered, nbytes, covered_bytes, None if oldest is None else pack_name(oldest[1]),
                        None if oldest is None else max(0, (now - oldest[0]) // 1_000_000_000))

    # --- the local cache ------------------------------------------------------------------------

    def cache_matches(self) -> bool:
        n = 0
        for bid, loc in self.repo.cache.iter_blobs():
            if not self.work.has_blob_at(bid, _LOC.pack(loc.pack_id, int(loc.type), loc.offset, loc.length,
                                                        loc.raw_length)):
                return False
            n += 1
        return n == self.work.distinct_blobs

    def check_cache(self) -> None:
        """The local index cache must say what the readable segments say; rebuild it if not."""
        try:
            same = self.cache_matches()
            if not same:
                self.repo.cache.clear_index()
        except (lmdb.Error, ValueError, struct.error):
            same = False
            self.repo.reset_cache()
        if not same:
            self.report.notices.append(f"the local index cache in {self.repo.cache.path} did not match the index "
                                       "segments: rebuilt from them (it is only a cache, nothing was lost)")
        self.repo.cache.sync(set(self.good_segments), self.repo.load_index_segment)

    # --- restore drills --------------------------------------------------------------------------

    def drill_targets(self) -> list[Snapshot]:
        if self.opts.backup_ids:
            return self.snapshots
        return [s for s in self.snapshots if s.id in set(self.latest([x.id for x in self.snapshots]))]

    def drill(self, snap: Snapshot) -> RestoreDrill:
        tmp = tempfile.mkdtemp(prefix="kyrorepo-restore-test-", dir=self.opts.restore_dir)
        obj = f"backup {snap.short_id}"
        try:
            target = os.path.join(tmp, "data")
            result = run_restore(self.repo, snap, RestoreOptions(target=target, workers=self.opts.workers))
            problems = compare_restored(self.repo, snap, target)
        except IntegrityError as exc:
            self.add_damage(obj, f"restore test failed: {exc.message}", backup=snap.id)
            return RestoreDrill(snap.id, 0, 0, False, exc.message)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for path, problem in problems:
            idx = self.add_damage(obj, f"restore test: {path} {problem}", backup=snap.id)
            self.attribute(idx, snap.id, os.fsencode(path))
        return RestoreDrill(snap.id, result.files, result.bytes, not problems,
                            problems[0][1] if problems else "")


def compare_restored(repo: Repository, snap: Snapshot, target: str) -> list[tuple[str, str]]:
    """Compare a restored directory with the backup's tree: every file re-read and re-hashed."""
    problems = []
    for rel, node in walk(repo, snap.tree):
        shown = os.fsdecode(rel)
        path = os.path.join(target, shown)
        if node.type == DIR:
            if not os.path.isdir(path):
                problems.append((shown, "is not a restored directory"))
        elif node.type == SYMLINK:
            if not os.path.islink(path) or os.fsencode(os.readlink(path)) != node.target:
                problems.append((shown, "is not the recorded symlink"))
        elif node.type == FILE:
            hasher = repo.keys.hasher()
            size = 0
            try:
                with open(path, "rb") as f:
                    while block := f.read(READ_BLOCK):
                        hasher.update(block)
                        size += len(block)
            except OSError as exc:
                problems.append((shown, f"cannot be read back ({exc.strerror})"))
                continue
            if size != node.size or hasher.digest() != node.digest:
                problems.append((shown, "does not match its recorded digest"))
    return problems


def run_verify(repo: Repository, opts: VerifyOptions) -> VerifyReport:
    """Verify ``repo``; the caller holds a shared lock."""
    with Verifier(repo, opts) as v:
        return v.run()
