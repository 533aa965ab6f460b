"""restore-pitr and pitr-window: a source's data directory as it was at second ``T``.

1. Base: the newest backup of the source that finished at or before ``T`` and that the
   codec accepts for ``T`` (``base_usable``: a KyroDB snapshot taken after ``T`` rules
   a backup out).
2. The base's WAL state and every later backup and capture are folded in time order
   (``kyrorepo.wal.timeline``) into a chain of segment versions; gaps that block ``T``
   make it unreachable (``PitrUnreachableError``, exit 14) unless ``allow_gap``, which
   restores up to the last second before the gap and says so. A ``T`` before the oldest
   usable base or after the newest backup or capture is unreachable too.
3. The base is written into a staging directory beside the target (``write_snapshot``:
   every file verified), its segments are replaced by the chain's versions (verified
   against their digests), each cut at ``T`` in replay order; after a segment that was
   cut short, later ones are dropped. Metadata is rewritten by ``codec.fix_metadata``.
4. Everything made durable, the staging directory is swapped in (``staged_restore``,
   as ``restore`` does).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from dataclasses import dataclass, field, replace
from typing import BinaryIO

from kyrorepo.backup import default_source
from kyrorepo.errors import IntegrityError, NotFoundError, PitrUnreachableError, RefusedError, UsageError
from kyrorepo.repository import Repository
from kyrorepo.restore import RestoreOptions, existing_files, is_nonempty, refuse_message, write_snapshot
from kyrorepo.snapshot import Snapshot, list_snapshots
from kyrorepo.timefmt import iso_time
from kyrorepo.staging import staged_restore
from kyrorepo.tree import FILE, Node
from kyrorepo.wal import ChronicleCodec, CutPoint, WalCodec
from kyrorepo.wal.capture import BackupWal, Capture, ContentRef, present_of
from kyrorepo.wal.chronicle import rotated_name, rotation_time
from kyrorepo.wal.timeline import (
    BaseCandidate,
    State,
    TimedGap,
    Version,
    Window,
    earliest,
    later_states,
    plan_chain,
    window,
)
from kyrorepo.walcapture import (
    backup_wal,
    capture_state,
    content_node,
    copy_verified,
    load_captures,
    recorded_codec,
)
from kyrorepo.walk import find_node, walk

PART_SUFFIX = ".kyrorepo-part"


@dataclass
class PitrOptions:
    target: str
    t: int
    source: str | None = None
    allow_clear: bool = False
    allow_gap: bool = False
    dry_run: bool = False


@dataclass(frozen=True)
class BackupFile:
    """A segment version held by a backup: the file ``relpath`` of its tree."""

    snapshot: str
    tree: bytes
    relpath: str


@dataclass
class Timeline:
    source: str
    codec: WalCodec
    backups: list[Snapshot]  # WAL-bearing backups of the source (this codec), oldest first
    states: list[State]  # backups and captures, in time order
    captures: int
    latest: int  # the newest state's second
    warnings: list[str] = field(default_factory=list)

    def label(self, state_id: str) -> tuple[str, int]:
        """A state's name for reports ("backup 1a2b3c4d", "archive capture ...") and time."""
        s = next(s for s in self.states if s.id == state_id)
        return ("backup" if s.kind == "backup" else f"{s.kind} capture") + f" {s.id[:8]}", s.time


@dataclass
class Base:
    snapshot: Snapshot
    state: State
    files: dict[str, Node]  # relpath -> file node
    metadata: dict[str, bytes]  # the codec's metadata files, as backed up


@dataclass
class SegmentResult:
    relpath: str
    origin: str  # the backup or capture whose bytes are restored
    origin_time: int
    frames: int  # frames kept
    total_frames: int  # frames in the version
    bytes: int  # bytes kept
    last_time: int | None  # time of the last frame kept
    kept: bool


@dataclass
class PitrResult:
    source: str
    codec: str
    requested: int
    t: int  # the second restored to (< requested when --allow-gap stopped at a gap)
    base: Snapshot
    target: str
    segments: list[SegmentResult]
    metadata: list[str]  # metadata files rewritten (or deleted)
    gap: TimedGap | None  # the gap restored up to (--allow-gap)
    dry_run: bool
    existing: list[str] = field(default_factory=list)
    refused: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def last_frame_time(self) -> int | None:
        times = [s.last_time for s in self.segments if s.kept and s.last_time is not None]
        return max(times) if times else None


# --- the timeline of a source ----------------------------------------------------------


def wal_sources(snaps: list[Snapshot], caps: list[Capture]) -> list[str]:
    return sorted({s.source for s in snaps if s.wal} | {c.source for c in caps})


def resolve_source(source: str | None, target: str, snaps: list[Snapshot], caps: list[Capture]) -> str:
    """--source, else the target's default source name, else the only source with WAL."""
    if source:
        return source
    known = wal_sources(snaps, caps)
    default = default_source(target)
    if default in known:
        return default
    if len(known) == 1:
        return known[0]
    if not known:
        raise PitrUnreachableError("the repository holds no backup or capture with WAL "
                                   "information: back the database up with 'kyrorepo backup'")
    raise UsageError("several sources have WAL in this repository, name one with --source: "
                     + ", ".join(known))


def backup_state(snap: Snapshot, wal: BackupWal) -> State:
    stored = tuple(Version(s, BackupFile(snap.id, snap.tree, s.relpath), wal.time_ns, snap.id)
                   for s in wal.segments)
    present = tuple(present_of(s) for s in wal.segments)
    return State(snap.id, "backup", snap.end_time, snap.time, True, present, stored)


def build_timeline(source: str, snaps: list[Snapshot], caps: list[Capture]) -> Timeline:
    walled = [(s, w) for s in snaps if s.source == source for w in [backup_wal(s)] if w is not None]
    mine = [c for c in caps if c.source == source]
    if not walled and not mine:
        raise PitrUnreachableError(f"source {source} has no backup or capture with WAL information: "
                                   "check --source, or back it up with 'kyrorepo backup'")
    if walled:
        _, newest = max(walled, key=lambda sw: (sw[0].end_time, sw[0].id))
        name, options = newest.codec, newest.options
    else:
        name, options = mine[-1].codec, mine[-1].codec_options
    codec = recorded_codec(name, options)
    warnings = []
    backups = sorted((s for s, w in walled if w.codec == name), key=lambda s: (s.end_time, s.id))
    states = [backup_state(s, w) for s, w in walled if w.codec == name]
    states += [capture_state(c) for c in mine if c.codec == name]
    others = len(walled) + len(mine) - len(states)
    if others:
        warnings.append(f"{others} backup(s) or capture(s) of source {source} use another WAL codec "
                        f"than {name} and are ignored")
    states.sort(key=lambda s: (s.time, s.start, s.id))
    return Timeline(source, codec, backups, states, len(mine), max(s.time for s in states), warnings)


def snapshot_files(repo: Repository, snap: Snapshot) -> dict[str, Node]:
    return {os.fsdecode(p): n for p, n in walk(repo, snap.tree) if n.type == FILE}


def read_node(repo: Repository, node: Node, what: str) -> bytes:
    buf = io.BytesIO()
    copy_verified(repo, node, buf, what)
    return buf.getvalue()


def load_base(repo: Repository, tl: Timeline, snap: Snapshot, files: dict[str, Node]) -> Base:
    wal = backup_wal(snap)
    assert wal is not None
    meta = {p: read_node(repo, n, f"{p} of backup {snap.short_id}")
            for p, n in files.items() if tl.codec.is_metadata(p)}
    # a segment that vanished while the backup ran is recorded but not stored
    held = BackupWal(wal.codec, wal.options, wal.time_ns, tuple(s for s in wal.segments if s.relpath in files))
    return Base(snap, backup_state(snap, held), files, meta)


def choose_base(repo: Repository, tl: Timeline, t: int) -> Base:
    for snap in sorted(tl.backups, key=lambda s: (s.end_time, s.id), reverse=True):
        if snap.end_time > t:
            continue
        files = snapshot_files(repo, snap)
        if tl.codec.base_usable(files, t):
            return load_base(repo, tl, snap, files)
    oldest = min((s.end_time for s in tl.backups), default=None)
    hint = "" if oldest is None else f"; the oldest backup finished at {iso_time(oldest)} ({oldest})"
    raise PitrUnreachableError(
        f"no backup of source {tl.source} finished at or before {iso_time(t)} ({t}) and can be "
        f"rolled forward to it{hint}: choose a later --timestamp")


# --- planning and placing ----------------------------------------------------------------


def _plan(tl: Timeline, base: Base, t: int, allow_gap: bool) -> tuple[int, list[Version], TimedGap | None]:
    """The second restored to, the chain of versions and the gap it stops at (if any)."""
    later = later_states(base.state, tl.states)
    plan = plan_chain(tl.codec, base.state, base.metadata, later, t)
    gap = earliest(plan.gaps)
    if gap is None:
        return t, list(plan.versions), None
    last_ok = None if gap.unreachable_from is None else gap.unreachable_from - 1
    usable = last_ok is not None and tl.codec.base_usable(base.files, last_ok)
    reach = "no second after it is reachable from this backup" if not usable else \
        f"the latest reachable second is {iso_time(last_ok or 0)} ({last_ok})"
    if not allow_gap or not usable or last_ok is None:
        hint = "restore to it, or pass --allow-gap to restore up to the gap" if usable else \
            "choose an earlier --timestamp"
        raise PitrUnreachableError(
            f"source {tl.source}: the captured WAL has a gap before {iso_time(t)} ({t}): "
            f"{gap.gap.detail}; {reach}: {hint}")
    plan = plan_chain(tl.codec, base.state, base.metadata, later, last_ok)
    return last_ok, list(plan.versions), gap


def restore_names(codec: WalCodec, versions: list[Version]) -> list[Version]:
    """Give each segment a distinct name: the newest keeps its name, an older Chronicle
    segment that ends up with the same name gets its rotated name."""
    out = list(versions)
    taken: set[str] = set()
    for i in range(len(out) - 1, -1, -1):
        rel = out[i].scan.relpath
        if rel in taken:
            if not isinstance(codec, ChronicleCodec):
                raise IntegrityError(f"two WAL segments would be restored as {rel}: "
                                     "run 'kyrorepo verify' and report this")
            active = rel if rotation_time(rel) is None else rel.rsplit(".", 1)[0]
            stamp = out[i].scan.last_time or out[i].scan.first_time or 0
            while rotated_name(active, stamp) in taken:
                stamp += 1
            rel = rotated_name(active, stamp)
            out[i] = replace(out[i], scan=replace(out[i].scan, relpath=rel))
        taken.add(rel)
    return out


def _write_version(repo: Repository, v: Version, out: BinaryIO) -> None:
    what = f"WAL segment {v.scan.relpath} of {v.state[:8]}"
    if isinstance(v.ref, ContentRef):
        node: Node | None = content_node(v.ref)
    elif isinstance(v.ref, BackupFile):
        node = find_node(repo, v.ref.tree, os.fsencode(v.ref.relpath))
        if node is None or node.type != FILE:
            raise IntegrityError(f"{what}: backup {v.ref.snapshot[:8]} recorded it but its tree "
                                 "lacks the file; run 'kyrorepo verify'")
    else:
        raise AssertionError(f"unknown version reference {v.ref!r}")
    assert node is not None
    copy_verified(repo, node, out, what)


def place_segments(repo: Repository, tl: Timeline, versions: list[Version], t: int, root: str,
                   mode: int) -> list[SegmentResult]:
    """Write each version under ``root``, cut at ``t`` (verified, fsynced); after a segment
    cut short, drop the rest. Names clashes among the kept ones are resolved last."""
    cuts: list[tuple[Version, CutPoint | None, str | None]] = []
    stopped = False
    for i, v in enumerate(versions):
        if stopped:
            cuts.append((v, None, None))
            continue
        part: str | None = os.path.join(root, f".kyrorepo-pitr-{i}{PART_SUFFIX}")
        assert part is not None
        with open(part, "w+b") as f:
            _write_version(repo, v, f)
            cp = tl.codec.cut_point(f, t, capture_time_ns=v.time_ns)
            keep = cp.frames > 0 or not cp.stop
            if keep:
                f.truncate(cp.length)
                f.flush()
                os.fsync(f.fileno())
        if not keep:
            os.remove(part)
            part = None
        cuts.append((v, cp, part))
        stopped = cp.stop
    kept = [v for v, _, part in cuts if part is not None]
    names = iter(v.scan.relpath for v in restore_names(tl.codec, kept))
    out: list[SegmentResult] = []
    for v, cut, part in cuts:
        origin, origin_time = tl.label(v.state)
        if part is None or cut is None:
            out.append(SegmentResult(v.scan.relpath, origin, origin_time, 0, v.scan.count, 0, None, False))
            continue
        rel = next(names)
        dest = os.path.join(root, *rel.split("/"))
        os.makedirs(os.path.dirname(dest), mode=0o700, exist_ok=True)
        os.chmod(part, mode)
        os.replace(part, dest)
        out.append(SegmentResult(rel, origin, origin_time, cut.frames, v.scan.count, cut.length, cut.last_time, True))
    return out


def _write_file(path: str, data: bytes, mode: int) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    part = path + PART_SUFFIX
    with open(part, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(part, mode)
    os.replace(part, path)


def _fix_metadata(tl: Timeline, base: Base, segs: list[SegmentResult], t: int,
                  root: str | None) -> list[str]:
    """Apply ``codec.fix_metadata`` under ``root`` (None: only compute); the paths changed."""
    restored = [s.relpath for s in segs if s.kept]
    present = {p for p in base.files if not tl.codec.is_segment(p)} | set(restored)
    fixes = tl.codec.fix_metadata(base.metadata, restored, present, t)
    if root is not None:
        for rel, data in fixes.items():
            path = os.path.join(root, *rel.split("/"))
            if data is None:
                if os.path.lexists(path):
                    os.remove(path)
            else:
                node = base.files.get(rel)
                _write_file(path, data, node.mode if node is not None else 0o600)
    return sorted(fixes)


def _segment_mode(tl: Timeline, base: Base) -> int:
    modes = [n.mode for p, n in base.files.items() if tl.codec.is_segment(p)]
    return modes[0] if modes else 0o600


# --- restore-pitr ------------------------------------------------------------------------


def run_pitr(repo: Repository, opts: PitrOptions) -> PitrResult:
    """Plan, and unless ``opts.dry_run`` restore, the target as of second ``opts.t``."""
    repo.sync_index()
    snaps = list_snapshots(repo)
    caps = load_captures(repo)
    target = os.path.abspath(opts.target)
    tl = build_timeline(resolve_source(opts.source, target, snaps, caps), snaps, caps)
    if opts.t > tl.latest:
        raise PitrUnreachableError(
            f"{iso_time(opts.t)} ({opts.t}) is after the newest backup or capture of source "
            f"{tl.source} ({iso_time(tl.latest)}, {tl.latest}); nothing of its WAL is known after "
            "that second: restore to it or earlier, or capture more often with 'kyrorepo wal-archive'")
    base = choose_base(repo, tl, opts.t)
    t, chain, gap = _plan(tl, base, opts.t, opts.allow_gap)
    nonempty = is_nonempty(target)
    existing = existing_files(target) if nonempty else []
    result = PitrResult(tl.source, tl.codec.name, opts.t, t, base.snapshot, target, [], [], gap,
                        opts.dry_run, existing, nonempty and not opts.allow_clear, list(tl.warnings))
    if opts.dry_run:
        with tempfile.TemporaryDirectory(prefix="kyrorepo-pitr-") as tmp:
            result.segments = place_segments(repo, tl, chain, t, tmp, 0o600)
        result.metadata = _fix_metadata(tl, base, result.segments, t, None)
        return result
    if result.refused:
        raise RefusedError(refuse_message(target, len(existing)))

    def fill(staging: str) -> None:
        write_snapshot(repo, base.snapshot, staging, RestoreOptions(target=staging))
        for rel in base.files:
            if tl.codec.is_segment(rel):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(staging, *rel.split("/")))
        result.segments = place_segments(repo, tl, chain, t, staging, _segment_mode(tl, base))
        result.metadata = _fix_metadata(tl, base, result.segments, t, staging)

    staged_restore(target, fill)
    return result


# --- pitr-window --------------------------------------------------------------------------


@dataclass
class SourceWindow:
    source: str
    codec: str
    window: Window
    backups: int
    captures: int
    newest: int  # the newest backup or capture's second
    warnings: list[str]


def usable_from(codec: WalCodec, files: list[str], start: int, latest: int) -> int | None:
    """The first second from ``start`` the codec accepts a base with these files for."""
    if codec.base_usable(files, start):
        return start
    if latest <= start or not codec.base_usable(files, latest):
        return None
    lo, hi = start, latest  # unusable at lo, usable at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if codec.base_usable(files, mid) else (mid, hi)
    return hi


def source_window(repo: Repository, tl: Timeline) -> SourceWindow:
    bases = []
    for snap in tl.backups:
        files = snapshot_files(repo, snap)
        first = usable_from(tl.codec, list(files), snap.end_time, tl.latest)
        if first is not None:
            base = load_base(repo, tl, snap, files)
            bases.append(BaseCandidate(base.state, first, base.metadata))
    w = window(tl.codec, bases, tl.states, tl.latest)
    return SourceWindow(tl.source, tl.codec.name, w, len(tl.backups), tl.captures, tl.latest, tl.warnings)


def pitr_windows(repo: Repository, source: str | None = None) -> list[SourceWindow]:
    """The restorable window of each source with WAL (or of ``source``)."""
    repo.sync_index()
    snaps = list_snapshots(repo)
    caps = load_captures(repo)
    sources = [source] if source else wal_sources(snaps, caps)
    if source and source not in wal_sources(snaps, caps):
        raise NotFoundError(f"source {source} has no backup or capture with WAL information: "
                            "check --source ('kyrorepo list' shows the sources)")
    return [source_window(repo, build_timeline(s, snaps, caps)) for s in sources]
