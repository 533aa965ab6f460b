"""Backup: walk a data directory into a snapshot tree.

Pipeline: the walking thread reads each file with buffered reads, cuts it with FastCDC
and hashes every chunk (both release the GIL); chunks the repository lacks go to a pool
of workers that compress, seal and pack them. At most ``MAX_INFLIGHT`` chunks are
queued, so memory stays flat whatever the file sizes. Trees and content lists are
built bottom-up; the snapshot is saved last, after every pack and index segment.

Unchanged files: unless ``full``, a file whose size and mtime match its node in the
parent snapshot, and whose ctime, inode and digest match the files cache entry of the
source, reuses the parent's node without being read.
"""

from __future__ import annotations

import getpass
import os
import socket
import stat
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable

from kyrorepo import __version__
from kyrorepo.errors import NotFoundError, UsageError
from kyrorepo.format import BlobType
from kyrorepo.repository import Repository
from kyrorepo.snapshot import Snapshot, save_snapshot
from kyrorepo.tree import DIR, FILE, SYMLINK, ContentListBuilder, Node, decode_tree, encode_tree

READ_SIZE = 1024 * 1024
MAX_INFLIGHT = 64
CHANGE_RETRIES = 3
FILES_CACHE_BATCH = 4096

Progress = Callable[[int, int], None]  # (bytes done delta, files done delta)
# (relative path, absolute path) -> bytes to read, for files that grow while they are
# read (WAL segments: up to the last complete frame), or None for ordinary files.
ReadLimit = Callable[[bytes, str], "int | None"]


class _Limited:
    """A reader that stops after ``limit`` bytes."""

    def __init__(self, f, limit: int) -> None:  # type: ignore[no-untyped-def]
        self.f = f
        self.left = limit

    def readinto(self, b: memoryview) -> int:
        if self.left <= 0:
            return 0
        view = memoryview(b)[: self.left] if len(b) > self.left else b
        n = self.f.readinto(view)
        self.left -= n or 0
        return n or 0


@dataclass
class BackupOptions:
    data_dir: str
    source: str
    parent: Snapshot | None = None
    full: bool = False
    tags: tuple[str, ...] = ()
    description: str = ""
    time: int | None = None
    kind: str = "incremental"
    workers: int = 2
    progress: Progress | None = None
    read_limit: ReadLimit | None = None
    wal: dict | None = None  # WAL capture summary recorded in the snapshot


@dataclass
class BackupResult:
    snapshot: Snapshot
    warnings: list[str]
    incomplete: bool
    duration: float


@dataclass
class _Counters:
    logical_bytes: int = 0
    file_count: int = 0
    dir_count: int = 0
    files_new: int = 0
    files_changed: int = 0
    files_unmodified: int = 0
    warnings: list[str] = field(default_factory=list)
    incomplete: bool = False


class FileChangedError(Exception):
    pass


def default_source(data_dir: str) -> str:
    return f"{socket.gethostname()}:{os.path.abspath(data_dir)}"


class _Walker:
    def __init__(self, repo: Repository, opts: BackupOptions, pool: ThreadPoolExecutor) -> None:
        self.repo = repo
        self.opts = opts
        self.pool = pool
        self.inflight: deque[Future] = deque()
        self.c = _Counters()
        self.links: dict[tuple[int, int], int] = {}
        self.file_stats: list[tuple[bytes, tuple[int, int, int, int, bytes]]] = []
        self.root_dir = os.path.abspath(opts.data_dir)

    # --- helpers ------------------------------------------------------------------------

    def warn(self, msg: str, incomplete: bool = False) -> None:
        self.c.warnings.append(msg)
        if incomplete:
            self.c.incomplete = True

    def _submit(self, btype: BlobType, data: bytes, bid: bytes) -> None:
        while len(self.inflight) >= MAX_INFLIGHT:
            self.inflight.popleft().result()
        self.inflight.append(self.pool.submit(self.repo.writer.add, btype, data, bid))

    def drain(self) -> None:
        while self.inflight:
            self.inflight.popleft().result()

    def store_meta(self, btype: BlobType, data: bytes) -> bytes:
        bid, _ = self.repo.add_blob(btype, data)
        return bid

    def load_parent_tree(self, tree_id: bytes | None) -> dict[bytes, Node]:
        if tree_id is None:
            return {}
        return {n.name: n for n in decode_tree(self.repo.load_blob(tree_id, BlobType.TREE), f"tree {tree_id.hex()[:16]}")}

    def flush_file_stats(self, force: bool = False) -> None:
        if self.file_stats and (force or len(self.file_stats) >= FILES_CACHE_BATCH):
            self.repo.cache.put_file_stats(self.opts.source, self.file_stats)
            self.file_stats = []

    # --- nodes ----------------------------------------------------------------------------

    def base_node(self, name: bytes, ntype: str, st: os.stat_result) -> Node:
        return Node(name=name, type=ntype, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                    mtime_ns=st.st_mtime_ns, size=st.st_size if ntype == FILE else 0)

    def xattrs(self, path: str) -> tuple[tuple[bytes, bytes], ...]:
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError:
            return ()
        out = []
        for n in sorted(names):
            try:
                out.append((n.encode(), os.getxattr(path, n, follow_symlinks=False)))
            except OSError:
                continue
        return tuple(out)

    def dir_tree(self, path: str, rel: bytes, parent_tree: bytes | None) -> bytes:
        """Store the tree of directory ``path`` and return its id."""
        parent_nodes = self.load_parent_tree(parent_tree)
        nodes: list[Node] = []
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: os.fsencode(e.name))
        except OSError as exc:
            self.warn(f"{rel.decode(errors='replace') or '.'}: cannot read directory ({exc.strerror})", incomplete=True)
            entries = []
        for entry in entries:
            name = os.fsencode(entry.name)
            child_rel = rel + b"/" + name if rel else name
            node = self.entry_node(entry.path, name, child_rel, parent_nodes.get(name))
            if node is not None:
                nodes.append(node)
        self.c.dir_count += 1
        return self.store_meta(BlobType.TREE, encode_tree(nodes))

    def entry_node(self, path: str, name: bytes, rel: bytes, parent: Node | None) -> Node | None:
        shown = rel.decode(errors="replace")
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self.warn(f"{shown}: vanished during backup")
            return None
        except OSError as exc:
            self.warn(f"{shown}: cannot stat ({exc.strerror})", incomplete=True)
            return None
        xattrs = self.xattrs(path)
        if stat.S_ISDIR(st.st_mode):
            sub = self.dir_tree(path, rel, parent.subtree if parent is not None and parent.type == DIR else None)
            return replace(self.base_node(name, DIR, st), subtree=sub, xattrs=xattrs)
        if stat.S_ISLNK(st.st_mode):
            try:
                target = os.fsencode(os.readlink(path))
            except OSError as exc:
                self.warn(f"{shown}: cannot read symlink ({exc.strerror})", incomplete=True)
                return None
            return replace(self.base_node(name, SYMLINK, st), target=target, xattrs=xattrs)
        if stat.S_ISREG(st.st_mode):
            return self.file_node(path, name, rel, st, parent, xattrs)
        self.warn(f"{shown}: skipped, not a regular file, directory or symlink")
        return None

    def file_node(self, path: str, name: bytes, rel: bytes, st: os.stat_result, parent: Node | None,
                  xattrs: tuple[tuple[bytes, bytes], ...]) -> Node | None:
        links = None
        if st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            links = self.links.setdefault(key, len(self.links) + 1)
        node = self.reuse(rel, st, parent)
        if node is not None:
            self.c.files_unmodified += 1
        else:
            node = self.read_file(path, rel, st)
            if node is None:
                return None
            if parent is not None and parent.type == FILE:
                self.c.files_changed += 1
            else:
                self.c.files_new += 1
        self.c.file_count += 1
        self.c.logical_bytes += node.size
        assert node.digest is not None
        self.file_stats.append((rel, (node.size, node.mtime_ns, st.st_ctime_ns, st.st_ino, node.digest)))
        self.flush_file_stats()
        return replace(node, name=name, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                       links=links, xattrs=xattrs)

    def reuse(self, rel: bytes, st: os.stat_result, parent: Node | None) -> Node | None:
        if self.opts.full or parent is None or parent.type != FILE or parent.digest is None:
            return None
        if parent.size != st.st_size or parent.mtime_ns != st.st_mtime_ns:
            return None
        cached = self.repo.cache.file_stat(self.opts.source, rel)
        if cached is None:
            return None
        size, mtime, ctime, ino, digest = cached
        if (size, mtime, ctime, ino) != (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) or digest != parent.digest:
            return None
        if self.opts.progress:
            self.opts.progress(st.st_size, 1)
        return parent

    def read_file(self, path: str, rel: bytes, st: os.stat_result) -> Node | None:
        shown = rel.decode(errors="replace")
        for attempt in range(CHANGE_RETRIES + 1):
            last = attempt == CHANGE_RETRIES
            try:
                return self._read_once(path, rel, st, tolerate_change=last)
            except FileChangedError:
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    self.warn(f"{shown}: vanished during backup")
                    return None
            except FileNotFoundError:
                self.warn(f"{shown}: vanished during backup")
                return None
            except OSError as exc:
                self.warn(f"{shown}: cannot read ({exc.strerror or exc})", incomplete=True)
                return None
        raise AssertionError("unreachable")

    def _read_once(self, path: str, rel: bytes, st: os.stat_result, tolerate_change: bool) -> Node:
        hasher = self.repo.keys.hasher()
        builder = ContentListBuilder(lambda data: self.store_meta(BlobType.CONTENT, data))
        size = 0
        limit = self.opts.read_limit(rel, path) if self.opts.read_limit else None
        with open(path, "rb", buffering=READ_SIZE) as f:
            fst = os.fstat(f.fileno())
            stream = f if limit is None else _Limited(f, limit)
            for chunk in self.repo.chunker.chunks_of_stream(stream):
                hasher.update(chunk)
                bid = self.repo.keys.blob_id(chunk)
                if not self.repo.writer.known(bid):
                    self._submit(BlobType.DATA, chunk, bid)
                builder.add((bid, len(chunk)))
                size += len(chunk)
                if self.opts.progress:
                    self.opts.progress(len(chunk), 0)
            after = os.fstat(f.fileno())
        if limit is not None:
            # A growing WAL segment: what was read up to its last complete frame stands.
            changed = size != limit
        else:
            changed = (after.st_mtime_ns, after.st_ctime_ns, after.st_size) != \
                (fst.st_mtime_ns, fst.st_ctime_ns, fst.st_size) or size != after.st_size
        if changed:
            if not tolerate_change:
                raise FileChangedError(path)
            self.warn(f"{rel.decode(errors='replace')}: changed while it was read {CHANGE_RETRIES + 1} times; "
                      "stored as last read", incomplete=True)
        chunks, content = builder.finish()
        if self.opts.progress:
            self.opts.progress(0, 1)
        return Node(name=b"", type=FILE, mode=stat.S_IMODE(fst.st_mode), uid=fst.st_uid, gid=fst.st_gid,
                    mtime_ns=fst.st_mtime_ns, size=size, digest=hasher.digest(), chunks=chunks, content=content)


def run_backup(repo: Repository, opts: BackupOptions) -> BackupResult:
    """Back up ``opts.data_dir`` into ``repo``; the caller holds a shared lock."""
    root = os.path.abspath(opts.data_dir)
    try:
        st = os.stat(root)
    except FileNotFoundError:
        raise NotFoundError(f"data directory {root} does not exist: check --data-dir") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"data directory {root} is not a directory")
    started = time.time()
    repo.sync_index()
    before = (repo.writer.stats.raw_bytes_added, repo.writer.stats.stored_bytes_added)
    with ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="seal") as pool:
        walker = _Walker(repo, opts, pool)
        try:
            tree = walker.dir_tree(root, b"", opts.parent.tree if opts.parent else None)
        finally:
            walker.drain()
    repo.flush()
    walker.flush_file_stats(force=True)
    c = walker.c
    finished = time.time()
    stats = {
        "logical_bytes": c.logical_bytes,
        "added_bytes": repo.writer.stats.raw_bytes_added - before[0],
        "stored_bytes": repo.writer.stats.stored_bytes_added - before[1],
        "file_count": c.file_count,
        "dir_count": c.dir_count,
        "files_new": c.files_new,
        "files_changed": c.files_changed,
        "files_unmodified": c.files_unmodified,
        "duration_ms": int((finished - started) * 1000),
    }
    t_start = opts.time if opts.time is not None else int(started)
    t_end = opts.time if opts.time is not None else int(finished)
    root_node = Node(name=b"", type=DIR, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                     mtime_ns=st.st_mtime_ns, subtree=tree)
    snap = Snapshot(
        time=t_start, end_time=t_end, host=socket.gethostname(), username=getpass.getuser(),
        source=opts.source, data_dir=root, root=root_node, kind=opts.kind,
        parent=opts.parent.id if opts.parent else None, tags=tuple(opts.tags),
        description=opts.description, stats=stats, warnings=tuple(c.warnings),
        program=f"kyrorepo {__version__}", wal=opts.wal,
    )
    snap = save_snapshot(repo, snap)
    return BackupResult(snap, c.warnings, c.incomplete, finished - started)

