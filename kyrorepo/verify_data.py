"""Data audits: reading whole packs, and choosing which packs an audit reads.

``scan_pack`` reads a pack and checks it against its name (unkeyed BLAKE3), its trailer,
and every indexed blob in it (opened, decompressed, re-hashed); packs are read by a
small pool of worker processes (``kyrorepo.verify_pack``; threads where the backend cannot
be reopened in another process) with a bounded number in flight. Which packs: all of them
(``--full-scan``, resumable through the audit log), the least recently checked N%, or
group n of m (``--read-data-subset``). ``coverage`` says how much of the scope the
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
from kyrorepo.errors import IntegrityError, KyroError, ObjectNotFoundError
from kyrorepo.format import PackEntry
from kyrorepo.ids import ID_LEN
from kyrorepo.pack import pack_name
from kyrorepo.procpool import Runner, open_runner, ordered_map
from kyrorepo.repository import Repository
from kyrorepo.verify_index import SCAN_BATCH, WorkIndex
from kyrorepo.verify_options import Subset
from kyrorepo.verify_pack import PackFindings, PackJob, scan_pack
from kyrorepo.verify_report import Coverage

T = TypeVar("T")
R = TypeVar("R")



# --- which packs --------------------------------------------------------------------------


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
    # the indexed blobs the trailer lists, when it lacks some (then each index listing is
    # compared with it); None when it lists them all or cannot be read (a note says so)
    trailer: frozenset[PackEntry] | None = None
    notice: str = ""


def pack_result(job: PackJob, found: PackFindings) -> PackResult:
    """A worker's findings as a result; the trailer is what the index claims minus what it lacks."""
    trailer = frozenset(job.entries).difference(found.unlisted) if found.unlisted else None
    return PackResult(job.pack_id, found.blobs_ok, found.bytes_read, found.notes, trailer, found.notice)


def scan_runner(repo: Repository, pool: ThreadPoolExecutor, window: int) -> Runner:
    """What checks the packs: worker processes when the backend can be reopened in them
    (``window`` is twice the verify workers: one process per worker, at most one per CPU),
    else the threads of ``pool``; either way only the findings come back to this process.
    Made before the structure checks, so that the processes start while those run."""
    return open_runner(repo, max(1, window // 2), pool)


def scan_packs(runner: Runner, jobs: Iterable[tuple[bytes, int, bytes]]) -> Iterator[PackResult]:
    """``scan_pack`` each (pack id, size, encoded listing of its indexed blobs) job, results in order."""
    for job, found in ordered_map(runner, scan_pack, (PackJob(*j) for j in jobs)):
        yield pack_result(job, found)


def read_trailer(repo: Repository, pack_id: bytes, size: int) -> tuple[PackEntry, ...] | KyroError:
    try:
        return repo.pack_trailer(pack_id, size)
    except (IntegrityError, ObjectNotFoundError) as exc:
        return exc
