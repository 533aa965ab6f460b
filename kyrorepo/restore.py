"""Restore a snapshot into a data directory, safely.

The restore is written into a staging directory beside the target, every chunk checked
against its id and every file against its recorded digest, everything made durable,
and only then swapped into place; the old content is removed after the swap. A failed or
killed restore never leaves the user with neither the old nor the new data. When the
target is a mount point (it cannot be renamed), staging happens inside it and entries
are swapped one by one, the old ones kept aside until the new ones are all in place.

Data path (docs/performance.md, "Restore"): chunks are read as coalesced pack ranges,
each range once, opened on worker threads and written at their file offsets with
``pwrite``; file digests are fed in order on the walking thread. Durability: on Linux
one ``syncfs`` of the staging file system before the swap (one call instead of an
fsync per file, which dominated restores of many small files); elsewhere every file
and directory is fsynced.
"""

from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import os
import secrets
import shutil
import stat
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import blake3

from kyrorepo.backends.local import fsync_dir
from kyrorepo.errors import IntegrityError, KyroError, RefusedError, UsageError
from kyrorepo.format import BlobType
from kyrorepo.index import BlobLocation
from kyrorepo.pack import pack_name
from kyrorepo.repository import Repository
from kyrorepo.snapshot import Snapshot
from kyrorepo.tree import DIR, FILE, SYMLINK, Node, Ref
from kyrorepo.walk import chunk_refs, walk
from kyrorepo.writer import RELEASE_INDEX_EVERY, release_index_pages, tune_allocator

STAGING_TAG = ".kyrorepo-staging-"
OLD_TAG = ".kyrorepo-old-"
MAX_RANGE = 4 * 1024 * 1024  # bytes of one pack read
MAX_GAP = 256 * 1024  # unneeded bytes a read may span to join the next blob
MAX_OPEN_FILES = 256
LOOKUP_BATCH = 256  # chunk ids looked up in one index transaction
IOV_MAX = 512  # buffers per pwritev
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

Progress = Callable[[int, int], None]


def default_workers() -> int:
    return max(2, os.cpu_count() or 2)


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
class _OpenFile:
    """A file being restored: created and written by worker threads, hashed in order here.

    The file is created by the first thread that needs it (a worker writing its first
    chunk, or this thread for an empty file or a hard link to it), so that creating many
    small files overlaps when creation is slow (a busy journal, a network file system).
    """

    dest: str
    path: bytes
    node: Node
    hasher: blake3.blake3
    fd: int = -1
    created: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    placed: int = 0  # chunk placements planned
    done: int = 0  # chunk placements written and hashed
    size: int = 0  # bytes hashed
    planned: bool = False  # every chunk of the file is placed

    def descriptor(self) -> int:
        """The open descriptor, creating the file on first use."""
        with self.lock:
            if self.fd < 0:
                if self.created:
                    raise AssertionError(f"{self.dest} was closed before all its chunks were written")
                self.fd = os.open(self.dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                self.created = True
            return self.fd

    def ensure_created(self) -> None:
        with self.lock:
            if not self.created:
                self.fd = os.open(self.dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                self.created = True

    def close(self) -> None:
        with self.lock:
            if self.fd >= 0:
                fd, self.fd = self.fd, -1
                os.close(fd)


@dataclass(eq=False)
class _Range:
    """One read: a byte range of a pack, its distinct blobs, and where each goes."""

    pack_id: bytes
    start: int
    end: int
    blobs: list[tuple[bytes, int, int]] = field(default_factory=list)  # (id, offset, length)
    index: dict[int, int] = field(default_factory=dict)  # blob offset -> position in blobs
    places: list[tuple[int, _OpenFile, int]] = field(default_factory=list)  # (blob, file, file offset)


class _Writer:
    """Plans a snapshot's files into coalesced pack reads and writes them in parallel.

    The walking thread creates every directory, symlink and file, and turns the files'
    chunk lists into reads of pack ranges (consecutive blobs of one pack, across file
    boundaries, up to ``MAX_RANGE`` bytes); worker threads load a range, open and check
    every blob in it and ``pwrite`` it at its offsets; this thread takes the results back
    in order, feeds each file's digest and verifies the file when its last chunk is in.
    At most ``MAX_RANGES_AHEAD`` ranges and ``MAX_OPEN_FILES`` files are in flight.
    """

    def __init__(self, repo: Repository, opts: RestoreOptions, pool: ThreadPoolExecutor,
                 fsync_files: bool = True) -> None:
        self.repo = repo
        self.opts = opts
        self.pool = pool
        self.fsync_files = fsync_files
        self.result = RestoreResult()
        self.links: dict[int, _OpenFile] = {}
        self.dirs: list[tuple[str, Node]] = []
        self.open: set[_OpenFile] = set()
        self.current: _Range | None = None
        self.inflight: deque[tuple[_Range, Future[list[bytes]]]] = deque()
        self.ahead = max(2, opts.workers + 2)
        self.lookups = 0

    def write_tree(self, snap: Snapshot, staging: str) -> None:
        try:
            self._write_entries(snap, staging)
            self._flush_range()
            while self.inflight:
                self._consume_one()
        except BaseException:
            self._abandon()
            raise
        if self.open:
            raise IntegrityError(f"{len(self.open)} restored file(s) did not receive all their chunks")
        if self.opts.includes:
            self.prune_empty_dirs(staging)
        for dest, node in reversed(self.dirs):
            if os.path.isdir(dest):
                self.set_meta(dest, node)
                self.result.dirs += 1

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

    def _abandon(self) -> None:
        """After an error: let the workers stop, then close every file still open."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.inflight.clear()
        for f in self.open:
            with contextlib.suppress(OSError):
                f.close()
        self.open.clear()

    def prune_empty_dirs(self, staging: str) -> None:
        for dest, _ in reversed(self.dirs):
            with contextlib.suppress(OSError):
                os.rmdir(dest)  # only succeeds when empty

    # --- planning -------------------------------------------------------------------------

    def write_file(self, dest: str, path: bytes, node: Node) -> None:
        if node.links is not None and node.links in self.links:
            first = self.links[node.links]
            first.ensure_created()
            os.link(first.dest, dest)
            return
        while len(self.open) >= MAX_OPEN_FILES:
            if not self.inflight:
                self._flush_range()
            self._consume_one()
        f = _OpenFile(dest, path, node, self.repo.keys.hasher())
        self.open.add(f)
        if node.links is not None:
            self.links[node.links] = f
        offset = 0
        batch: list[Ref] = []
        for ref in chunk_refs(self.repo, node):
            batch.append(ref)
            if len(batch) >= LOOKUP_BATCH:
                offset = self._place_refs(f, batch, offset)
                batch = []
        offset = self._place_refs(f, batch, offset)
        f.planned = True
        if f.done == f.placed:
            self._finish(f)

    def _place_refs(self, f: _OpenFile, refs: list[Ref], offset: int) -> int:
        if not refs:
            return offset
        self.lookups += len(refs)
        if self.lookups >= RELEASE_INDEX_EVERY:
            self.lookups = 0
            release_index_pages(self.repo.cache)  # keep RSS flat: each lookup maps an index page
        for (bid, length), (_, loc) in zip(refs, self.repo.cache.lookup_many([r[0] for r in refs])):
            if loc is None:
                raise IntegrityError(f"file {os.fsdecode(f.path)}: chunk {bid.hex()[:16]} is not in the index; "
                                     "run 'kyrorepo verify'")
            if loc.type != BlobType.DATA:
                raise IntegrityError(f"file {os.fsdecode(f.path)}: chunk {bid.hex()[:16]} is a "
                                     f"{loc.type.name.lower()} blob, expected data")
            self._place(f, offset, bid, loc)
            offset += length
        return offset

    def _place(self, f: _OpenFile, offset: int, bid: bytes, loc: BlobLocation) -> None:
        r = self.current
        if r is not None and r.pack_id == loc.pack_id:
            idx = r.index.get(loc.offset)
            if idx is None and r.end <= loc.offset <= r.end + MAX_GAP \
                    and loc.offset + loc.length - r.start <= MAX_RANGE:
                idx = len(r.blobs)
                r.blobs.append((bid, loc.offset, loc.length))
                r.index[loc.offset] = idx
                r.end = loc.offset + loc.length
            if idx is not None and r.blobs[idx][0] == bid:
                r.places.append((idx, f, offset))
                f.placed += 1
                return
        self._flush_range()
        r = self.current = _Range(loc.pack_id, loc.offset, loc.offset + loc.length)
        r.blobs.append((bid, loc.offset, loc.length))
        r.index[loc.offset] = 0
        r.places.append((0, f, offset))
        f.placed += 1

    def _flush_range(self) -> None:
        r, self.current = self.current, None
        if r is None:
            return
        self.inflight.append((r, self.pool.submit(self._load_range, r)))
        while len(self.inflight) > self.ahead:
            self._consume_one()

    # --- worker side ------------------------------------------------------------------------

    def _load_range(self, r: _Range) -> list[bytes]:
        """Load one pack range, open and check every blob in it, write it where it goes."""
        name = pack_name(r.pack_id)
        try:
            data = self.repo.backend.load(name, r.start, r.end - r.start)
        except KyroError as exc:
            raise IntegrityError(f"pack {name} cannot be read ({exc.message})") from None
        if len(data) != r.end - r.start:
            raise IntegrityError(f"pack {name} is truncated")
        view = memoryview(data)
        decode = self.repo.codec.decode
        plains = [decode(BlobType.DATA, bid, view[off - r.start:off - r.start + ln], f"chunk {bid.hex()[:16]} in {name}")
                  for bid, off, ln in r.blobs]
        del view, data
        run: list[bytes] = []
        run_file: _OpenFile | None = None
        run_start = run_end = 0
        for idx, f, offset in r.places:
            if run and (f is not run_file or offset != run_end or len(run) >= IOV_MAX):
                _pwritev_all(run_file.descriptor(), run, run_start)  # type: ignore[union-attr]
                run = []
            if not run:
                run_file, run_start, run_end = f, offset, offset
            run.append(plains[idx])
            run_end += len(plains[idx])
        if run:
            _pwritev_all(run_file.descriptor(), run, run_start)  # type: ignore[union-attr]
        return plains

    # --- taking results back in order --------------------------------------------------------

    def _consume_one(self) -> None:
        r, future = self.inflight.popleft()
        plains = future.result()
        progress = self.opts.progress
        total = 0
        for idx, f, _ in r.places:
            data = plains[idx]
            f.hasher.update(data)
            f.size += len(data)
            total += len(data)
            f.done += 1
            if f.planned and f.done == f.placed:
                self._finish(f)
        if progress:
            progress(total, 0)

    def _finish(self, f: _OpenFile) -> None:
        self.open.discard(f)
        try:
            f.ensure_created()  # an empty file has no chunk to create it
            if self.fsync_files:
                os.fsync(f.fd)
        finally:
            f.close()
        if f.size != f.node.size or f.hasher.digest() != f.node.digest:
            raise IntegrityError(f"restored file {os.fsdecode(f.path)} does not match its recorded digest: "
                                 "the backup is damaged, run 'kyrorepo verify --full-scan'")
        self.set_meta(f.dest, f.node)
        self.result.bytes += f.size
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


def _pwritev_all(fd: int, bufs: list[bytes], offset: int) -> None:
    """Write ``bufs`` back to back at ``offset``, one system call when the kernel takes it all."""
    n = os.pwritev(fd, bufs, offset)
    total = sum(len(b) for b in bufs)
    if n == total:
        return
    rest = memoryview(b"".join(bufs))[n:]
    offset += n
    while rest:
        n = os.pwrite(fd, rest, offset)
        rest = rest[n:]
        offset += n


def _fsync_tree(root: str) -> None:
    for dirpath, _, filenames in os.walk(root):
        fsync_dir(dirpath)


def _syncfs_call() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_SYNCFS = _syncfs_call()


def _sync_filesystem(path: str) -> None:
    """Make every write to the file system holding ``path`` durable (Linux ``syncfs``)."""
    assert _SYNCFS is not None
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs of {path} failed: {os.strerror(err)}")
    finally:
        os.close(fd)


def clean_stale_staging(target: str) -> None:
    """Remove staging and old directories that an earlier killed restore left beside ``target``."""
    parent, name = os.path.split(target)
    if not os.path.isdir(parent):
        return
    for entry in os.listdir(parent):
        if entry.startswith((f".{name}{STAGING_TAG}", f".{name}{OLD_TAG}")):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def run_restore(repo: Repository, snap: Snapshot, opts: RestoreOptions) -> RestoreResult:
    if opts.workers < 1:
        raise UsageError(f"restore needs at least one worker thread (workers={opts.workers})")
    target = os.path.abspath(opts.target)
    if is_nonempty(target) and not opts.allow_clear:
        raise RefusedError(refuse_message(target, len(existing_files(target))))
    repo.sync_index()
    release_index_pages(repo.cache)
    parent, name = os.path.split(target)
    if not os.path.isdir(parent):
        raise UsageError(f"parent directory {parent} of the restore target does not exist: create it first")
    clean_stale_staging(target)
    in_place = os.path.isdir(target) and os.path.ismount(target)
    token = secrets.token_hex(4)
    staging = os.path.join(target, STAGING_TAG + token) if in_place else os.path.join(parent, f".{name}{STAGING_TAG}{token}")
    os.mkdir(staging, 0o700)
    tune_allocator()
    try:
        with ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="open") as pool:
            writer = _Writer(repo, opts, pool, fsync_files=_SYNCFS is None)
            writer.write_tree(snap, staging)
        writer.set_meta(staging, snap.root)
        if _SYNCFS is not None:
            _sync_filesystem(staging)
        else:
            _fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if in_place:
        _swap_entries(target, staging, token)
    else:
        _swap_dir(target, staging, parent, name, token)
    return writer.result


def _swap_dir(target: str, staging: str, parent: str, name: str, token: str) -> None:
    old = os.path.join(parent, f".{name}{OLD_TAG}{token}")
    had_old = os.path.lexists(target)
    if had_old:
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        if had_old:
            os.rename(old, target)
        raise
    fsync_dir(parent)
    if had_old:
        shutil.rmtree(old, ignore_errors=True)


def _swap_entries(target: str, staging: str, token: str) -> None:
    old = os.path.join(target, OLD_TAG + token)
    os.mkdir(old, 0o700)
    skip = {os.path.basename(staging), os.path.basename(old)}
    for entry in os.listdir(target):
        if entry not in skip:
            os.rename(os.path.join(target, entry), os.path.join(old, entry))
    fsync_dir(target)
    for entry in os.listdir(staging):
        os.rename(os.path.join(staging, entry), os.path.join(target, entry))
    st = os.stat(staging)
    os.chmod(target, stat.S_IMODE(st.st_mode))
    fsync_dir(target)
    os.rmdir(staging)
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target)
