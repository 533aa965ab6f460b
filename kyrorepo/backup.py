"""Backup: walk a data directory into a snapshot tree.

Pipeline (docs/performance.md, "Backup pipeline"), every stage bounded:

* the walking thread lists directories, stats entries, reuses unchanged files, and hands
  the files to read to ``readers`` reading threads (at most ``MAX_FILES_AHEAD`` ahead);
  it encodes each directory's tree once the files in it are done;
* a reading thread reads its file in large blocks, cuts each block with FastCDC, hashes
  the chunks in place (both release the GIL), reserves the block's new chunk ids with
  one index lookup, and copies only new chunks into batches of about ``BATCH_BYTES``;
* ``workers`` sealing threads compress (zstd releases the GIL) and seal a whole batch,
  then append it to the open pack under one lock acquisition; at most
  ``MAX_BATCHES_AHEAD`` batches wait, so memory stays flat whatever the file sizes;
* one upload thread finishes and saves full packs and writes the index segments
  (``BlobWriter.background_uploads``).

Trees and content lists are built bottom-up; the snapshot is saved last, after every
pack and index segment. A failure in any stage stops the backup with that error and
no snapshot is saved.

Unchanged files: unless ``full``, a file whose size and mtime match its node in the
parent snapshot, and whose ctime, inode and digest match the files cache entry of the
source, reuses the parent's node without being read.
"""

from __future__ import annotations

import getpass
import io
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from kyrorepo import __version__
from kyrorepo.blob import BlobCodec
from kyrorepo.chunker import Readable
from kyrorepo.dictionary import ensure_dictionary
from kyrorepo.errors import NotFoundError, UsageError
from kyrorepo.format import BlobType
from kyrorepo.repository import Repository
from kyrorepo.snapshot import Snapshot, save_snapshot
from kyrorepo.tree import (
    DIR,
    FILE,
    SYMLINK,
    ContentListBuilder,
    Node,
    decode_tree,
    encode_tree,
)
from kyrorepo.writer import BlobWriter

BATCH_BYTES = 1024 * 1024
MAX_BATCHES_AHEAD = 4
MAX_FILES_AHEAD = 64
READ_INLINE_BELOW = 1024 * 1024  # smaller files are read on the walking thread
CHANGE_RETRIES = 3
FILES_CACHE_BATCH = 4096

Progress = Callable[[int, int], None]  # (bytes done delta, files done delta)
# (relative path, absolute path) -> bytes to read, for files that grow while they are
# read (WAL segments: up to the last complete frame), or None for ordinary files.
ReadLimit = Callable[[bytes, str], "int | None"]


def default_workers() -> int:
    return max(2, os.cpu_count() or 2)


class _Limited:
    """A reader that stops after ``limit`` bytes."""

    def __init__(self, f: Readable, limit: int) -> None:
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
    workers: int = field(default_factory=default_workers)  # sealing threads
    progress: Progress | None = None
    read_limit: ReadLimit | None = None
    wal: dict | None = None  # WAL capture summary recorded in the snapshot
    readers: int = 1  # file reading threads; 0 reads on the walking thread


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


@dataclass
class _FileResult:
    node: Node | None
    warnings: list[str] = field(default_factory=list)
    incomplete: bool = False


class FileChangedError(Exception):
    pass


class BackupAborted(Exception):
    """Raised on reading threads when the backup stops because of an error elsewhere."""


class SourceReadError(Exception):
    """An OSError reading a source file, told apart from errors of the pipeline stages."""

    def __init__(self, exc: OSError) -> None:
        super().__init__(str(exc))
        self.exc = exc


class _Source:
    """A source file being read; its read errors become ``SourceReadError``."""

    def __init__(self, f: Readable) -> None:
        self.f = f

    def readinto(self, b: memoryview) -> int:
        try:
            return self.f.readinto(b) or 0
        except OSError as exc:
            raise SourceReadError(exc) from exc


def dir_bytes(path: str) -> int:
    """Apparent size of every file below ``path``: a backup's progress total, a repository's size."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for fn in files:
            try:
                total += os.lstat(os.path.join(dirpath, fn)).st_size
            except OSError:
                pass  # vanished meanwhile
    return total


def default_source(data_dir: str) -> str:
    return f"{socket.gethostname()}:{os.path.abspath(data_dir)}"


class _Sealer:
    """Compresses and seals batches of new chunks on worker threads, a bounded number ahead."""

    def __init__(self, writer: BlobWriter, codec: BlobCodec, workers: int) -> None:
        self.writer = writer
        self.codec = codec
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="seal")
        self.slots = threading.BoundedSemaphore(max(MAX_BATCHES_AHEAD, 2 * workers))
        self.error: BaseException | None = None
        self.aborted = False

    def check(self) -> None:
        if self.error is not None:
            raise self.error
        if self.aborted:
            raise BackupAborted("the backup stopped")

    def submit(self, batch: list[tuple[bytes, bytes]]) -> None:
        """Queue ``batch`` of (reserved id, chunk); blocks while too many batches wait."""
        try:
            self.check()
            self.slots.acquire()
        except BaseException:
            self.writer.release(bid for bid, _ in batch)
            raise
        try:
            self.pool.submit(self._seal, batch)
        except BaseException:
            self.slots.release()
            self.writer.release(bid for bid, _ in batch)
            raise

    def _seal(self, batch: list[tuple[bytes, bytes]]) -> None:
        done = False
        try:
            if self.error is None and not self.aborted:
                blobs = self.codec.encode_many(BlobType.DATA, batch)
                sealed = [(bid, blob, len(data)) for (bid, data), blob in zip(batch, blobs)]
                self.writer.add_reserved(BlobType.DATA, sealed)
                done = True
        except BaseException as exc:  # noqa: BLE001 - raised again on the walking thread
            if self.error is None:
                self.error = exc
        finally:
            if not done:
                self.writer.release(bid for bid, _ in batch)
            self.slots.release()

    def close(self) -> None:
        """Wait for every queued batch; raise the first error of any of them."""
        self.pool.shutdown(wait=True)
        self.check()

    def abort(self) -> None:
        """Skip (and release) every batch not yet sealed, and wait for the threads."""
        self.aborted = True
        self.pool.shutdown(wait=True)


class _Batch:
    """New chunks of one reading thread, handed to the sealer about ``BATCH_BYTES`` at a time.

    Small files share a batch, so that a tree of many small files costs one hand-over
    per batch rather than one per file. Every id in it is reserved: a batch is either
    submitted (the sealer then stores or releases it) or released.
    """

    def __init__(self, sealer: _Sealer) -> None:
        self.sealer = sealer
        self.items: list[tuple[bytes, bytes]] = []
        self.nbytes = 0

    def add(self, bid: bytes, data: bytes) -> None:
        self.items.append((bid, data))
        self.nbytes += len(data)

    def full(self) -> bool:
        return self.nbytes >= BATCH_BYTES

    def flush(self) -> None:
        if self.items:
            items, self.items, self.nbytes = self.items, [], 0
            self.sealer.submit(items)

    def release(self) -> None:
        self.sealer.writer.release(bid for bid, _ in self.items)
        self.items, self.nbytes = [], 0


class _FileReader:
    """Reads, chunks and hashes one file; new chunks go to the sealer in batches."""

    def __init__(self, repo: Repository, opts: BackupOptions, sealer: _Sealer) -> None:
        self.repo = repo
        self.opts = opts
        self.sealer = sealer

    def store_meta(self, btype: BlobType, data: bytes) -> bytes:
        bid, _ = self.repo.add_blob(btype, data)
        return bid

    def read_alone(self, path: str, rel: bytes) -> _FileResult:
        """Read one file with a batch of its own (on a reading thread)."""
        batch = _Batch(self.sealer)
        try:
            result = self.read_file(path, rel, batch)
            batch.flush()
        except BaseException:
            batch.release()
            raise
        return result

    def read_file(self, path: str, rel: bytes, batch: _Batch) -> _FileResult:
        shown = rel.decode(errors="replace")
        result = _FileResult(None)
        for attempt in range(CHANGE_RETRIES + 1):
            last = attempt == CHANGE_RETRIES
            try:
                result.node = self._read_once(path, rel, result, batch, tolerate_change=last)
                return result
            except FileChangedError:
                if not os.path.lexists(path):
                    result.warnings.append(f"{shown}: vanished during backup")
                    return result
            except SourceReadError as err:
                if isinstance(err.exc, FileNotFoundError):
                    result.warnings.append(f"{shown}: vanished during backup")
                else:
                    result.warnings.append(f"{shown}: cannot read ({err.exc.strerror or err.exc})")
                    result.incomplete = True
                return result
        raise AssertionError("unreachable")

    def _read_once(self, path: str, rel: bytes, result: _FileResult, batch: _Batch, tolerate_change: bool) -> Node:
        repo = self.repo
        blob_id = repo.keys.blob_id
        hasher = repo.keys.hasher()
        builder = ContentListBuilder(lambda data: self.store_meta(BlobType.CONTENT, data))
        progress = self.opts.progress
        size = 0
        limit = self.opts.read_limit(rel, path) if self.opts.read_limit else None
        with _open_source(path) as f:
            fst = _fstat(f.fileno())
            source = _Source(f)
            stream: Readable = source if limit is None else _Limited(source, limit)
            for block in repo.chunker.blocks_of_stream(stream):
                data = block.data
                hasher.update(data)
                start = 0
                spans = []
                for end in block.cuts:
                    spans.append((start, end))
                    start = end
                ids = [blob_id(data[a:b]) for a, b in spans]
                for bid, (a, b), new in zip(ids, spans, repo.writer.reserve(ids)):
                    if new:
                        batch.add(bid, bytes(data[a:b]))
                    builder.add((bid, b - a))
                if batch.full():
                    batch.flush()
                elif self.sealer.aborted:
                    raise BackupAborted(path)
                size += len(data)
                if progress:
                    progress(len(data), 0)
                del data, block
            after = _fstat(f.fileno())
        if limit is not None:
            # A growing WAL segment: what was read up to its last complete frame stands.
            changed = size != limit
        else:
            changed = (after.st_mtime_ns, after.st_ctime_ns, after.st_size) != \
                (fst.st_mtime_ns, fst.st_ctime_ns, fst.st_size) or size != after.st_size
        if changed:
            if not tolerate_change:
                raise FileChangedError(path)
            result.warnings.append(f"{rel.decode(errors='replace')}: changed while it was read "
                                   f"{CHANGE_RETRIES + 1} times; stored as last read")
            result.incomplete = True
        chunks, content = builder.finish()
        if progress:
            progress(0, 1)
        return Node(name=b"", type=FILE, mode=stat.S_IMODE(fst.st_mode), uid=fst.st_uid, gid=fst.st_gid,
                    mtime_ns=fst.st_mtime_ns, size=size, digest=hasher.digest(), chunks=chunks, content=content)


def _open_source(path: str) -> io.FileIO:
    try:
        f = io.FileIO(path, "rb")
    except OSError as exc:
        raise SourceReadError(exc) from exc
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
    return f


def _fstat(fd: int) -> os.stat_result:
    try:
        return os.fstat(fd)
    except OSError as exc:
        raise SourceReadError(exc) from exc


@dataclass
class _PendingFile:
    """A file handed to a reading thread; completed into a node by the walking thread."""

    name: bytes
    rel: bytes
    st: os.stat_result
    parent: Node | None
    xattrs: tuple[tuple[bytes, bytes], ...]
    future: Future[_FileResult]


class _Walker:
    def __init__(self, repo: Repository, opts: BackupOptions, reader: _FileReader,
                 readers: ThreadPoolExecutor | None) -> None:
        self.repo = repo
        self.opts = opts
        self.reader = reader
        self.readers = readers
        self.file_slots = threading.BoundedSemaphore(MAX_FILES_AHEAD)
        self.batch = _Batch(reader.sealer)  # new chunks of files read on this thread
        self.c = _Counters()
        self.links: dict[tuple[int, int], int] = {}
        self.file_stats: list[tuple[bytes, tuple[int, int, int, int, bytes]]] = []
        self.root_dir = os.path.abspath(opts.data_dir)

    # --- helpers ------------------------------------------------------------------------

    def warn(self, msg: str, incomplete: bool = False) -> None:
        self.c.warnings.append(msg)
        if incomplete:
            self.c.incomplete = True

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
        nodes: list[Node | _PendingFile] = []
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
        done = [n for n in (self.complete(n) if isinstance(n, _PendingFile) else n for n in nodes) if n is not None]
        self.c.dir_count += 1
        return self.store_meta(BlobType.TREE, encode_tree(done))

    def entry_node(self, path: str, name: bytes, rel: bytes, parent: Node | None) -> Node | _PendingFile | None:
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
                  xattrs: tuple[tuple[bytes, bytes], ...]) -> Node | _PendingFile | None:
        node = self.reuse(rel, st, parent)
        if node is not None:
            self.c.files_unmodified += 1
            return self.finish_file(node, name, rel, st, xattrs)
        self.reader.sealer.check()
        if self.readers is None or st.st_size < READ_INLINE_BELOW:
            future: Future[_FileResult] = Future()
            future.set_result(self.reader.read_file(path, rel, self.batch))
            if self.batch.full():
                self.batch.flush()
        else:
            self.file_slots.acquire()
            try:
                future = self.readers.submit(self._read_in_slot, path, rel)
            except BaseException:
                self.file_slots.release()
                raise
        return _PendingFile(name, rel, st, parent, xattrs, future)

    def _read_in_slot(self, path: str, rel: bytes) -> _FileResult:
        try:
            return self.reader.read_alone(path, rel)
        finally:
            self.file_slots.release()

    def complete(self, pending: _PendingFile) -> Node | None:
        """Wait for a file handed to a reading thread and turn its result into a node."""
        result = pending.future.result()
        for w in result.warnings:
            self.warn(w)
        if result.incomplete:
            self.c.incomplete = True
        if result.node is None:
            return None
        if pending.parent is not None and pending.parent.type == FILE:
            self.c.files_changed += 1
        else:
            self.c.files_new += 1
        return self.finish_file(result.node, pending.name, pending.rel, pending.st, pending.xattrs)

    def finish_file(self, node: Node, name: bytes, rel: bytes, st: os.stat_result,
                    xattrs: tuple[tuple[bytes, bytes], ...]) -> Node:
        links = None
        if st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            links = self.links.setdefault(key, len(self.links) + 1)
        self.c.file_count += 1
        self.c.logical_bytes += node.size
        assert node.digest is not None
        self.file_stats.append((rel, (node.size, node.mtime_ns, st.st_ctime_ns, st.st_ino, node.digest)))
        self.flush_file_stats()
        mode = stat.S_IMODE(st.st_mode)
        if (node.name, node.mode, node.uid, node.gid, node.links, node.xattrs) == \
                (name, mode, st.st_uid, st.st_gid, links, xattrs):
            return node  # an unchanged file reuses its parent node as is (replace() is slow)
        return replace(node, name=name, mode=mode, uid=st.st_uid, gid=st.st_gid, links=links, xattrs=xattrs)

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


def _walk_tree(repo: Repository, opts: BackupOptions, root: str) -> tuple[bytes, _Walker]:
    """Run the pipeline over ``root``; return its tree id once every blob is in a pack."""
    sealer = _Sealer(repo.writer, repo.codec, opts.workers)
    readers = ThreadPoolExecutor(max_workers=opts.readers, thread_name_prefix="read") if opts.readers > 0 else None
    walker = _Walker(repo, opts, _FileReader(repo, opts, sealer), readers)
    try:
        tree = walker.dir_tree(root, b"", opts.parent.tree if opts.parent else None)
        walker.batch.flush()
    except BaseException:
        sealer.aborted = True  # reading threads stop at their next block
        walker.batch.release()
        if readers is not None:
            readers.shutdown(wait=True, cancel_futures=True)
        sealer.abort()
        raise
    if readers is not None:
        readers.shutdown(wait=True)
    sealer.close()
    return tree, walker


def run_backup(repo: Repository, opts: BackupOptions) -> BackupResult:
    """Back up ``opts.data_dir`` into ``repo``; the caller holds a shared lock."""
    root = os.path.abspath(opts.data_dir)
    try:
        st = os.stat(root)
    except FileNotFoundError:
        raise NotFoundError(f"data directory {root} does not exist: check --data-dir") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"data directory {root} is not a directory")
    if opts.workers < 1 or opts.readers < 0:
        raise UsageError(f"backup needs at least one sealing thread (workers={opts.workers}, readers={opts.readers})")
    started = time.time()
    repo.sync_index()
    ensure_dictionary(repo, root)
    before = (repo.writer.stats.raw_bytes_added, repo.writer.stats.stored_bytes_added)
    with repo.writer.background_uploads():
        tree, walker = _walk_tree(repo, opts, root)
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
