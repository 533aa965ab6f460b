"""Restore a snapshot into a data directory, safely.

The restore is written into a staging directory, every blob authenticated and every file
checked against its recorded digest, everything made durable, and only then swapped
into place (``kyrorepo.staging.staged_restore``, shared with restore-pitr). A failed or
killed restore never leaves the user with neither the old nor the new data.

Data path (docs/performance.md, "Restore"): this process walks the snapshot, creates
directories and symlinks and turns chunk lists into coalesced pack ranges, each range
read once; worker processes (``kyrorepo.procpool``; threads for in-memory and network
backends) load a range, open every blob and write it into the staging files
(``kyrorepo.restore_worker``, direct I/O where possible). Small files share ranges, and
a file one range holds entirely is checked against its digest in the worker. A file
larger than a range gets ranges of its own, grouped into segments of up to
``SEGMENT_MAX`` bytes that one worker writes in file order: a one-segment file is
hashed as it is written, a larger one is hashed back from the disk once all its
segments are written. Metadata is set here after the check.
"""

from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any
from dataclasses import dataclass, field

from kyrorepo.errors import IntegrityError, RefusedError, UsageError
from kyrorepo.format import BlobType
from kyrorepo.index import BlobLocation
from kyrorepo.pack import pack_name
from kyrorepo.procpool import Runner, WorkerContext, default_workers, open_runner
from kyrorepo.repository import Repository
from kyrorepo.restore_worker import FileCheck, RangeTask, SegmentTask, check_file, write_range, write_segment
from kyrorepo.snapshot import Snapshot
from kyrorepo.staging import (
    FILES_NEED_FSYNC,
    STAGING_TAG,
    clean_stale_staging,
    recover_interrupted_swap,
    staged_restore,
)
from kyrorepo.tree import DIR, FILE, SYMLINK, Node, Ref
from kyrorepo.walk import chunk_refs, walk

__all__ = ["STAGING_TAG", "RestoreOptions", "RestoreResult", "clean_stale_staging", "existing_files",
           "is_nonempty", "plan_restore", "refuse_message", "run_restore", "write_snapshot"]

MAX_RANGE = 4 * 1024 * 1024  # bytes of one pack read
MAX_PLAIN = 8 * 1024 * 1024  # plaintext of a read's distinct blobs, which its worker holds at once
MAX_GAP = 256 * 1024  # unneeded bytes a read may span to join the next blob
SEGMENT_MAX = 256 * 1024 * 1024  # bytes of a large file one worker writes (and hashes) in order
MAX_FILES_AHEAD = 4096  # files planned but not yet written, checked and finished
LOOKUP_BATCH = 256  # chunk ids looked up in one index transaction
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

Progress = Callable[[int, int], None]

# glibc mallopt parameter (malloc.h) and the value set by ``tune_allocator``.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1024 * 1024
ALLOCATOR_SETTINGS = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD),)


def tune_allocator() -> None:
    """Have glibc map every allocation of ``MMAP_THRESHOLD`` bytes or more on its own.

    By default glibc raises its mmap threshold to the largest block freed so far (up to
    32 MiB), so blocks of several MiB allocated and freed over and over (restore's
    ranges; the backup's 16 MiB pack buffers, before they were reused mappings of their
    own, ``pack.PackBuffers``) come from per-thread heaps that fragment and are not
    given back: a 1 GiB backup through the CLI peaked at about 200 MiB RSS. A fixed
    threshold bounds that, at the price of mapping and faulting in every such block
    afresh. The backup no longer calls it: with its pack buffers reused, the threshold
    only made its other large blocks (zstd's work space among them) fault in afresh,
    88-112k page faults per 1 GiB backup instead of 29-38k, for the same peak RSS
    (docs/performance.md, "Memory"). A restore calls it for its ranges.
    Process-wide and idempotent. Does nothing without glibc's ``mallopt``.
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        mallopt = ctypes.CDLL(None).mallopt
        for param, value in ALLOCATOR_SETTINGS:
            mallopt(param, value)


@dataclass
class RestoreOptions:
    target: str
    allow_clear: bool = False
    dry_run: bool = False
    includes: tuple[str, ...] = ()
    workers: int = field(default_factory=default_workers)
    progress: Progress | None = None


@dataclass
class RestorePlan:
    target: str
    existing: list[str]  # files now in the target, relative
    files: list[str]  # files the backup would write, relative
    refused: bool  # the target is not empty and clearing was not allowed


@dataclass
class RestoreResult:
    files: int = 0
    dirs: int = 0
    bytes: int = 0
    warnings: list[str] = field(default_factory=list)


def existing_files(target: str) -> list[str]:
    if not os.path.isdir(target):
        return []
    out = []
    for dirpath, dirnames, filenames in os.walk(target):
        dirnames.sort()
        rel = os.path.relpath(dirpath, target)
        for fn in sorted(filenames):
            out.append(fn if rel == "." else os.path.join(rel, fn))
    return out


def is_nonempty(target: str) -> bool:
    """Whether ``target`` holds anything, once content an interrupted swap left aside is back.

    A restore killed between moving the old content aside and moving the new one in
    leaves no ``target``; its old content is put back first, so that it counts here and
    is never taken for a leftover (``staging.recover_interrupted_swap``)."""
    recover_interrupted_swap(target)
    if os.path.lexists(target) and not os.path.isdir(target):
        raise UsageError(f"restore target {target} exists and is not a directory")
    return os.path.isdir(target) and any(True for _ in os.scandir(target))


def selected(path: bytes, includes: tuple[str, ...]) -> bool:
    if not includes:
        return True
    text = os.fsdecode(path)
    return any(fnmatch.fnmatchcase(text, g) or fnmatch.fnmatchcase(text, g.rstrip("/") + "/*") for g in includes)


def selected_entries(repo: Repository, snap: Snapshot, includes: tuple[str, ...]) -> Iterator[tuple[bytes, Node]]:
    """Entries to restore: matching ones and the directories that lead to them."""
    for path, node in walk(repo, snap.tree):
        if node.type == DIR:
            yield path, node  # filtered below when empty
        elif selected(path, includes):
            yield path, node


def plan_restore(repo: Repository, snap: Snapshot, opts: RestoreOptions) -> RestorePlan:
    target = os.path.abspath(opts.target)
    files = [os.fsdecode(p) for p, n in selected_entries(repo, snap, opts.includes) if n.type != DIR]
    nonempty = is_nonempty(target)
    return RestorePlan(target, existing_files(target) if nonempty else [], files, nonempty and not opts.allow_clear)


def refuse_message(target: str, count: int) -> str:
    return (f"data directory {target} is not empty ({count} file(s)): it was left untouched; "
            "pass --allow-clear or set BACKUP_ALLOW_CLEAR=true to replace its content")


@dataclass(eq=False)
class _File:
    """A file being restored: how many ranges hold its chunks, and how many are written."""

    dest: str
    path: bytes
    node: Node
    ranges: int = 0
    written: int = 0
    planned: bool = False  # every chunk of the file is placed in a range
    whole: bool = False  # one range holds it all: its worker checks the digest
    last: "_Range | None" = None  # the range its latest chunk went to

    @property
    def shown(self) -> str:
        return os.fsdecode(self.path)

    def check(self) -> FileCheck:
        digest = self.node.digest or b""  # a file without a digest never matches
        return FileCheck(self.dest, self.shown, self.node.size, digest, FILES_NEED_FSYNC)


@dataclass(eq=False)
class _Range:
    """One read: a byte range of a pack, its distinct blobs, and where each goes."""

    pack_id: bytes
    start: int
    end: int
    plain: int  # plaintext bytes of the distinct blobs
    blobs: list[tuple[bytes, int, int]] = field(default_factory=list)  # (id, offset, length)
    index: dict[int, int] = field(default_factory=dict)  # blob offset -> position in blobs
    types: dict[int, BlobType] = field(default_factory=dict)  # position -> type, for blobs not sealed as data
    places: list[tuple[int, _File, int]] = field(default_factory=list)  # (blob, file, file offset)
    files: dict[_File, int] = field(default_factory=dict)  # file -> its index in the task

    @classmethod
    def first(cls, bid: bytes, loc: BlobLocation, length: int) -> "_Range":
        r = cls(loc.pack_id, loc.offset, loc.offset, 0)
        r._append(bid, loc, length)
        return r

    def _append(self, bid: bytes, loc: BlobLocation, length: int) -> int:
        """Add blob ``bid`` (at ``loc``, ``length`` bytes of plaintext) at the end of the read."""
        idx = len(self.blobs)
        self.blobs.append((bid, loc.offset, loc.length))
        self.index[loc.offset] = idx
        if loc.type != BlobType.DATA:
            self.types[idx] = loc.type
        self.end = loc.offset + loc.length
        self.plain += length
        return idx

    def take(self, bid: bytes, loc: BlobLocation, length: int) -> int | None:
        """Position of blob ``bid`` (at ``loc``, ``length`` bytes of plaintext) in this read,
        extending the read to it when it lies at most ``MAX_GAP`` further on and the read stays
        within ``MAX_RANGE`` and ``MAX_PLAIN`` (a highly compressible file would otherwise put
        hundreds of MiB of plaintext in one read); None if it cannot join."""
        if loc.pack_id != self.pack_id:
            return None
        idx = self.index.get(loc.offset)
        if idx is None and self.end <= loc.offset <= self.end + MAX_GAP \
                and loc.offset + loc.length - self.start <= MAX_RANGE and self.plain + length <= MAX_PLAIN:
            idx = self._append(bid, loc, length)
        return idx if idx is not None and self.blobs[idx][0] == bid else None

    def add(self, idx: int, f: _File, offset: int) -> None:
        self.places.append((idx, f, offset))
        if f not in self.files:
            self.files[f] = len(self.files)
        if f.last is not self:
            f.last = self
            f.ranges += 1

    def task(self) -> RangeTask:
        """The worker's task; files the range holds entirely get their digest checked there."""
        files = []
        for f in self.files:
            f.whole = f.planned and f.ranges == 1
            files.append((f.dest, f.shown, f.check() if f.whole else None))
        return RangeTask(pack_name(self.pack_id), self.start, self.end, tuple(self.blobs),
                         tuple((idx, self.files[f], off) for idx, f, off in self.places), tuple(files),
                         tuple(self.types.items()))

    def segment_task(self, f: _File) -> RangeTask:
        """The range as part of a ``SegmentTask``: every place is in ``f``."""
        return RangeTask(pack_name(self.pack_id), self.start, self.end, tuple(self.blobs),
                         tuple((idx, 0, off) for idx, _, off in self.places), ((f.dest, f.shown, None),),
                         tuple(self.types.items()))


class _Writer:
    """Plans a snapshot's files into coalesced pack reads and has a ``Runner`` write them.

    At most ``runner.slots`` tasks and ``MAX_FILES_AHEAD`` unfinished files are in flight.
    Replies come back in any order: a range's reply counts one more written range for each
    of its files; a file whose last range is written is checked (by its range's worker,
    or by a ``check_file`` task) and then gets its metadata here.
    """

    def __init__(self, repo: Repository, opts: RestoreOptions, runner: Runner) -> None:
        self.repo = repo
        self.opts = opts
        self.runner = runner
        self.result = RestoreResult()
        self.links: dict[int, _File] = {}
        self.dirs: list[tuple[str, Node]] = []
        self.unfinished: set[_File] = set()
        self.current: _Range | None = None
        self.ranges: dict[int, list[_File]] = {}  # ticket -> the files of a range task
        self.checks: dict[int, _File] = {}  # ticket -> the file a check_file task checks

    def write_tree(self, snap: Snapshot, staging: str) -> None:
        try:
            self._write_entries(snap, staging)
            self._flush_range()
            while self.runner.pending:
                self._consume_one()
        except BaseException:
            self.runner.close()  # every worker has stopped before the caller removes the staging directory
            raise
        if self.unfinished:
            raise IntegrityError(f"{len(self.unfinished)} restored file(s) did not receive all their chunks")
        if self.opts.includes:
            self.prune_empty_dirs()
        for dest, node in reversed(self.dirs):
            if os.path.isdir(dest):
                self.set_meta(dest, node)
                self.result.dirs += 1
        self.set_meta(staging, snap.root)

    def _write_entries(self, snap: Snapshot, staging: str) -> None:
        made = {staging}
        for path, node in selected_entries(self.repo, snap, self.opts.includes):
            dest = os.path.join(staging, os.fsdecode(path))
            if node.type == DIR:
                os.makedirs(dest, mode=0o700, exist_ok=True)
                made.add(dest)
                self.dirs.append((dest, node))
                continue
            parent = os.path.dirname(dest)
            if parent not in made:
                os.makedirs(parent, mode=0o700, exist_ok=True)
                made.add(parent)
            if node.type == SYMLINK:
                assert node.target is not None
                os.symlink(node.target, dest)
                self.set_meta(dest, node, symlink=True)
            elif node.type == FILE:
                self.write_file(dest, path, node)
            self.result.files += 1

    def prune_empty_dirs(self) -> None:
        for dest, _ in reversed(self.dirs):
            with contextlib.suppress(OSError):
                os.rmdir(dest)  # only succeeds when empty

    # --- planning -------------------------------------------------------------------------

    def write_file(self, dest: str, path: bytes, node: Node) -> None:
        if node.links is not None and node.links in self.links:
            os.link(self.links[node.links].dest, dest)  # the first of the links was created when planned
            return
        while len(self.unfinished) >= MAX_FILES_AHEAD:
            if not self.runner.pending:
                self._flush_range()
            self._consume_one()
        f = _File(dest, path, node)
        self.unfinished.add(f)
        if node.links is not None:
            self.links[node.links] = f
            _create(dest)
        if node.size > MAX_RANGE:
            self._plan_segments(f)
            return
        offset = 0
        for bid, length, loc in self._locations(f):
            self._place(f, offset, bid, length, loc)
            offset += length
        f.planned = True
        if not f.ranges:
            self._finish_empty(f)

    def _locations(self, f: _File) -> Iterator[tuple[bytes, int, BlobLocation]]:
        """(chunk id, length, location) of every chunk of ``f``, in file order."""
        batch: list[Ref] = []
        for ref in chunk_refs(self.repo, f.node):
            batch.append(ref)
            if len(batch) >= LOOKUP_BATCH:
                yield from self._look_up(f, batch)
                batch = []
        yield from self._look_up(f, batch)

    def _look_up(self, f: _File, refs: list[Ref]) -> Iterator[tuple[bytes, int, BlobLocation]]:
        if not refs:
            return
        for (bid, length), (_, loc) in zip(refs, self.repo.cache.lookup_many([r[0] for r in refs])):
            if loc is None:
                raise IntegrityError(f"file {f.shown}: chunk {bid.hex()[:16]} is not in the index; "
                                     "run 'kyrorepo verify'")
            yield bid, length, loc  # of any packed type: its plaintext is the chunk's (_Range.types)

    def _plan_segments(self, f: _File) -> None:
        """Plan a large file as ``SegmentTask``s of its own ranges, each written in order by one
        worker. A file of at most ``SEGMENT_MAX`` bytes is one segment, whose worker checks its
        digest while writing; a larger one is split and hashed back once all are written."""
        f.whole = f.node.size <= SEGMENT_MAX
        ranges: list[_Range] = []
        r: _Range | None = None
        offset = size = 0
        for bid, length, loc in self._locations(f):
            if size >= SEGMENT_MAX and not f.whole:
                assert r is not None
                self._submit_segment(f, [*ranges, r], None)
                ranges, size, r = [], 0, None
            idx = r.take(bid, loc, length) if r is not None else None
            if r is None or idx is None:
                if r is not None:
                    ranges.append(r)
                r = _Range.first(bid, loc, length)
                idx = 0
            r.places.append((idx, f, offset))
            offset += length
            size += length
        if r is not None:
            ranges.append(r)
        f.planned = True  # before the last submit: its reply may be taken while it waits for a slot
        self._submit_segment(f, ranges, f.check() if f.whole else None)

    def _submit_segment(self, f: _File, ranges: list[_Range], check: FileCheck | None) -> None:
        """Submit a segment once a worker thread is free: queued behind a busy worker's tasks, a
        segment (up to ``SEGMENT_MAX`` bytes of work) would start late while others go idle.

        The segment counts as one of the file's before the wait: the replies taken meanwhile
        may be the file's earlier segments, and with all of those written the file would
        otherwise look complete and be read back before its last segment was even sent."""
        f.ranges += 1
        while self.runner.pending and not self.runner.idle:
            self._consume_one()
        self._submit(write_segment, SegmentTask(tuple(r.segment_task(f) for r in ranges), check), [f])

    def _place(self, f: _File, offset: int, bid: bytes, length: int, loc: BlobLocation) -> None:
        r = self.current
        idx = r.take(bid, loc, length) if r is not None else None
        if r is None or idx is None:
            self._flush_range()
            r = self.current = _Range.first(bid, loc, length)
            idx = 0
        r.add(idx, f, offset)

    def _flush_range(self) -> None:
        r, self.current = self.current, None
        if r is not None:
            self._submit(write_range, r.task(), list(r.files))

    def _submit(self, fn: Callable[[WorkerContext, Any], int], task: object, files: list[_File]) -> None:
        """Send a task that writes ``files``; take replies while every slot is busy."""
        self.ranges[self.runner.submit(fn, task)] = files
        while self.runner.pending >= self.runner.slots:
            self._consume_one()

    # --- replies ------------------------------------------------------------------------------

    def _consume_one(self) -> None:
        ticket, value = self.runner.wait()
        f = self.checks.pop(ticket, None)
        if f is not None:
            self._finish(f)
            return
        if self.opts.progress:
            self.opts.progress(value, 0)
        for f in self.ranges.pop(ticket):
            f.written += 1
            if not f.planned or f.written < f.ranges:
                continue
            if f.whole:
                self._finish(f)
            else:
                self.checks[self.runner.submit(check_file, f.check())] = f

    def _finish_empty(self, f: _File) -> None:
        if f.node.links is None:  # the first of a set of links was created when planned
            _create(f.dest)
        check = f.check()
        check.confirm(0, self.repo.keys.hasher().digest())
        check.make_durable()
        self._finish(f)

    def _finish(self, f: _File) -> None:
        self.unfinished.discard(f)
        self.set_meta(f.dest, f.node)
        self.result.bytes += f.node.size
        if self.opts.progress:
            self.opts.progress(0, 1)

    def set_meta(self, dest: str, node: Node, symlink: bool = False) -> None:
        if IS_ROOT:
            with contextlib.suppress(OSError):
                os.lchown(dest, node.uid, node.gid)
        for k, v in node.xattrs:
            with contextlib.suppress(OSError):
                os.setxattr(dest, os.fsdecode(k), v, follow_symlinks=False)
        if not symlink:
            os.chmod(dest, node.mode)
        with contextlib.suppress(NotImplementedError, OSError):
            os.utime(dest, ns=(node.mtime_ns, node.mtime_ns), follow_symlinks=False)


def _create(dest: str) -> None:
    os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))


def write_snapshot(repo: Repository, snap: Snapshot, dest: str, opts: RestoreOptions,
                   runner: Runner | None = None) -> RestoreResult:
    """Write ``snap`` into the empty directory ``dest``, every file checked (no staging, no swap).

    Uses ``runner`` (closed on errors) or opens one of its own, closed before returning.
    """
    own = runner is None
    runner = runner or open_runner(repo, opts.workers)
    tune_allocator()
    try:
        writer = _Writer(repo, opts, runner)
        writer.write_tree(snap, dest)
    finally:
        if own:
            runner.close()
    return writer.result


def run_restore(repo: Repository, snap: Snapshot, opts: RestoreOptions) -> RestoreResult:
    if opts.workers < 1:
        raise UsageError(f"restore needs at least one worker (workers={opts.workers})")
    target = os.path.abspath(opts.target)
    if is_nonempty(target) and not opts.allow_clear:
        raise RefusedError(refuse_message(target, len(existing_files(target))))
    runner = open_runner(repo, opts.workers)  # the workers start while the index syncs and the plan begins
    try:
        repo.sync_index()
        return staged_restore(target, lambda staging: write_snapshot(repo, snap, staging, opts, runner))
    finally:
        runner.close()
