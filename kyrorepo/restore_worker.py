"""Restore's tasks, run in worker processes (kyrorepo.procpool) or, as a fallback, threads.

``write_range`` loads one pack range, opens every blob in it (AES-GCM authenticates it as
the blob its id and type name) and writes the plaintext at its file offsets (runs of
consecutive chunks; their page-aligned middle with direct I/O, kyrorepo.directio); a file
whose every chunk lies in the range is checked against its digest right here, from the
plaintext in memory. Chunks are not re-hashed against their ids: every restored file is
checked against its recorded digest, which covers each of its bytes in order, so a chunk
that does not match its id fails its file (``verify --full-scan`` then names the chunk).
``check_file`` hashes a file written by several ranges back from the disk once its last
chunk is in (direct reads: what the device holds, not what the page cache remembers).
Only byte counts and errors go back to the parent, never plaintext.
Files are created by the first task that writes to them (``O_CREAT``), so creating many
small files is spread over the workers; the parent creates only empty files and the
first of a set of hard links.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from kyrorepo import directio
from kyrorepo.backends.base import load_view
from kyrorepo.errors import IntegrityError, KyroError
from kyrorepo.format import BlobType
from kyrorepo.procpool import WorkerContext

IOV_MAX = 512  # buffers per pwritev
READ_BLOCK = 4 * 1024 * 1024  # bytes per read when a file is hashed back from disk
SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return fn  # type: ignore[no-any-return]


_SYNC_FILE_RANGE = _sync_file_range()


@dataclass(frozen=True)
class FileCheck:
    """A restored file and what it must hash to: ``shown`` names it in messages."""

    dest: str
    shown: str
    size: int
    digest: bytes
    fsync: bool  # no syncfs on this platform: the file is fsynced once it is checked

    def confirm(self, size: int, digest: bytes) -> None:
        """Raise unless the restored file's size and digest are the recorded ones."""
        if size != self.size or digest != self.digest:
            raise mismatch(self.shown)

    def make_durable(self, fd: int | None = None) -> None:
        """fsync the file when the platform has no ``syncfs`` (``fsync``): through ``fd``, a
        descriptor of it the caller holds, else a new one."""
        if not self.fsync:
            return
        if fd is not None:
            os.fsync(fd)
            return
        fd = os.open(self.dest, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class RangeTask:
    """One read of a pack range and where its blobs go.

    ``blobs``: (id, offset in the pack, sealed length), each once; ``places``: (blob
    index, file index, file offset) in file order; ``files``: per file index its
    destination, its name in messages, and its ``FileCheck`` when the range holds the
    whole file (else None); ``types``: (blob index, type) of the blobs sealed as another
    type than data (a chunk whose plaintext a tree or content list has too).
    """

    pack: str
    start: int
    end: int
    blobs: tuple[tuple[bytes, int, int], ...]
    places: tuple[tuple[int, int, int], ...]
    files: tuple[tuple[str, str, FileCheck | None], ...]
    types: tuple[tuple[int, BlobType], ...] = ()


@dataclass(frozen=True)
class SegmentTask:
    """Consecutive ranges of one large file, written in file order by one worker.

    Every range holds chunks of this file only (file index 0). With ``check`` (the
    segment is the whole file), the worker hashes the plaintext as it writes it and
    compares the digest at the end: the file is never read back.
    """

    ranges: tuple[RangeTask, ...]
    check: FileCheck | None


def mismatch(shown: str) -> IntegrityError:
    return IntegrityError(f"restored file {shown} does not match its recorded digest: "
                          "the backup is damaged, run 'kyrorepo verify --full-scan'")


def write_failed(shown: str, exc: OSError) -> KyroError:
    return KyroError(f"writing restored file {shown} failed ({exc.strerror or exc}): "
                     "check the free space and permissions of the restore target")


def write_range(ctx: WorkerContext, task: RangeTask) -> int:
    """Load, open, check and write one range; return the plaintext bytes written."""
    plains = _open_blobs(ctx, task)
    fds: dict[int, int] = {}
    try:
        written = _write_places(task, plains, fds)
        _check_whole_files(ctx, task, plains, fds)
    finally:
        for fd in fds.values():
            os.close(fd)
    return written


def write_segment(ctx: WorkerContext, task: SegmentTask) -> int:
    """Write a segment's ranges in order (hashing the file when it is all of it); return bytes written."""
    hasher = ctx.keys.hasher() if task.check is not None else None
    fds: dict[int, int] = {}
    written = 0
    try:
        for rng in task.ranges:
            plains = _open_blobs(ctx, rng)
            written += _write_places(rng, plains, fds)
            if hasher is not None:
                for bi, _, _ in rng.places:
                    hasher.update(plains[bi])
            del plains
        check = task.check
        if check is not None and hasher is not None:
            check.confirm(written, hasher.digest())
            check.make_durable(_descriptor(task.ranges[0], fds, 0))
    finally:
        for fd in fds.values():
            os.close(fd)
    return written


def _open_blobs(ctx: WorkerContext, task: RangeTask) -> list[bytes]:
    try:
        data = load_view(ctx.backend, task.pack, task.start, task.end - task.start)
    except KyroError as exc:
        raise IntegrityError(f"pack {task.pack} cannot be read ({exc.message})") from None
    if len(data) != task.end - task.start:
        raise IntegrityError(f"pack {task.pack} is truncated")
    view = memoryview(data)
    start = task.start
    return ctx.codec.open_many(BlobType.DATA, [(bid, view[off - start:off - start + ln]) for bid, off, ln in task.blobs],
                               lambda i: f"chunk {task.blobs[i][0].hex()[:16]} in {task.pack}",
                               dict(task.types))


def _descriptor(task: RangeTask, fds: dict[int, int], fi: int) -> int:
    fd = fds.get(fi)
    if fd is None:
        dest, shown, _ = task.files[fi]
        try:
            fd = fds[fi] = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise write_failed(shown, exc) from None
    return fd


def _direct_descriptor(task: RangeTask, fds: dict[int, int], fi: int) -> int | None:
    """A second descriptor of file ``fi`` for direct writes (kept under key ``-1 - fi``), or None."""
    fd = fds.get(-1 - fi)
    if fd is None:
        try:
            fd = directio.open_direct(task.files[fi][0], os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise write_failed(task.files[fi][1], exc) from None
        if fd is not None:
            fds[-1 - fi] = fd
    return fd


def _write_places(task: RangeTask, plains: list[bytes], fds: dict[int, int]) -> int:
    """``pwritev`` each run of chunks that are consecutive in one file."""
    run: list[bytes] = []
    run_file = run_start = run_end = written = 0
    for bi, fi, offset in task.places:
        if run and (fi != run_file or offset != run_end or len(run) >= IOV_MAX):
            _pwritev_all(task, fds, run_file, run, run_start)
            run = []
        if not run:
            run_file, run_start, run_end = fi, offset, offset
        run.append(plains[bi])
        run_end += len(plains[bi])
        written += len(plains[bi])
    if run:
        _pwritev_all(task, fds, run_file, run, run_start)
    return written


def _pwritev_all(task: RangeTask, fds: dict[int, int], fi: int, bufs: list[bytes], offset: int) -> None:
    """Write ``bufs`` back to back at ``offset``.

    Large runs go to the device directly (their unaligned ends through the page cache);
    others through the page cache in one ``pwritev`` when the kernel takes it all, after
    which writing them back to disk is started (Linux ``sync_file_range``, not waiting), so
    the ``syncfs`` before the swap finds little left to write.
    """
    fd = _descriptor(task, fds, fi)
    try:
        total = sum(len(b) for b in bufs)
        direct = _direct_descriptor(task, fds, fi) if total >= directio.MIN_DIRECT else None
        if direct is not None and directio.write_at(direct, fd, bufs, offset, total):
            return
        n = os.pwritev(fd, bufs, offset)
        if n < total:
            directio.pwrite_all(fd, memoryview(b"".join(bufs))[n:], offset + n)
        if _SYNC_FILE_RANGE is not None:
            _SYNC_FILE_RANGE(fd, offset, total, SYNC_FILE_RANGE_WRITE)
    except OSError as exc:
        raise write_failed(task.files[fi][1], exc) from None


def _check_whole_files(ctx: WorkerContext, task: RangeTask, plains: list[bytes], fds: dict[int, int]) -> None:
    """Check each file the range holds entirely against its digest, from the plaintext."""
    hashers = {fi: ctx.keys.hasher() for fi, (_, _, check) in enumerate(task.files) if check is not None}
    if not hashers:
        return
    sizes = dict.fromkeys(hashers, 0)
    for bi, fi, _ in task.places:
        h = hashers.get(fi)
        if h is not None:
            h.update(plains[bi])
            sizes[fi] += len(plains[bi])
    for fi, h in hashers.items():
        check = task.files[fi][2]
        assert check is not None
        check.confirm(sizes[fi], h.digest())
        check.make_durable(_descriptor(task, fds, fi))


def check_file(ctx: WorkerContext, check: FileCheck) -> None:
    """Hash a restored file back from disk and compare it with its recorded digest.

    Read in ``READ_BLOCK`` pieces into one buffer, not mapped: a mapped file counts as the
    worker's RSS, up to its whole size (BLAKE3 releases the GIL for large updates).
    """
    h = ctx.keys.hasher()
    size = 0
    try:
        for piece in directio.read_blocks(check.dest, READ_BLOCK):
            h.update(piece)
            size += len(piece)
        check.make_durable()
    except OSError as exc:
        raise KyroError(f"restored file {check.shown} cannot be read back ({exc.strerror or exc}): "
                        "check the restore target") from None
    check.confirm(size, h.digest())
