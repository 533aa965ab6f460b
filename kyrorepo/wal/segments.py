"""Generic codec for append-only files without a known frame structure.

Any file matching one of the glob patterns (default ``*.wal``) is a segment. Nothing
inside it is parsed: the whole content of one capture is one pseudo-frame whose time is
the capture time the caller supplies (``capture_time_ns``), so PITR precision is the
capture interval. Files are independent: for a target ``T`` the caller restores, per
file, the newest capture taken at or before ``T`` (``cut_point`` keeps a capture whole
when its capture second is ``<= T`` and drops it otherwise; ``stop`` is always False).
A pattern containing ``/`` matches the whole relative path, otherwise the file name.
"""

from __future__ import annotations

import fnmatch
import posixpath
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence

from kyrorepo.errors import KyroError, UsageError
from kyrorepo.wal.base import (
    NS_PER_S,
    CutPoint,
    Frame,
    Gap,
    Reader,
    SegmentScan,
    Source,
    latest_versions,
    newest_survives,
    read_prefix,
    summarize,
)

DEFAULT_PATTERNS = ("*.wal",)


class SegmentsCodec:
    """WalCodec for plain append-only files; never detected, only chosen by name."""

    name = "segments"

    def __init__(self, patterns: Sequence[str] | str = DEFAULT_PATTERNS) -> None:
        pats = (patterns,) if isinstance(patterns, str) else tuple(patterns)
        if not pats or any(not p for p in pats):
            raise UsageError("--wal segments needs at least one non-empty glob pattern")
        self.patterns = pats

    def is_segment(self, relpath: str) -> bool:
        base = posixpath.basename(relpath)
        return any(fnmatch.fnmatchcase(relpath if "/" in p else base, p) for p in self.patterns)

    def is_metadata(self, relpath: str) -> bool:
        return False

    def metadata_files(self) -> tuple[str, ...]:
        return ()

    def detect(self, root: str) -> bool:
        return False

    def iter_frames(self, data: Source, *, capture_time_ns: int | None = None) -> Iterator[Frame]:
        """One frame covering the whole content (none for an empty file)."""
        ns = _need_time(capture_time_ns)
        size = Reader(data).size
        if size:
            yield Frame(0, size, ns // NS_PER_S, ns, None)

    def scan(
        self, relpath: str, data: Source, *, capture_time_ns: int | None = None
    ) -> SegmentScan:
        frames = self.iter_frames(data, capture_time_ns=capture_time_ns)
        return summarize(relpath, relpath, Reader(data).size, 0, frames)

    def valid_length(self, data: Source) -> int:
        return Reader(data).size

    def cut_point(self, data: Source, t: int, *, capture_time_ns: int | None = None) -> CutPoint:
        ns = _need_time(capture_time_ns)
        size = Reader(data).size
        if ns // NS_PER_S > t:
            return CutPoint(0, 0, False)
        return CutPoint(size, 1 if size else 0, False, ns // NS_PER_S if size else None)

    def cut(self, data: Source, t: int, *, capture_time_ns: int | None = None) -> bytes:
        return read_prefix(data, self.cut_point(data, t, capture_time_ns=capture_time_ns).length)

    def segment_identity(self, relpath: str, data: Source) -> str:
        return relpath

    def replay_order(self, scans: Iterable[SegmentScan]) -> list[SegmentScan]:
        return sorted(scans, key=lambda s: s.relpath)

    def find_gaps(
        self, chain: Sequence[SegmentScan], metadata: Mapping[str, bytes] | None = None
    ) -> list[Gap]:
        return []

    def capture_gaps(
        self, previous: Sequence[SegmentScan], current: Sequence[SegmentScan]
    ) -> list[Gap]:
        """No file may shrink; the last non-empty file by name of the previous capture
        must still exist."""
        return newest_survives(previous, current, self.replay_order(latest_versions(previous)))

    def base_usable(self, relpaths: Iterable[str], t: int) -> bool:
        return True

    def fix_metadata(
        self,
        metadata: Mapping[str, bytes],
        restored_segments: Sequence[str],
        present: Collection[str],
        t: int,
    ) -> dict[str, bytes | None]:
        return {}


def _need_time(capture_time_ns: int | None) -> int:
    if capture_time_ns is None:
        raise KyroError(
            "internal error: the segments WAL codec needs the capture time of a segment "
            "(capture_time_ns); please report this"
        )
    return capture_time_ns
