"""Continuous WAL capture: WAL-aware backups, the ``wal-archive`` loop, ``wal-push``/``wal-fetch``.

Captures are their own small sealed objects (``walcaps/<id>``, ``kyrorepo.wal.capture``),
not backups: ``list`` never shows them. Each lists every segment present and stores the
valid prefix of the segments that are new or grew since the capture it was compared
with; content-defined chunking makes a re-captured growing segment cost its new tail.
Order of writes (a kill at any instant leaves only unreferenced data): chunks and
content lists into packs, ``flush`` (packs, then their index segment), then the capture
object. Every capture that writes holds a shared lock and re-reads the index first, so
it never trusts a cached blob that prune removed.

Decoded capture objects are cached in ``<cache>/<repo id>/walcaps`` (LMDB, keyed by the
object's name; objects never change, so the cache only saves reads).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO, cast

import lmdb

from kyrorepo.errors import IntegrityError, KyroError, NotFoundError, UsageError
from kyrorepo.format import BlobType
from kyrorepo.lmdbutil import lmdb_file_intact
from kyrorepo.repository import Repository
from kyrorepo.snapshot import Snapshot
from kyrorepo.tree import FILE, ContentListBuilder, Node, packb, unpackb
from kyrorepo.wal import ChronicleCodec, KyroDBCodec, SegmentsCodec, WalCodec, detect_codec, get_codec
from kyrorepo.wal.base import Gap, SegmentScan, walk_relpaths
from kyrorepo.wal.capture import (
    KIND_ARCHIVE,
    KIND_PUSH,
    BackupWal,
    Capture,
    ContentRef,
    StoredSegment,
    present_of,
)
from kyrorepo.wal.kyrodb import HEADER as KYRODB_HEADER
from kyrorepo.wal.timeline import Fold, State, Version
from kyrorepo.walk import chunk_refs

NO_WAL = "none"
READ_SIZE = 1024 * 1024
NS = 1_000_000_000

# --- codecs ------------------------------------------------------------------------------


def codec_from_spec(spec: str) -> WalCodec:
    """``--wal`` value: ``kyrodb``, ``chronicle``, ``segments`` or ``segments:GLOB[,GLOB]``."""
    name, _, globs = spec.partition(":")
    if globs:
        if name != "segments":
            raise UsageError(f"--wal {spec}: only the segments codec takes globs (segments:*.log)")
        return get_codec(name, patterns=[g for g in globs.split(",") if g])
    return get_codec(name)


def choose_codec(spec: str | None, data_dir: str) -> WalCodec | None:
    """The codec for a data directory: ``--wal`` if given (``none``: no WAL), else detected."""
    if spec is not None:
        return None if spec == NO_WAL else codec_from_spec(spec)
    return detect_codec(data_dir)


def codec_options(codec: WalCodec) -> dict[str, Any]:
    if isinstance(codec, SegmentsCodec):
        return {"patterns": list(codec.patterns)}
    return {}


def recorded_codec(name: str, options: dict[str, Any]) -> WalCodec:
    return get_codec(name, **options)


def guess_file_codec(path: str) -> WalCodec:
    """For ``wal-push`` without ``--wal``: KyroDB or Chronicle by name and content, else
    the segments codec (the whole file, timed by the push)."""
    name = os.path.basename(path)
    with open(path, "rb") as f:
        kyro, chron = KyroDBCodec(), ChronicleCodec()
        if kyro.is_segment(name) and f.read(len(KYRODB_HEADER)) == KYRODB_HEADER:
            return kyro
        if chron.is_segment(name) and not chron.segment_identity(name, f).endswith("#empty"):
            return chron
    return SegmentsCodec(("*",))


# --- storing and reading segment bytes ---------------------------------------------------------


class _Prefix(io.RawIOBase):
    """The first ``limit`` bytes of a file object, read from its start."""

    def __init__(self, f: BinaryIO, limit: int) -> None:
        super().__init__()
        f.seek(0)
        self.f = f
        self.left = limit

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        if self.left <= 0:
            return 0
        data = self.f.read(min(len(view), self.left, READ_SIZE))
        view[: len(data)] = data
        self.left -= len(data)
        return len(data)


def store_prefix(repo: Repository, f: BinaryIO, length: int, what: str) -> ContentRef:
    """Chunk and store ``f[:length]``; the caller flushes before referencing it."""
    hasher = repo.keys.hasher()
    builder = ContentListBuilder(lambda data: repo.add_blob(BlobType.CONTENT, data)[0])
    size = 0
    for chunk in repo.chunker.chunks_of_stream(cast(BinaryIO, _Prefix(f, length))):
        hasher.update(chunk)
        bid, _ = repo.add_blob(BlobType.DATA, chunk)
        builder.add((bid, len(chunk)))
        size += len(chunk)
    if size != length:
        raise KyroError(f"WAL segment {what} shrank while it was captured; capture it again")
    chunks, content = builder.finish()
    return ContentRef(size, hasher.digest(), chunks, content)


def prefix_digest(repo: Repository, f: BinaryIO, length: int) -> bytes:
    hasher = repo.keys.hasher()
    src = _Prefix(f, length)
    while block := src.read(READ_SIZE):
        hasher.update(block)
    return hasher.digest()


def content_node(ref: ContentRef) -> Node:
    return Node(name=b"", type=FILE, size=ref.size, digest=ref.digest, chunks=ref.chunks,
                content=ref.content)


def copy_verified(repo: Repository, node: Node, out: BinaryIO, what: str) -> int:
    """Write a file node's bytes to ``out``; IntegrityError unless they match its digest."""
    hasher = repo.keys.hasher()
    size = 0
    for bid, _ in chunk_refs(repo, node):
        data = repo.load_blob(bid, BlobType.DATA)
        out.write(data)
        hasher.update(data)
        size += len(data)
    if size != node.size or hasher.digest() != node.digest:
        raise IntegrityError(f"{what} does not match its recorded digest: the repository is "
                             "damaged, run 'kyrorepo verify --full-scan'")
    return size


# --- capture objects ---------------------------------------------------------------------


def save_capture(repo: Repository, cap: Capture) -> Capture:
    return replace(cap, id=repo.save_object(BlobType.WALCAP, packb(cap.to_obj())))


def _open_catalog(repo: Repository) -> lmdb.Environment:
    path = os.path.join(repo.cache_root, repo.config.repo_id, "walcaps")
    if not lmdb_file_intact(path):
        shutil.rmtree(path, ignore_errors=True)  # a truncated map would crash with SIGBUS
    for attempt in (0, 1):
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            return lmdb.open(path, map_size=1 << 40, subdir=True, readahead=False, metasync=False)
        except lmdb.Error:
            if attempt:
                raise
            shutil.rmtree(path, ignore_errors=True)  # only a cache
    raise AssertionError("unreachable")


def load_captures(repo: Repository, source: str | None = None) -> list[Capture]:
    """Every capture (of ``source``), oldest first."""
    names = repo.object_names(BlobType.WALCAP)
    wanted = {bytes.fromhex(n) for n in names}
    env = _open_catalog(repo)
    out = []
    try:
        with env.begin(write=True) as txn:
            for key in [bytes(k) for k in txn.cursor().iternext(values=False)]:
                if key not in wanted:
                    txn.delete(key)
            for name in names:
                raw = txn.get(bytes.fromhex(name))
                if raw is None:
                    raw = repo.load_object(BlobType.WALCAP, name)
                    txn.put(bytes.fromhex(name), raw)
                cap = Capture.from_obj(unpackb(bytes(raw), f"WAL capture {name[:8]}"), name)
                if source is None or cap.source == source:
                    out.append(cap)
    finally:
        env.close()
    out.sort(key=lambda c: (c.time_ns, c.id))
    return out


def capture_state(cap: Capture) -> State:
    stored = tuple(Version(s.scan, s.data, cap.time_ns, cap.id) for s in cap.stored)
    return State(cap.id, cap.kind, cap.time, cap.time, cap.complete, cap.present, stored)


def backup_wal(snap: Snapshot) -> BackupWal | None:
    return None if not snap.wal else BackupWal.from_obj(snap.wal, f"backup {snap.short_id}")


# --- WAL-aware backups -----------------------------------------------------------------------


class WalBackup:
    """``BackupOptions.read_limit`` and ``.wal`` for a WAL-bearing directory.

    Every segment is scanned before the backup; ``read_limit`` makes the backup read a
    segment up to that scan's valid length (its last complete frame), so a growing
    segment is neither torn nor "changed while read". A segment that was replaced since
    (a rotation) is scanned again. ``record`` is the dict the snapshot records as its
    ``wal`` field; it is updated in place as segments are re-scanned.
    """

    def __init__(self, codec: WalCodec, data_dir: str, time_ns: int) -> None:
        self.codec = codec
        self.root = os.path.abspath(data_dir)
        self.time_ns = time_ns
        self.scans: dict[str, SegmentScan] = {}
        self.warnings: list[str] = []
        self.record: dict[str, Any] = {}
        self._lock = threading.Lock()  # backups read files on several threads
        for rel in walk_relpaths(self.root):
            if codec.is_segment(rel):
                try:
                    with open(os.path.join(self.root, rel), "rb") as f:
                        self._scan(rel, f)
                except OSError:
                    continue  # gone, or unreadable: the backup reports it
        self._publish()

    def read_limit(self, rel: bytes, path: str) -> int | None:
        """Bytes to read of a file: a segment's valid length, None for other files (and for
        a file that cannot be opened: the backup reports that itself). Thread-safe."""
        relpath = os.fsdecode(rel)
        if not self.codec.is_segment(relpath):
            return None
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                with self._lock:
                    known = self.scans.get(relpath)
                    if (known is not None and size >= known.end_of_valid
                            and self.codec.segment_identity(relpath, f) == known.identity):
                        return known.end_of_valid
                    scan = self._scan(relpath, f)
                    self._publish()
        except OSError:
            return None
        return None if scan is None else scan.end_of_valid

    def _scan(self, rel: str, f: BinaryIO) -> SegmentScan | None:
        try:
            scan = self.codec.scan(rel, f, capture_time_ns=self.time_ns)
        except IntegrityError as e:
            self.scans.pop(rel, None)
            self.warnings.append(f"{e.message}; backed up as a plain file, PITR cannot use it")
            return None
        self.scans[rel] = scan
        return scan

    def _publish(self) -> None:
        wal = BackupWal(self.codec.name, codec_options(self.codec), self.time_ns,
                        tuple(self.scans.values()))
        self.record.clear()
        self.record.update(wal.to_obj())


# --- the wal-archive loop ----------------------------------------------------------------


@dataclass
class CaptureResult:
    capture: Capture | None  # None: nothing changed, no object saved
    stored: int = 0  # segments whose bytes were stored
    present: int = 0
    added_bytes: int = 0
    gaps: list[Gap] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


StatKey = tuple[int, int, int, int]  # dev, inode, size, mtime_ns


class Archiver:
    """Captures one directory's WAL growth; keeps the last capture's state in memory.

    The state it compares with is rebuilt from the source's earlier captures when it
    starts, so a run that finds nothing changed saves nothing, even as a new process.
    """

    def __init__(self, repo: Repository, codec: WalCodec, data_dir: str, source: str) -> None:
        self.repo = repo
        self.codec = codec
        self.root = os.path.abspath(data_dir)
        self.source = source
        self.host = socket.gethostname()
        self.baseline: dict[str, StoredSegment] | None = None
        self._stats: dict[str, StatKey] | None = None
        self._scans: dict[tuple[int, int], tuple[StatKey, SegmentScan]] = {}

    def seed(self) -> None:
        fold = Fold(self.codec, {})
        for cap in load_captures(self.repo, self.source):
            if cap.kind == KIND_ARCHIVE and cap.codec == self.codec.name:
                fold.add(capture_state(cap))
        self.baseline = {}
        for ident, v in fold.current.items():
            assert isinstance(v.ref, ContentRef)
            scan = replace(v.scan, relpath=fold.names.get(ident, v.scan.relpath))
            self.baseline[ident] = StoredSegment(scan, v.ref)

    def capture(self, when_ns: int | None = None) -> CaptureResult:
        if not os.path.isdir(self.root):
            raise NotFoundError(f"data directory {self.root} does not exist: check --data-dir")
        if self.baseline is None:
            self.seed()
        assert self.baseline is not None
        stats = self._segment_stats()
        if stats == self._stats:
            return CaptureResult(None, present=len(self.baseline))
        now_ns = time.time_ns() if when_ns is None else when_ns
        result = CaptureResult(None)
        with self.repo.lock():
            self.repo.sync_index(force=True)
            before = self.repo.writer.stats.raw_bytes_added
            current, stored = self._scan_and_store(stats, now_ns, result)
            names = {i: s.scan.relpath for i, s in current.items()}
            if stored or names != {i: s.scan.relpath for i, s in self.baseline.items()}:
                self.repo.flush()
                cap = Capture(self.source, self.host, KIND_ARCHIVE, now_ns // NS, now_ns,
                              self.codec.name, codec_options(self.codec),
                              tuple(present_of(s.scan) for s in current.values()), tuple(stored))
                result.capture = save_capture(self.repo, cap)
                result.added_bytes = self.repo.writer.stats.raw_bytes_added - before
                result.gaps = self.codec.capture_gaps([s.scan for s in self.baseline.values()],
                                                      [s.scan for s in current.values()])
        result.stored, result.present = len(stored), len(current)
        self.baseline, self._stats = current, stats
        return result

    def _segment_stats(self) -> dict[str, StatKey]:
        out = {}
        for rel in walk_relpaths(self.root):
            if self.codec.is_segment(rel):
                try:
                    st = os.lstat(os.path.join(self.root, rel))
                except FileNotFoundError:
                    continue
                out[rel] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        return out

    def _scan_and_store(
        self, stats: dict[str, StatKey], now_ns: int, result: CaptureResult
    ) -> tuple[dict[str, StoredSegment], list[StoredSegment]]:
        assert self.baseline is not None
        current: dict[str, StoredSegment] = {}
        stored: list[StoredSegment] = []
        scans: dict[tuple[int, int], tuple[StatKey, SegmentScan]] = {}
        for rel in stats:
            try:
                f = open(os.path.join(self.root, rel), "rb")
            except FileNotFoundError:
                continue
            with f:
                st = os.fstat(f.fileno())
                key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                cached = self._scans.get(key[:2])
                try:
                    if cached is not None and cached[0] == key:
                        scan = replace(cached[1], relpath=rel)
                    else:
                        scan = self.codec.scan(rel, f, capture_time_ns=now_ns)
                except IntegrityError as e:
                    result.warnings.append(f"{e.message}; not captured")
                    continue
                scans[key[:2]] = (key, scan)
                old = self.baseline.get(scan.identity)
                if old is not None and old.scan.end_of_valid == scan.end_of_valid:
                    current[scan.identity] = StoredSegment(replace(old.scan, relpath=rel), old.data)
                    continue
                seg = StoredSegment(scan, store_prefix(self.repo, f, scan.end_of_valid, rel))
                stored.append(seg)
                current[scan.identity] = seg
        self._scans = scans
        return current, stored


# --- wal-push / wal-fetch ----------------------------------------------------------------


@dataclass
class PushResult:
    capture: Capture | None  # None when the same file was pushed before
    name: str
    size: int
    already: bool


def push_relpath(path: str, cwd: str) -> str:
    """The pushed file's name relative to ``cwd`` (the database's data directory, where
    archive commands run) when it lies below it, else its base name."""
    full = os.path.abspath(os.path.join(cwd, path))
    rel = os.path.relpath(full, cwd)
    if rel.startswith(os.pardir + os.sep) or rel == os.pardir or os.path.isabs(rel):
        return os.path.basename(full)
    return rel.replace(os.sep, "/")


def pushed_versions(caps: list[Capture], name: str) -> Iterator[tuple[Capture, StoredSegment]]:
    for cap in caps:
        for seg in cap.stored:
            rel = seg.scan.relpath
            if rel == name or rel.rsplit("/", 1)[-1] == name:
                yield cap, seg


def push_file(repo: Repository, path: str, source: str, codec: WalCodec | None,
              cwd: str, when_ns: int | None = None) -> PushResult:
    """Store one WAL file; a no-op when the same bytes were pushed under its name."""
    relpath = push_relpath(path, cwd)
    name = relpath.rsplit("/", 1)[-1]
    codec = codec or guess_file_codec(path)
    now_ns = time.time_ns() if when_ns is None else when_ns
    with open(path, "rb") as f:
        scan = codec.scan(relpath, f, capture_time_ns=now_ns)
        digest = prefix_digest(repo, f, scan.end_of_valid)
        with repo.lock():
            repo.sync_index(force=True)
            caps = [c for c in load_captures(repo, source) if c.kind == KIND_PUSH]
            earlier = list(pushed_versions(caps, name))
            if any(s.data.digest == digest and s.data.size == scan.end_of_valid for _, s in earlier):
                return PushResult(None, name, scan.end_of_valid, True)
            if earlier:
                raise KyroError(
                    f"wal-push {path}: a different file named {name} was already pushed for "
                    f"source {source} (capture {earlier[0][0].id[:8]}); it was not replaced: "
                    "check the archive command and the --source name")
            data = store_prefix(repo, f, scan.end_of_valid, relpath)
            if data.digest != digest:
                raise KyroError(f"wal-push {path}: the file changed while it was pushed; push it again")
            repo.flush()
            cap = Capture(source, socket.gethostname(), KIND_PUSH, now_ns // NS, now_ns, codec.name,
                          codec_options(codec), (present_of(scan),), (StoredSegment(scan, data),))
            return PushResult(save_capture(repo, cap), name, data.size, False)


def fetch_file(repo: Repository, name: str, dest: str, source: str) -> tuple[Capture, int]:
    """Write the longest captured version of the WAL file ``name`` to ``dest`` (atomically)."""
    repo.sync_index()
    found = list(pushed_versions(load_captures(repo, source), name))
    if not found:
        raise NotFoundError(f"WAL file {name} of source {source} is not in the repository: check the "
                            "name and --source ('kyrorepo pitr-window' lists the sources)")
    cap, seg = max(found, key=lambda cs: (cs[1].scan.end_of_valid, cs[0].time_ns))
    tmp = f"{dest}.kyrorepo-fetch"
    try:
        with open(tmp, "wb") as out:
            size = copy_verified(repo, content_node(seg.data), cast(BinaryIO, out),
                                 f"WAL file {name} of capture {cap.id[:8]}")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return cap, size
