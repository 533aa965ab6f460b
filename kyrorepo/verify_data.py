"""Data audits: reading whole packs, and choosing which packs an audit reads.

``scan_pack`` reads a pack and checks it against its name (unkeyed BLAKE3), its trailer,
and every indexed blob in it (opened, decompressed, re-hashed); packs are read by a
small thread pool with a bounded number in flight (``bounded_map``). Which packs: all of
them (``--full-scan``, resumable through the audit log), the least recently checked N%,
or group n of m (``--read-data-subset``). ``coverage`` says how much of the scope the
audit log has seen read. See docs/integrity.md, "Audit log, coverage and resuming".
"""

from __future__ import annotations

import math
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, TypeVar

from kyrorepo.audit_log import AuditLog, DamageNote, PackRecord, ScanRun
from kyrorepo.errors import IntegrityError, KyroError, ObjectNotFoundError, UsageError
from kyrorepo.format import PackEntry
from kyrorepo.ids import ID_LEN
from kyrorepo.pack import pack_id_of, pack_name, parse_pack
from kyrorepo.repository import Repository
from kyrorepo.verify_index import SCAN_BATCH, WorkIndex
from kyrorepo.verify_report import Coverage, reason_of

T = TypeVar("T")
R = TypeVar("R")

PackJob = tuple[bytes, int, tuple[PackEntry, ...]]  # (pack id, size, the indexed blobs in it)


# --- which packs --------------------------------------------------------------------------


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


def pack_id_from_name(name: str) -> bytes | None:
    """The pack id of a ``data/<2 hex>/<64 hex>`` name, or None."""
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != "data" or len(parts[2]) != 2 * ID_LEN or parts[1] != parts[2][:2]:
        return None
    try:
        return bytes.fromhex(parts[2])
    except ValueError:
        return None


def full_scan_run(audit: AuditLog, scope: str, started_ns: int, resume: bool) -> tuple[ScanRun, bool]:
    """The unfinished full scan of ``scope`` when resuming one, else a new one; and whether it resumes."""
    last = audit.last_scan()
    if resume and last is not None and not last.finished and last.scope == scope:
        return last, True
    return audit.start_scan(scope, started_ns), False


def resumable(audit: AuditLog, scope: Iterable[tuple[bytes, int]], run: ScanRun,
              resumed: Callable[[PackRecord], None]) -> Iterator[tuple[bytes, int]]:
    """Scope packs not yet read by ``run``; those it read go to ``resumed`` (with what it found then)."""
    for pid, size in scope:
        rec = audit.get(pid)
        if rec is not None and rec.checked_ns >= run.started_ns:
            resumed(rec)
            continue
        yield pid, size


def subset_packs(audit: AuditLog, work: WorkIndex, scope: Iterable[tuple[bytes, int]],
                 subset: Subset) -> Iterator[tuple[bytes, int]]:
    if subset.group is not None:
        n, m = subset.group
        yield from ((p, s) for p, s in scope if int.from_bytes(p[:4], "big") % m == n - 1)
        return
    total = 0
    for pid, size in scope:
        rec = audit.get(pid)
        work.put_size(work.lru, (rec.checked_ns if rec else 0).to_bytes(8, "big") + pid, size)
        total += 1
    want = math.ceil(total * subset.percent / 100)  # type: ignore[operator]
    for i, (key, size) in enumerate(work.sizes(work.lru)):
        if i >= want:
            return
        yield key[8:], size


def coverage(audit: AuditLog, scope: Iterable[tuple[bytes, int]], started_ns: int) -> Coverage:
    """How much of the scope an audit has read at least once, and the longest-unread pack."""
    now = time.time_ns()
    total = covered = nbytes = covered_bytes = 0
    oldest: tuple[int, bytes] | None = None
    unseen: list[bytes] = []
    for pid, size in scope:
        rec = audit.get(pid)
        total += 1
        nbytes += size
        if rec is not None and rec.checked_ns:
            covered += 1
            covered_bytes += size
        if rec is None or rec.checked_ns < started_ns:
            since = (rec.checked_ns or rec.first_seen_ns) if rec is not None else now
            if oldest is None or since < oldest[0]:
                oldest = (since, pid)
        if rec is None:
            unseen.append(pid)
            if len(unseen) >= SCAN_BATCH:
                audit.see(unseen, now)
                unseen = []
    audit.see(unseen, now)
    return Coverage(total, covered, nbytes, covered_bytes, None if oldest is None else pack_name(oldest[1]),
                    None if oldest is None else max(0, (now - oldest[0]) // 1_000_000_000))


def forget_absent(audit: AuditLog, work: WorkIndex) -> None:
    """Drop the records of packs that are no longer present with the size the index records."""
    gone = [p for p in audit.pack_ids() if work.get(work.ok_packs, p) is None]
    audit.forget(gone)


# --- reading packs --------------------------------------------------------------------------


def bounded_map(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T],
                window: int) -> Iterator[tuple[T, R]]:
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


def scan_packs(repo: Repository, pool: ThreadPoolExecutor, jobs: Iterable[PackJob],
               window: int) -> Iterator[PackResult]:
    """``scan_pack`` each job in ``pool``, results in order, at most ``window`` packs in flight."""
    for _, res in bounded_map(pool, lambda job: scan_pack(repo, *job), jobs, window):
        yield res


def read_trailer(repo: Repository, pack_id: bytes, size: int) -> tuple[PackEntry, ...] | KyroError:
    try:
        return repo.pack_trailer(pack_id, size)
    except (IntegrityError, ObjectNotFoundError) as exc:
        return exc
