"""Direct I/O (``O_DIRECT``) for the bulk bytes: pack files and restored files.

Moving data through the page cache is most of the system time of a backup (writing
packs), a restore (writing files, then reading them back to check them) and a full data
check (reading packs). On the 2-core reference VM, writing 1 GiB through the page cache
costs 3.8 s of system time and the ``sync`` after it 1 s more; with ``O_DIRECT`` the same
write costs 0.3-0.7 s and reading 1 GiB back costs 0.08 s instead of 0.85 s
(docs/performance.md, "Direct I/O"). Direct I/O changes no durability rule: callers keep
every ``fsync``/``syncfs`` (they also make the file's metadata durable).

``O_DIRECT`` needs the file offset, the length and the memory address aligned to the
device's logical block size (``ALIGN`` covers 512 and 4096). Writers send the aligned
part of a write directly from a page-aligned buffer and the unaligned ends through the
page cache, which is correct for ranges of one file written by several processes: a page
is only ever written one way. A file system that refuses ``O_DIRECT`` (``EINVAL``) turns
it off for the rest of the process, and the bytes go through the page cache as before;
``KYROREPO_DIRECT_IO=0`` turns it off from the start.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Iterator, Sequence

ALIGN = 4096
MIN_DIRECT = 256 * 1024  # smaller writes and reads go through the page cache
PIECE = 4 * 1024 * 1024  # bytes moved per direct system call (and the size of each thread's buffer)
O_DIRECT: int = getattr(os, "O_DIRECT", 0)


class _Switch:
    on = O_DIRECT != 0 and os.environ.get("KYROREPO_DIRECT_IO", "1") not in ("0", "no", "false")


def enabled() -> bool:
    return _Switch.on


def _refused() -> None:
    """The file system refused ``O_DIRECT``: use the page cache from now on in this process."""
    _Switch.on = False


def align_down(n: int) -> int:
    return n - n % ALIGN


def align_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def is_aligned(view: memoryview) -> bool:
    """Whether a writable, contiguous buffer starts at an ``ALIGN`` boundary in memory."""
    if view.readonly or not view.c_contiguous or not view.nbytes:
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) % ALIGN == 0


class _Scratch(threading.local):
    """One page-aligned buffer per thread, grown when needed and then reused: a fresh one per
    write would page-fault its way through every byte again."""

    def __init__(self) -> None:
        self.buf: mmap.mmap | None = None

    def view(self, size: int) -> memoryview:
        if self.buf is None or len(self.buf) < size:
            # the old buffer is freed once no view of it is left
            self.buf = mmap.mmap(-1, align_up(max(size, 1 << 20)), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return memoryview(self.buf)[:size]


_scratch = _Scratch()  # write_at's pieces, read_blocks' blocks
_reads = _Scratch()  # read_view's ranges


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def open_direct(path: str, flags: int, mode: int = 0o600) -> int | None:
    """``path`` opened with ``O_DIRECT`` added, or None when direct I/O is off or refused."""
    if not _Switch.on:
        return None
    try:
        return os.open(path, flags | O_DIRECT, mode)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        _refused()
        return None


def write_file(fd: int, data: bytes | memoryview) -> None:
    """Write ``data`` at the start of the new, empty file ``fd`` (opened without ``O_DIRECT``).

    When ``data`` is large and lies in page-aligned memory (the backup's pack buffers), its
    aligned part goes directly to the device and only the last partial page through the page
    cache; anything else is written through the page cache.
    """
    view = memoryview(data).cast("B")
    head = align_down(len(view))
    if _Switch.on and head >= MIN_DIRECT and is_aligned(view):
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | O_DIRECT)
            pwrite_all(fd, view[:head], 0)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            _refused()
            head = 0
        finally:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        view = view[head:]
    else:
        head = 0
    pwrite_all(fd, view, head)


def write_at(direct_fd: int, fd: int, bufs: Sequence[bytes | memoryview], offset: int, total: int) -> bool:
    """Write ``bufs`` (``total`` bytes back to back) at ``offset`` of one file: the aligned middle
    copied, ``PIECE`` bytes at a time, into this thread's aligned buffer and written through
    ``direct_fd``; the unaligned ends through ``fd``. False when nothing was written because the
    middle is small or the file system refused: the caller then writes it all through ``fd``.
    """
    start, end = align_up(offset), align_down(offset + total)
    if not _Switch.on or end - start < MIN_DIRECT:
        return False
    views = [memoryview(b).cast("B") for b in bufs]
    head: list[memoryview] = []
    tail: list[memoryview] = []
    pos = 0
    for v in views:  # the unaligned ends
        a, z = pos, pos + len(v)
        if a < start - offset:
            head.append(v[:min(z, start - offset) - a])
        if z > end - offset:
            tail.append(v[max(a, end - offset) - a:])
        pos = z
    piece = _scratch.view(min(PIECE, end - start))
    try:
        at = start  # file offset of the next piece
        i, pos = 0, offset  # views[i] starts at file offset pos
        while at < end:
            n = min(PIECE, end - at)
            filled = 0
            while filled < n:
                v = views[i]
                if pos + len(v) <= at + filled:
                    pos += len(v)
                    i += 1
                    continue
                s = at + filled - pos
                k = min(len(v) - s, n - filled)
                piece[filled:filled + k] = v[s:s + k]
                filled += k
            try:
                pwrite_all(direct_fd, piece[:n], at)
            except OSError as exc:
                if exc.errno != errno.EINVAL or at != start:
                    raise
                _refused()
                return False
            at += n
    finally:
        piece.release()
    if head:
        os.pwritev(fd, head, offset)  # less than one page: never a short write on a local file
    if tail:
        pwrite_all(fd, b"".join(tail), end)
    return True


_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_bytes_address = ctypes.pythonapi.PyBytes_AsString
_bytes_address.restype = ctypes.c_void_p
_bytes_address.argtypes = (ctypes.py_object,)


def pread(path: str, offset: int, length: int) -> bytes | None:
    """``length`` bytes of ``path`` from ``offset`` (fewer at its end) read with ``O_DIRECT``, or
    None when the read is small or direct I/O is off or refused: the caller reads it through the
    page cache.

    The bytes are read ``PIECE`` at a time into this thread's aligned buffer and copied into a
    new ``bytes`` object that nothing else holds yet (``PyBytes_FromStringAndSize(NULL, n)``,
    filled in place as C code does): one copy, as a read through the page cache makes.
    """
    if not _Switch.on or length < MIN_DIRECT:
        return None
    fd = open_direct(path, os.O_RDONLY | os.O_CLOEXEC)
    if fd is None:
        return None
    try:
        out = _new_bytes(None, length)
        dst = _bytes_address(out)
        piece = _scratch.view(min(PIECE, align_up(offset + length) - align_down(offset)))
        src = ctypes.addressof(ctypes.c_char.from_buffer(piece))
        try:
            got = 0  # bytes of out filled
            while got < length:
                at = align_down(offset + got)
                want = min(len(piece), align_up(offset + length) - at)
                try:
                    n = os.preadv(fd, [piece[:want]], at)
                except OSError as exc:
                    if exc.errno != errno.EINVAL or got:
                        raise
                    _refused()
                    return None
                skip = offset + got - at
                k = min(n - skip, length - got)
                if k <= 0:
                    break  # the end of the file
                ctypes.memmove(dst + got, src + skip, k)
                got += k
                if n < want:
                    break
        finally:
            piece.release()
        return out if got == length else out[:got]
    finally:
        os.close(fd)


def _open_read(path: str, direct: bool) -> tuple[int, bool]:
    """A descriptor to read ``path``, with ``O_DIRECT`` when ``direct`` and the file system allows
    it (``open_direct``), else through the page cache; and whether it is direct."""
    fd = open_direct(path, os.O_RDONLY | os.O_CLOEXEC) if direct else None
    return (fd, True) if fd is not None else (os.open(path, os.O_RDONLY | os.O_CLOEXEC), False)


def read_view(path: str, offset: int, length: int) -> memoryview:
    """``length`` bytes of ``path`` from ``offset`` (fewer at its end), read into this thread's read
    buffer: the view is valid until the thread's next ``read_view``.

    No allocation and no copy: ``pread`` makes a new object per read, which the kernel must fault
    in and zero page by page before the bytes are copied into it (0.4 CPU-s per GiB restored).
    Large reads are direct (the buffer is page-aligned and the read widened to whole pages), small
    ones and any on a file system that refuses ``O_DIRECT`` go through the page cache.
    """
    fd, direct = _open_read(path, length >= MIN_DIRECT)
    try:
        while True:
            at = align_down(offset) if direct else offset
            buf = _reads.view((align_up(offset + length) if direct else offset + length) - at)
            got = 0
            try:
                while got < len(buf):
                    n = os.preadv(fd, [buf[got:]], at + got)
                    got += n
                    if not n or (direct and n % ALIGN):
                        break  # the end of the file (a direct read ends short only there)
            except OSError as exc:
                if not direct or exc.errno != errno.EINVAL:
                    raise
                _refused()  # read again through the page cache
                os.close(fd)
                fd = -1  # closed: not to be closed again if the next open fails
                fd, direct = _open_read(path, False)
                continue
            skip = offset - at
            return buf[skip:max(skip, min(got, skip + length))]
    finally:
        if fd >= 0:
            os.close(fd)


def read_blocks(path: str, block: int) -> Iterator[memoryview]:
    """The content of ``path`` in pieces of at most ``block`` bytes (a multiple of ``ALIGN``), read
    with ``O_DIRECT`` when possible, else through the page cache. A piece is valid until the next."""
    fd, direct = _open_read(path, True)
    buf = _scratch.view(min(block, PIECE)) if direct else memoryview(bytearray(block))
    try:
        pos = 0
        while True:
            try:
                n = os.preadv(fd, [buf], pos)
            except OSError as exc:
                if not direct or exc.errno != errno.EINVAL:
                    raise
                _refused()  # go on through the page cache from here
                os.close(fd)
                fd = -1  # closed: not to be closed again if the next open fails
                fd, direct = _open_read(path, False)
                continue
            if not n:
                return
            yield buf[:n]
            pos += n
            if direct and n % ALIGN:
                return  # a direct read ends short only at the end of the file
    finally:
        buf.release()
        if fd >= 0:
            os.close(fd)
