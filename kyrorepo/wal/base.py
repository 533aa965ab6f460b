"""The WAL codec interface and the frame walker every framed codec shares.

A *codec* knows one database's write-ahead log: which files of a data directory are
segments, how a segment splits into checksummed frames, which commit time each frame
carries, how to cut the log at a time ``T`` and which metadata files (KyroDB's
``MANIFEST``) must be rewritten to agree. Codecs are pure: they read ``bytes`` or a
binary file object and return bytes or records; only ``detect(root)`` looks at a
directory. Shared rules (normative text: ``docs/wal-codecs.md``):

* ``Frame.time`` is Unix seconds, floored; a frame is *in* for target ``T`` when
  ``frame.time <= T``. ``time_ns`` is the finest time known, for reports.
* A cut keeps the longest prefix of the log (in replay order) whose frames are all in;
  ``CutPoint.stop`` says a later frame was met, so later segments are past ``T``.
* An incomplete final frame, or a complete final frame with a bad checksum, is a torn
  tail: iteration stops before it, no error. A bad frame followed by a valid frame is
  damage: ``IntegrityError``.
* ``segment_identity`` survives renames and growth (one segment, many captures).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import (
    Any,
    BinaryIO,
    Protocol,
)

from kyrorepo.errors import IntegrityError

Source = bytes | bytearray | memoryview | BinaryIO
"""What codecs read: a whole segment in memory, or a binary file object (seekable)."""

Ident = int | bytes | None

NS_PER_S = 1_000_000_000

# After a bad or incomplete frame, this many bytes are searched byte by byte for a valid
# frame (a valid frame there means mid-segment damage, not a torn tail).
RESYNC_WINDOW = 64 * 1024
# Bytes loaded into memory for that search (candidate frames must fit inside).
RESYNC_LOAD = RESYNC_WINDOW + 1024 * 1024
_ZERO_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Frame:
    """One checksummed unit of a segment, as found by ``iter_frames``."""

    offset: int  # byte offset of the frame start in the segment
    end: int  # byte offset just past the frame
    time: int  # Unix seconds, floored: the time used for cuts
    time_ns: int  # finest time known (Unix ns), for reporting
    ident: Ident  # the frame's own identity: KyroDB seq_no; None where frames carry none


@dataclass(frozen=True)
class Gap:
    """A place in the log where frames may be missing; PITR beyond it is unreachable."""

    kind: str  # "seq" | "overlap" | "start" | "lost-newest" | "shrunk"
    detail: str  # one line for the operator
    after_segment: str | None = None  # identity of the segment before the gap
    before_segment: str | None = None  # identity of the segment after the gap
    after_ident: Ident = None
    before_ident: Ident = None
    last_good_time: int | None = None  # time (s) of the last frame known before the gap


@dataclass(frozen=True)
class SegmentScan:
    """Summary of one segment, computed in one bounded-memory pass by ``scan``.

    It is small and JSON-friendly (``to_dict``/``from_dict``) so a backup can record it
    as the WAL position of a capture.
    """

    relpath: str
    identity: str
    size: int  # bytes read (the segment's size at capture)
    header_len: int  # bytes before the first frame (0 if the segment is shorter)
    end_of_valid: int  # offset just past the last complete valid frame
    count: int = 0
    first_time: int | None = None
    last_time: int | None = None
    first_time_ns: int | None = None
    last_time_ns: int | None = None
    first_ident: Ident = None
    last_ident: Ident = None
    internal_gap: Gap | None = None  # first identity break inside the segment, if any

    @property
    def torn_tail(self) -> bool:
        """True when bytes follow the last valid frame (a write in progress or torn)."""
        return self.end_of_valid < self.size

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict; bytes identities become ``{"hex": ...}``."""
        return {k: _to_json(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> SegmentScan:
        """Inverse of ``to_dict``; IntegrityError on a malformed record."""
        try:
            vals: dict[str, Any] = {f.name: _from_json(f.name, d.get(f.name)) for f in fields(cls)}
            raw_gap = vals["internal_gap"]
            if raw_gap is not None:
                if not isinstance(raw_gap, Mapping):
                    raise ValueError("internal_gap is not an object")
                gap: dict[str, Any] = {
                    f.name: _from_json(f.name, raw_gap.get(f.name)) for f in fields(Gap)
                }
                vals["internal_gap"] = Gap(**gap)
            return cls(**vals)
        except (AttributeError, TypeError, ValueError) as e:
            raise IntegrityError(f"malformed recorded WAL segment scan: {e}") from e


@dataclass(frozen=True)
class CutPoint:
    """Where to cut one segment for a target time: keep ``data[:length]``."""

    length: int  # bytes to keep (header included; 0 when the segment has no header yet)
    frames: int  # complete frames kept
    stop: bool  # a frame later than T was met: later segments of the chain are past T
    last_time: int | None = None  # time of the last kept frame
    last_ident: Ident = None  # identity of the last kept frame


class WalCodec(Protocol):
    """What the backup (capture) and ``restore-pitr`` code needs from a WAL format."""

    name: str

    def is_segment(self, relpath: str) -> bool:
        """Is this file (a '/'-separated path relative to the data dir) a WAL segment?"""

    def is_metadata(self, relpath: str) -> bool:
        """Is this file one that must agree with the WAL (KyroDB: ``MANIFEST``)?"""

    def metadata_files(self) -> tuple[str, ...]:
        """Relative paths of the metadata files at their usual place."""

    def detect(self, root: str) -> bool:
        """Does the directory hold this database? Decided on content, not names alone."""

    def iter_frames(self, data: Source, *, capture_time_ns: int | None = None) -> Iterator[Frame]:
        """Yield the valid frames in order; stop at a torn tail; raise IntegrityError on damage."""

    def scan(
        self, relpath: str, data: Source, *, capture_time_ns: int | None = None
    ) -> SegmentScan:
        """Summarise a segment in one pass (identity, frame count, times, idents, tail)."""

    def valid_length(self, data: Source) -> int:
        """Offset just past the last complete valid frame (what to capture of a growing file)."""

    def cut_point(self, data: Source, t: int, *, capture_time_ns: int | None = None) -> CutPoint:
        """The prefix of the segment holding the frames of the log up to second ``t``."""

    def cut(self, data: Source, t: int, *, capture_time_ns: int | None = None) -> bytes:
        """``data[:cut_point(data, t).length]`` as bytes."""

    def segment_identity(self, relpath: str, data: Source) -> str:
        """A name for the segment that survives renames and growth."""

    def replay_order(self, scans: Iterable[SegmentScan]) -> list[SegmentScan]:
        """Segments sorted into the order the database replays them."""

    def find_gaps(
        self, chain: Sequence[SegmentScan], metadata: Mapping[str, bytes] | None = None
    ) -> list[Gap]:
        """Gaps inside a replay-ordered chain (starting from the base's metadata if given)."""

    def capture_gaps(
        self, previous: Sequence[SegmentScan], current: Sequence[SegmentScan]
    ) -> list[Gap]:
        """Gaps between two consecutive captures of the same source."""

    def base_usable(self, relpaths: Iterable[str], t: int) -> bool:
        """Can a base backup holding these files be rolled forward to ``t``?"""

    def fix_metadata(
        self,
        metadata: Mapping[str, bytes],
        restored_segments: Sequence[str],
        present: Collection[str],
        t: int,
    ) -> dict[str, bytes | None]:
        """Files to write (bytes) or delete (None) so metadata agrees with the restored WAL."""


# --- reading --------------------------------------------------------------------------


class Reader:
    """Random access to a Source; the size is fixed when the reader is made."""

    def __init__(self, src: Source) -> None:
        if isinstance(src, (bytes, bytearray, memoryview)):
            self._mem: memoryview | None = memoryview(src).cast("B")
            self._file: BinaryIO | None = None
            self.size = len(self._mem)
        else:
            self._mem = None
            self._file = src
            self.size = src.seek(0, io.SEEK_END)

    def read(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``offset``, fewer at the end."""
        end = min(self.size, offset + n)
        if offset >= end:
            return b""
        if self._mem is not None:
            return bytes(self._mem[offset:end])
        assert self._file is not None
        self._file.seek(offset)
        parts = []
        want = end - offset
        while want > 0:
            chunk = self._file.read(want)
            if not chunk:
                break
            parts.append(chunk)
            want -= len(chunk)
        return b"".join(parts)

    def zeros_from(self, offset: int) -> bool:
        """True if every byte from ``offset`` to the end is zero (preallocated tail)."""
        pos = offset
        while pos < self.size:
            chunk = self.read(pos, _ZERO_CHUNK)
            if chunk.count(0) != len(chunk):
                return False
            pos += len(chunk)
        return True


@dataclass(frozen=True)
class RawFrame:
    """A complete frame as laid out in the file; ``ok`` is False when it fails checks."""

    offset: int
    end: int
    payload: bytes
    ok: bool


FrameParser = Callable[[Reader, int], RawFrame | None]
"""Parse the frame at an offset: None if incomplete (runs past the end)."""


def walk_frames(reader: Reader, start: int, parse: FrameParser, what: str) -> Iterator[RawFrame]:
    """Yield the valid frames from ``start``; stop at a torn tail; raise on damage.

    A bad or incomplete frame ends the walk (a torn tail) unless a valid frame follows
    it: at its declared end, or anywhere in the next ``RESYNC_WINDOW`` bytes (a damaged
    length field shifts the declared end). Then the segment is damaged in the middle.
    """
    off = start
    while off < reader.size:
        raw = parse(reader, off)
        if raw is not None and raw.ok:
            yield raw
            off = raw.end
            continue
        if _valid_frame_follows(reader, off, raw, parse):
            reason = "is incomplete" if raw is None else "fails its checksum"
            raise IntegrityError(
                f"{what}: the frame at byte {off} {reason} but valid frames follow it; "
                "the segment is damaged in the middle, restore it from an older capture"
            )
        return


def _valid_frame_follows(
    reader: Reader, off: int, raw: RawFrame | None, parse: FrameParser
) -> bool:
    if reader.zeros_from(off):
        return False
    if raw is not None and raw.end < reader.size:
        nxt = parse(reader, raw.end)
        if nxt is not None and nxt.ok:
            return True
    window = Reader(reader.read(off, RESYNC_LOAD))
    limit = min(window.size, RESYNC_WINDOW)
    for pos in range(1, limit):
        cand = parse(window, pos)
        if cand is not None and cand.ok:
            return True
    return False


# --- summaries and shared helpers ------------------------------------------------------


def summarize(
    relpath: str,
    identity: str,
    size: int,
    header_len: int,
    frames: Iterable[Frame],
    check_idents: bool = False,
) -> SegmentScan:
    """Build a SegmentScan from a frame iterator (bounded memory). With ``check_idents``
    the first break in integer idents (not +1) is recorded as ``internal_gap``."""
    count, end, gap = 0, header_len, None
    first: Frame | None = None
    last: Frame | None = None
    try:
        for fr in frames:
            if (
                check_idents
                and gap is None
                and last is not None
                and isinstance(fr.ident, int)
                and isinstance(last.ident, int)
                and fr.ident != last.ident + 1
            ):
                gap = Gap(
                    kind="seq",
                    detail=f"{relpath}: sequence jumps from {last.ident} to {fr.ident} "
                    f"at byte {fr.offset}",
                    after_ident=last.ident,
                    before_ident=fr.ident,
                    last_good_time=last.time,
                )
            first = fr if first is None else first
            last, count, end = fr, count + 1, fr.end
    except IntegrityError as e:
        raise IntegrityError(f"{relpath}: {e.message}") from e
    size = max(size, end)  # a live file may have grown between the size and the frames
    if first is None or last is None:
        return SegmentScan(relpath, identity, size, header_len, end)
    return SegmentScan(
        relpath, identity, size, header_len, end, count,
        first.time, last.time, first.time_ns, last.time_ns, first.ident, last.ident, gap,
    )  # fmt: skip


def prefix_cut(frames: Iterable[Frame], header_len: int, t: int) -> CutPoint:
    """The longest prefix of ``frames`` whose times are all ``<= t``."""
    length, count = header_len, 0
    last: Frame | None = None
    for fr in frames:
        if fr.time > t:
            return CutPoint(
                length, count, True, last.time if last else None, last.ident if last else None
            )
        length, count, last = fr.end, count + 1, fr
    return CutPoint(length, count, False, last.time if last else None, last.ident if last else None)


def read_prefix(data: Source, length: int) -> bytes:
    return Reader(data).read(0, length)


def latest_versions(*captures: Iterable[SegmentScan]) -> list[SegmentScan]:
    """One scan per identity across captures: the one with the most valid bytes
    (the later capture on a tie). Order of first appearance is kept."""
    best: dict[str, SegmentScan] = {}
    for capture in captures:
        for s in capture:
            old = best.get(s.identity)
            if old is None or s.end_of_valid >= old.end_of_valid:
                best[s.identity] = s
    return list(best.values())


def newest_survives(
    previous: Sequence[SegmentScan], current: Sequence[SegmentScan], ordered: list[SegmentScan]
) -> list[Gap]:
    """Capture-gap rule for codecs whose frames carry no sequence number.

    ``ordered`` is ``previous`` in replay order. Every segment seen in both captures must
    not have lost valid bytes; the newest segment *with frames* of the previous capture
    must still be present (under any name), else frames written to it after the previous
    capture, and any segment created and removed between the captures, may be lost.
    (Databases remove old segments first, so if it survives, every newer one does.)
    """
    gaps: list[Gap] = []
    now = {s.identity: s for s in current}
    for old in previous:
        new = now.get(old.identity)
        if new is not None and new.end_of_valid < old.end_of_valid:
            gaps.append(
                Gap(
                    kind="shrunk",
                    detail=(
                        f"{new.relpath}: has {new.end_of_valid} valid bytes, the previous "
                        f"capture saw {old.end_of_valid} (as {old.relpath}); it was rewritten"
                    ),
                    after_segment=old.identity,
                    last_good_time=old.last_time,
                )
            )
    framed = [s for s in ordered if s.count > 0]
    if framed:
        newest = framed[-1]
        if newest.identity not in now:
            gaps.append(
                Gap(
                    kind="lost-newest",
                    detail=(
                        f"{newest.relpath}: the newest segment of the previous capture is gone; "
                        "frames written after that capture may be lost (capture more often)"
                    ),
                    after_segment=newest.identity,
                    last_good_time=newest.last_time,
                )
            )
    return gaps


def read_head(path: str, n: int) -> bytes:
    """The first ``n`` bytes of a file, b"" if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def walk_relpaths(root: str) -> Iterator[str]:
    """Every regular file under ``root`` as a sorted, '/'-separated relative path."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if os.path.isfile(full) and not os.path.islink(full):
                yield name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}"


_STR_FIELDS = {"relpath", "identity", "kind", "detail", "after_segment", "before_segment"}
_REQUIRED = {"relpath", "identity", "kind", "detail", "size", "header_len", "end_of_valid", "count"}
_IDENT_FIELDS = {"first_ident", "last_ident", "after_ident", "before_ident"}


def _to_json(v: object) -> object:
    if isinstance(v, bytes):
        return {"hex": v.hex()}
    if isinstance(v, dict):
        return {k: _to_json(x) for k, x in v.items()}
    return v


def _from_json(name: str, v: object) -> object:
    if v is None or name == "internal_gap":
        if name in _REQUIRED:
            raise ValueError(f"{name} is missing")
        return v
    if name in _IDENT_FIELDS and isinstance(v, Mapping):
        return bytes.fromhex(str(v["hex"]))
    if name in _STR_FIELDS:
        if not isinstance(v, str):
            raise ValueError(f"{name} is not a string")
        return v
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} is not an integer")
    return v
