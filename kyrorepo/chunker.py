"""Content-defined chunking with FastCDC (pyfastcdc), parameters fixed per repository.

Files are read with ordinary buffered reads (never mmap: a live file truncated while it
is read must not crash the process). ``cut_stream`` reuses its buffer, so every chunk is
copied to ``bytes`` before it leaves this module.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from pyfastcdc import FastCDC

from kyrorepo.errors import UsageError

MIN_AVG = 4 * 1024
MAX_AVG = 4 * 1024 * 1024
DEFAULT_AVG = 32 * 1024


@dataclass(frozen=True)
class ChunkerParams:
    """FastCDC 2020 parameters; ``seed`` alters the gear table (below 2**63)."""

    avg_size: int = DEFAULT_AVG
    min_size: int = DEFAULT_AVG // 4
    max_size: int = DEFAULT_AVG * 4
    normalization: int = 1
    seed: int = 0

    @classmethod
    def for_average(cls, avg_size: int, seed: int) -> "ChunkerParams":
        if avg_size < MIN_AVG or avg_size > MAX_AVG or avg_size & (avg_size - 1):
            raise UsageError(
                f"chunk size {avg_size} is not allowed: use a power of two from {MIN_AVG} to {MAX_AVG}"
            )
        return cls(avg_size, avg_size // 4, avg_size * 4, 1, seed & ((1 << 63) - 1))


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

    def chunks_of_stream(self, stream: BinaryIO) -> Iterator[bytes]:
        """Yield independent copies of the chunks of ``stream`` (a buffered reader)."""
        for chunk in self._cdc().cut_stream(stream):
            yield bytes(chunk.data)

    def chunks_of_bytes(self, data: bytes) -> Iterator[bytes]:
        for chunk in self._cdc().cut_buf(data):
            yield bytes(chunk.data)
