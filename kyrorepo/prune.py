"""forget and prune: remove backups a retention policy does not keep, then collect garbage.

Order of every change (docs/design.md, "Prune and concurrency"); a crash at any instant
leaves a repository that verifies and restores every kept backup, and running prune
again finishes the job:

1. snapshot objects of forgotten backups are removed;
2. blobs still referenced are marked by walking every remaining backup from its roots
   (``referenced_roots``) into an LMDB set under the cache directory (memory stays flat);
3. partly used and small packs are repacked: their used blobs move, still sealed, into
   new packs (journaled locally before they are saved);
4. new index segments listing every surviving and new pack are written;
5. the old index segments are removed and the local cache is rebuilt;
6. wholly unused and repacked packs are removed (journaled before step 5).

The whole of ``prune``/``forget`` runs under the repository's exclusive lock; backups
hold a shared lock for their whole run, so none can start or be running meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator, Sequence


from kyrorepo.crypto import SEAL_OVERHEAD
from kyrorepo.errors import IntegrityError, LockedError, ObjectNotFoundError
from kyrorepo.format import (
    ENTRY,
    PACK_FOOTER,
    PACK_MAGIC,
    PACKED_TYPES,
    TRAILER_HEADER,
    BlobType,
    PackInfo,
    encode_index,
)
from kyrorepo.ids import ID_LEN
from kyrorepo.pack import PackBuilder, pack_id_of, pack_name, parse_pack
from kyrorepo.repository import Repository
from kyrorepo.prune_state import WALKED_CONTENT, WALKED_TREE, PruneState
from kyrorepo.retention import DAY, Duration, ForgetPlan, Policy, plan_forget
from kyrorepo.snapshot import Snapshot, list_snapshots
from kyrorepo.tree import DIR, FILE, load_content
from kyrorepo.walcapture import load_captures
from kyrorepo.walk import load_tree
from kyrorepo.walretention import WalRetention, plan_wal_retention

CRASH_ENV = "KYROREPO_TEST_CRASH_AT"
CRASH_POINTS = ("forget", "walcap", "repack", "index-write", "index-remove", "pack-delete")
DEFAULT_UNINDEXED_GRACE = DAY
DEFAULT_MAX_UNUSED_PCT = 5.0
SMALL_PACK_DIVISOR = 4  # packs below pack_size / 4 are small and get merged
SEGMENT_MAX_ENTRIES = 65536
SMALL_SEGMENT_BYTES = 256 * 1024
SMALL_SEGMENTS_TO_COMPACT = 8
LOCK_RETRY_STEP = 1.0


def crash_point(name: str) -> None:
    """Test hook: with KYROREPO_TEST_CRASH_AT=<name> the process dies here as if SIGKILLed."""
    if os.environ.get(CRASH_ENV) == name:
        os._exit(137)


@contextlib.contextmanager
def locked(repo: Repository, exclusive: bool, retry_seconds: float = 0) -> Iterator[None]:
    """Hold the repository lock, retrying for up to ``retry_seconds`` while another holds it."""
    deadline = time.monotonic() + retry_seconds
    stack = contextlib.ExitStack()
    while True:
        try:
            stack.enter_context(repo.lock(exclusive=exclusive))
            break
        except LockedError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(LOCK_RETRY_STEP)
    with stack:
        yield


# --- forget -----------------------------------------------------------------------------


def forget(repo: Repository, snaps: Iterable[Snapshot]) -> int:
    """Remove snapshot objects; their data stays until garbage is collected."""
    n = 0
    for s in snaps:
        with contextlib.suppress(ObjectNotFoundError):
            repo.remove_object(BlobType.SNAPSHOT, s.id)
        n += 1
        crash_point("forget")
    return n


# --- reachability ---------------------------------------------------------------------


@dataclass(frozen=True)
class Roots:
    """Where reachability starts: tree ids, content-list roots (id, level), plain blob ids."""

    trees: tuple[bytes, ...] = ()
    contents: tuple[tuple[bytes, int], ...] = ()
    blobs: tuple[bytes, ...] = ()


def referenced_roots(snapshots: Iterable[Snapshot], wal: WalRetention) -> Roots:
    """Roots of every blob that must survive: the trees of ``snapshots`` and the data of
    the WAL captures (``walcaps/``) kept for point-in-time recovery."""
    return Roots(trees=tuple(s.tree for s in snapshots), contents=wal.contents, blobs=wal.blobs)


def mark(repo: Repository, state: PruneState, roots: Roots) -> int:
    """Put every blob reachable from ``roots`` into the ``used`` set; return how many."""
    state.clear("used")
    with state.adder() as used:
        def content(bid: bytes, level: int) -> None:
            if not used.walk(bid, WALKED_CONTENT):
                return
            for ref, _ in load_content(bid, level, lambda b: repo.load_blob(b, BlobType.CONTENT)):
                if level == 0:
                    used.add(ref)
                else:
                    content(ref, level - 1)

        for bid in roots.blobs:
            used.add(bid)
        for bid, level in roots.contents:
            content(bid, level)
        stack = list(roots.trees)
        while stack:
            tree_id = stack.pop()
            if not used.walk(tree_id, WALKED_TREE):
                continue
            for node in load_tree(repo, tree_id):
                if node.type == DIR and node.subtree is not None:
                    stack.append(node.subtree)
                elif node.type == FILE and node.chunks is not None:
                    for ref, _ in node.chunks:
                        used.add(ref)
                elif node.type == FILE and node.content is not None:
                    content(*node.content)
        return used.new


# --- planning ---------------------------------------------------------------------------


@dataclass
class GcOptions:
    max_unused_pct: float | None = DEFAULT_MAX_UNUSED_PCT  # None: see max_unused_bytes
    max_unused_bytes: int | None = None  # None with pct None: unlimited
    max_repack_size: int | None = None
    unindexed_grace: int = DEFAULT_UNINDEXED_GRACE
    now: int = 0


@dataclass
class PackStat:
    length: int
    count: int
    used_bytes: int = 0
    used_blobs: int = 0

    def unused(self) -> int:
        overhead = (len(PACK_MAGIC) + PACK_FOOTER.size + TRAILER_HEADER.size + SEAL_OVERHEAD + 1
                    + self.count * ENTRY.size)
        return max(0, self.length - self.used_bytes - overhead)


@dataclass
class GcPlan:
    packs: int = 0
    used_blobs: int = 0
    used_bytes: int = 0
    unused_bytes: int = 0
    delete: dict[bytes, int] = field(default_factory=dict)  # indexed, wholly unused -> length
    repack: dict[bytes, PackStat] = field(default_factory=dict)
    drop_missing: list[bytes] = field(default_factory=list)  # indexed, absent, unused
    unindexed_delete: dict[bytes, int] = field(default_factory=dict)
    unindexed_waiting: int = 0
    segments: list[str] = field(default_factory=list)
    rewrite_index: bool = False

    def freed_estimate(self) -> int:
        return (sum(self.delete.values()) + sum(self.unindexed_delete.values())
                + sum(p.length - p.used_bytes for p in self.repack.values()))

    def removed_from_index(self) -> set[bytes]:
        return set(self.delete) | set(self.repack) | set(self.drop_missing)


def _present_packs(repo: Repository) -> dict[bytes, int]:
    out = {}
    for name, size in repo.backend.list("data/"):
        try:
            pid = bytes.fromhex(name.rsplit("/", 1)[-1])
        except ValueError:
            continue
        if len(pid) == ID_LEN and name == pack_name(pid):
            out[pid] = size
    return out


def pack_stats(repo: Repository, state: PruneState) -> dict[bytes, PackStat]:
    """Per indexed pack: length and the bytes of the used blobs whose indexed copy it holds."""
    stats = {pid: PackStat(length, count) for pid, length, count in repo.cache.iter_packs()}
    with state.reader("used") as used:
        for bid, loc in repo.cache.iter_blobs():
            st = stats.get(loc.pack_id)
            if st is None:
                continue
            if loc.type not in PACKED_TYPES or used(bid) is not None:  # unknown types are kept
                st.used_bytes += loc.length
                st.used_blobs += 1
    return stats


def _allowed_unused(opts: GcOptions, used_bytes: int) -> float:
    if opts.max_unused_pct is not None:
        pct = min(opts.max_unused_pct, 99.9)
        return used_bytes * pct / (100 - pct)
    return float("inf") if opts.max_unused_bytes is None else float(opts.max_unused_bytes)


def plan_gc(repo: Repository, state: PruneState, opts: GcOptions, record: bool) -> GcPlan:
    """Decide which packs to delete and repack; ``record`` notes unindexed packs first seen."""
    stats = pack_stats(repo, state)
    present = _present_packs(repo)
    plan = GcPlan(packs=len(stats))
    budget = float("inf") if opts.max_repack_size is None else opts.max_repack_size
    small_limit = repo.config.pack_size // SMALL_PACK_DIVISOR
    candidates = []
    missing = [pid for pid, st in stats.items() if pid not in present and st.used_blobs]
    if missing:
        raise IntegrityError(f"pack {pack_name(missing[0])} and {len(missing) - 1} other(s) that used blobs live in "
                             "are missing: no garbage was collected; run 'kyrorepo verify', then repair the index")
    for pid, st in stats.items():
        plan.used_blobs += st.used_blobs
        plan.used_bytes += st.used_bytes
        if pid not in present:
            plan.drop_missing.append(pid)
        elif st.used_blobs == 0:
            plan.delete[pid] = st.length
        else:
            plan.unused_bytes += st.unused()
            candidates.append((pid, st))
    # Most wasteful packs first, until the unused space left is within the limit.
    candidates.sort(key=lambda c: c[1].unused() / max(c[1].length, 1), reverse=True)
    unused_left = plan.unused_bytes
    allowed = _allowed_unused(opts, plan.used_bytes)
    for pid, st in candidates:
        if unused_left <= allowed or st.unused() == 0:
            break
        if st.length <= budget:
            plan.repack[pid] = st
            budget -= st.length
            unused_left -= st.unused()
    small = [(pid, st) for pid, st in candidates if st.length < small_limit and pid not in plan.repack]
    if len(small) + sum(1 for st in plan.repack.values() if st.length < small_limit) >= 2:
        for pid, st in sorted(small, key=lambda c: c[1].length):
            if st.length <= budget:
                plan.repack[pid] = st
                budget -= st.length
    _plan_unindexed(plan, state, present, set(stats), opts, record)
    seg_sizes = {name.split("/", 1)[1]: size for name, size in repo.backend.list("index/")}
    plan.segments = sorted(seg_sizes)
    small_segments = sum(1 for size in seg_sizes.values() if size < SMALL_SEGMENT_BYTES)
    plan.rewrite_index = bool(plan.removed_from_index()) or small_segments >= SMALL_SEGMENTS_TO_COMPACT
    return plan


def _plan_unindexed(plan: GcPlan, state: PruneState, present: dict[bytes, int], indexed: set[bytes],
                    opts: GcOptions, record: bool) -> None:
    """Unindexed packs: ours from a killed prune go now; others after the grace period."""
    journaled = set(state.items("own")) | set(state.items("doomed"))
    seen = state.items("seen")
    first_seen = []
    for pid, size in present.items():
        if pid in indexed:
            continue
        if pid in journaled or opts.now - seen.get(pid, opts.now) >= opts.unindexed_grace:
            plan.unindexed_delete[pid] = size
        else:
            plan.unindexed_waiting += 1
            if pid not in seen:
                first_seen.append(pid)
    if record:
        state.put("seen", first_seen, opts.now)
        state.delete("seen", [p for p in seen if p not in present or p in indexed])
        state.delete("own", [p for p in journaled if p in indexed or p not in present])
        state.delete("doomed", [p for p in journaled if p in indexed or p not in present])


# --- execution --------------------------------------------------------------------------


@dataclass
class GcResult:
    plan: GcPlan
    packs_written: int = 0
    blobs_moved: int = 0
    bytes_written: int = 0
    packs_removed: int = 0
    bytes_removed: int = 0
    segments_written: int = 0
    segments_removed: int = 0
    warnings: list[str] = field(default_factory=list)


def repack(repo: Repository, state: PruneState, plan: GcPlan, result: GcResult) -> list[PackInfo]:
    """Move the used blobs of ``plan.repack`` packs, still sealed, into new packs."""
    infos: list[PackInfo] = []
    builder = PackBuilder(repo.codec)

    def save(b: PackBuilder) -> None:
        pid, data, entries = b.finish()
        state.put("own", [pid], int(time.time()))
        repo.backend.save(pack_name(pid), data)
        infos.append(PackInfo(pid, len(data), entries))
        result.packs_written += 1
        result.bytes_written += len(data)
        crash_point("repack")

    with state.reader("used") as used:
        for pid in sorted(plan.repack):
            name = pack_name(pid)
            try:
                data = repo.backend.load(name)
                if pack_id_of(data) != pid:
                    raise IntegrityError(f"{name} does not match its name")
                entries = parse_pack(repo.codec, data, name)
            except IntegrityError as exc:
                result.warnings.append(f"{exc.message}: pack left in place, run 'kyrorepo verify --full-scan'")
                del plan.repack[pid]
                continue
            for e in entries:
                loc = repo.cache.lookup(e.id)
                if loc is None or loc.pack_id != pid or (e.type in PACKED_TYPES and used(e.id) is None):
                    continue  # unused, or a duplicate whose indexed copy lives elsewhere
                builder.add(e.type, e.id, data[e.offset:e.offset + e.length], e.raw_length)
                result.blobs_moved += 1
                if builder.size >= repo.config.pack_size:
                    save(builder)
                    builder = PackBuilder(repo.codec)
    if len(builder):
        save(builder)
    return infos


def write_segments(repo: Repository, old: Sequence[str], removed: set[bytes],
                   added: Sequence[PackInfo]) -> list[str]:
    """Save index segments listing every pack of ``old`` not ``removed``, plus ``added``."""
    names: list[str] = []
    batch: list[PackInfo] = []
    entries = 0
    written: set[bytes] = set()

    def emit() -> None:
        nonlocal batch, entries
        if batch:
            names.append(repo.save_object(BlobType.INDEX, encode_index(batch)))
            batch, entries = [], 0

    def packs() -> Iterator[PackInfo]:
        for name in old:
            yield from repo.load_index_segment(name)
        yield from added

    for info in packs():
        if info.pack_id in removed or info.pack_id in written:
            continue
        written.add(info.pack_id)
        batch.append(info)
        entries += len(info.entries)
        if entries >= SEGMENT_MAX_ENTRIES:
            emit()
    emit()
    return names


def run_gc(repo: Repository, state: PruneState, plan: GcPlan) -> GcResult:
    result = GcResult(plan)
    new_packs = repack(repo, state, plan, result)
    doomed = {**plan.delete, **{pid: st.length for pid, st in plan.repack.items()}}
    if plan.rewrite_index or new_packs:
        new_names = write_segments(repo, plan.segments, plan.removed_from_index(), new_packs)
        result.segments_written = len(new_names)
        crash_point("index-write")
        state.put("doomed", doomed, int(time.time()))
        for name in sorted(set(plan.segments) - set(new_names)):
            with contextlib.suppress(ObjectNotFoundError):
                repo.remove_object(BlobType.INDEX, name)
            result.segments_removed += 1
            crash_point("index-remove")
    repo.sync_index(force=True)
    state.delete("own", [p.pack_id for p in new_packs])  # indexed now
    for pid, size in sorted({**doomed, **plan.unindexed_delete}.items()):
        with contextlib.suppress(ObjectNotFoundError):
            repo.backend.remove(pack_name(pid))
        state.delete("doomed", [pid])
        state.delete("own", [pid])
        result.packs_removed += 1
        result.bytes_removed += size
        crash_point("pack-delete")
    state.delete("seen", plan.unindexed_delete)
    state.clear("used")
    return result


def collect_garbage(repo: Repository, survivors: Sequence[Snapshot], wal: WalRetention, opts: GcOptions,
                    dry_run: bool) -> GcResult:
    """Mark from ``survivors`` and the kept WAL captures, plan, and (unless ``dry_run``) repack and delete."""
    state = PruneState.for_repo(repo)
    try:
        mark(repo, state, referenced_roots(survivors, wal))
        plan = plan_gc(repo, state, opts, record=not dry_run)
        if dry_run:
            return GcResult(plan)
        return run_gc(repo, state, plan)
    finally:
        state.close()


# --- the commands -----------------------------------------------------------------------


@dataclass
class PruneResult:
    forget: ForgetPlan[Snapshot] | None
    removed: list[Snapshot]
    gc: GcResult | None
    captures_dropped: list[str] = field(default_factory=list)


def prune(repo: Repository, policy: Policy | None, group_by: str, source: str | None, gc: GcOptions | None,
          dry_run: bool, now: int, retry_lock: float = 0, keep_wal_within: Duration | None = None) -> PruneResult:
    """Apply ``policy`` (None: remove no backup), then, when ``gc`` is given, drop the WAL
    captures no kept backup needs and collect garbage.

    ``now`` anchors --min-age-days, --keep-wal-within and the unindexed-pack grace period."""
    if gc is not None:
        gc = replace(gc, now=now)
    with locked(repo, exclusive=not dry_run, retry_seconds=retry_lock):
        repo.sync_index(force=True)
        snaps = list_snapshots(repo)
        fplan = plan_forget(snaps, policy, group_by, source, now) if policy is not None else None
        removed = fplan.remove if fplan is not None else []
        if not dry_run:
            forget(repo, removed)
        gone = {s.id for s in removed}
        survivors = [s for s in snaps if s.id not in gone]
        if gc is None:
            return PruneResult(fplan, removed, None)
        since = None if keep_wal_within is None else keep_wal_within.before(now)
        wal = plan_wal_retention(survivors, load_captures(repo), since)
        if not dry_run:
            for cap in wal.drop:
                with contextlib.suppress(ObjectNotFoundError):
                    repo.remove_object(BlobType.WALCAP, cap.id)
            crash_point("walcap")
        result = collect_garbage(repo, survivors, wal, gc, dry_run)
    return PruneResult(fplan, removed, result, [c.id for c in wal.drop])
