"""Content-defined chunking with FastCDC (pyfastcdc), parameters fixed per repository.

Files are read with ordinary reads (never mmap: a live file truncated while it is read
must not crash the process).

``blocks_of_stream`` is the fast path of backup: it reads a stream in large blocks into
two reused buffers, cuts each block with ``cut_buf`` (which releases the GIL while it
scans) and hands out the cut points, so chunks are hashed in place and only the new
ones are copied. A chunk is cut from a block only while at least ``max_size`` bytes of
the stream follow its start (or the stream has ended): FastCDC never looks further than
``max_size`` bytes ahead, so the cut points are exactly those of cutting the whole
stream at once. The rest of a block is carried to the start of the next one.

The default nominal average, 32 KiB (real average about 39 KiB: pyfastcdc's real
average is roughly avg + min), was settled on the mutate scenario of the reference
dataset (docs/performance.md, "Chunk size"): 64 KiB backs up about 15% faster and
stores 4% less at first, but every scattered 1% page rewrite then stores 42% more
(110 MB instead of 77 MB per GiB), which outweighs both after the first incremental.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from pyfastcdc import FastCDC

from kyrorepo.errors import UsageError

MIN_AVG = 4 * 1024
MAX_AVG = 4 * 1024 * 1024
DEFAULT_AVG = 32 * 1024
BLOCK_SIZE = 4 * 1024 * 1024


class Readable(Protocol):
    def readinto(self, b: memoryview) -> int | None: ...


@dataclass(frozen=True)
class ChunkerParams:
    """FastCDC 2020 parameters; ``seed`` alters the gear table (below 2**63)."""

    avg_size: int = DEFAULT_AVG
    min_size: int = DEFAULT_AVG // 4
    max_size: int = DEFAULT_AVG * 4
    normalization: int = 1
    seed: int = 0

    @classmethod
    def for_average(cls, avg_size: int, seed: int) -> ChunkerParams:
        if avg_size < MIN_AVG or avg_size > MAX_AVG or avg_size & (avg_size - 1):
            raise UsageError(
                f"chunk size {avg_size} is not allowed: use a power of two from {MIN_AVG} to {MAX_AVG}"
            )
        return cls(avg_size, avg_size // 4, avg_size * 4, 1, seed & ((1 << 63) - 1))


@dataclass
class Block:
    """A block of a stream and the chunks cut from it.

    ``data`` is a view of a reused buffer: it (and every slice of it) is valid only until
    the next block is requested from the same generator, or another stream is cut on
    the same thread. ``cuts`` holds the end offset of
    every chunk within ``data``; the first chunk starts at 0, and ``data`` ends at the
    last cut.
    """

    data: memoryview
    cuts: list[int]


def _fill(stream: Readable, view: memoryview) -> int:
    """Read into ``view`` until it is full or the stream ends; return the bytes read."""
    got = 0
    while got < len(view):
        n = stream.readinto(view[got:])
        if not n:
            break
        got += n
    return got


class Chunker:
    def __init__(self, params: ChunkerParams) -> None:
        self.params = params
        self._local = threading.local()

    def _cdc(self) -> FastCDC:
        """One FastCDC per thread: the object is not safe for concurrent use."""
        cdc = getattr(self._local, "cdc", None)
        if cdc is None:
            p = self.params
            cdc = FastCDC(p.avg_size, min_size=p.min_size, max_size=p.max_size,
                          normalized_chunking=p.normalization, seed=p.seed)  # type: ignore[arg-type]
            self._local.cdc = cdc
        return cdc

    def chunks_of_stream(self, stream: BinaryIO | Readable) -> Iterator[bytes]:
        """Yield independent copies of the chunks of ``stream``."""
        for block in self.blocks_of_stream(stream):  # type: ignore[arg-type]  # BinaryIO lacks readinto in typeshed
            start = 0
            for end in block.cuts:
                yield bytes(block.data[start:end])
                start = end

    def chunks_of_bytes(self, data: bytes) -> Iterator[bytes]:
        for chunk in self._cdc().cut_buf(data):
            yield bytes(chunk.data)

    def _buffers(self, size: int) -> tuple[bytearray, bytearray]:
        """Two read buffers of ``size`` bytes, kept per thread: allocating (and zeroing)
        megabytes per file would cost more than reading a small file."""
        bufs: tuple[bytearray, bytearray] | None = getattr(self._local, "buffers", None)
        if bufs is None or len(bufs[0]) != size:
            bufs = self._local.buffers = (bytearray(size), bytearray(size))
        return bufs

    def blocks_of_stream(self, stream: Readable, block_size: int = BLOCK_SIZE) -> Iterator[Block]:
        """Cut ``stream`` block by block; see ``Block`` for how long a block stays valid.

        The buffers are reused by the next call on the same thread, so one thread cuts
        one stream at a time.
        """
        cdc = self._cdc()
        lookahead = self.params.max_size
        size = max(block_size, 2 * lookahead)
        buffers = self._buffers(size + lookahead)
        which = 0
        carry = 0  # bytes at the start of the current buffer carried from the last block
        while True:
            buf = buffers[which]
            view = memoryview(buf)
            filled = carry + _fill(stream, view[carry:carry + size])
            eof = filled < carry + size
            if filled == 0:
                return
            data = view[:filled]
            cuts: list[int] = []
            for chunk in cdc.cut_buf(data):
                if not eof and filled - chunk.offset < lookahead:
                    break
                cuts.append(chunk.offset + chunk.length)
            used = cuts[-1] if cuts else 0
            yield Block(view[:used], cuts)
            if eof:
                return
            carry = filled - used
            which ^= 1
            buffers[which][:carry] = buf[used:filled]
