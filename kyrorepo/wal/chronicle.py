"""Chronicle (embedded time-series database) WAL codec.

The database file ``<db>`` (e.g. ``data.db``) has its log in ``<db>.wal`` (the active
segment); rotation renames it to ``<db>.wal.<YYYYMMDDTHHMMSS>`` (UTC) and starts a new
``<db>.wal``. Segments have no header; frames are ``[u32 LE len][u32 LE crc32(payload)]
[payload]``; a payload is ``[u32 count]`` then per point: metric ``[u32 len][bytes]``,
``[u32 n]`` tags of (key, value) each ``[u32 len][bytes]``, value f64 LE, timestamp i64
LE Unix nanoseconds.

Frames carry no sequence number and rotation renames files, so a segment's identity is
``<db>.wal@`` + a hash of its first frame. A frame's time is the timestamp of its newest
point (a frame holds a write batch; it is in the log once all its points are). A frame
with no points takes the time of the frame before it (0 for a segment's first frame).
Byte tables and rules: ``docs/wal-codecs.md``.
"""

from __future__ import annotations

import calendar
import hashlib
import os
import posixpath
import re
import struct
import time
import zlib
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from kyrorepo.errors import IntegrityError
from kyrorepo.wal.base import (
    NS_PER_S,
    CutPoint,
    Frame,
    Gap,
    RawFrame,
    Reader,
    SegmentScan,
    Source,
    latest_versions,
    newest_survives,
    prefix_cut,
    read_prefix,
    summarize,
    walk_frames,
    walk_relpaths,
)

FRAME_HEADER_LEN = 8
MIN_PAYLOAD = 4  # the point count
ROTATION_FORMAT = "%Y%m%dT%H%M%S"

_U32 = struct.Struct("<I")
_HEAD = struct.Struct("<II")  # len, crc32
_VALUE_TS = struct.Struct("<dq")
_SEGMENT_RE = re.compile(r"^(?P<db>.+)\.wal(?:\.(?P<ts>\d{8}T\d{6}))?$")
_NEVER = 1 << 63


@dataclass(frozen=True)
class Point:
    metric: str
    tags: tuple[tuple[str, str], ...]
    value: float
    timestamp_ns: int  # Unix nanoseconds


# --- names ---------------------------------------------------------------------------


def db_of(relpath: str) -> str | None:
    """``data.db`` for ``data.db.wal`` and ``data.db.wal.20240101T000000``; else None."""
    m = _SEGMENT_RE.match(posixpath.basename(relpath))
    return m.group("db") if m else None


def rotation_time(relpath: str) -> int | None:
    """Unix seconds of a rotated segment's suffix (UTC); None for the active segment."""
    m = _SEGMENT_RE.match(posixpath.basename(relpath))
    if not m or not m.group("ts"):
        return None
    try:
        return calendar.timegm(time.strptime(m.group("ts"), ROTATION_FORMAT))
    except ValueError:
        return None


def rotated_name(active_relpath: str, unix_s: int) -> str:
    """The name rotation gives ``<db>.wal`` at Unix second ``unix_s``."""
    return f"{active_relpath}.{time.strftime(ROTATION_FORMAT, time.gmtime(unix_s))}"


# --- payload and frame encoding ----------------------------------------------------------


def _lp(b: bytes) -> bytes:
    return _U32.pack(len(b)) + b


def encode_points(points: Sequence[Point]) -> bytes:
    parts = [_U32.pack(len(points))]
    for p in points:
        parts.append(_lp(p.metric.encode()))
        parts.append(_U32.pack(len(p.tags)))
        for k, v in p.tags:
            parts.append(_lp(k.encode()))
            parts.append(_lp(v.encode()))
        parts.append(_VALUE_TS.pack(p.value, p.timestamp_ns))
    return b"".join(parts)


def decode_points(payload: bytes) -> list[Point]:
    """Parse a payload completely; IntegrityError if it is not a valid point batch."""
    try:
        (count,) = _U32.unpack_from(payload, 0)
        pos = 4
        out = []
        for _ in range(count):
            metric, pos = _str_at(payload, pos)
            (ntags,) = _U32.unpack_from(payload, pos)
            pos += 4
            tags = []
            for _ in range(ntags):
                k, pos = _str_at(payload, pos)
                v, pos = _str_at(payload, pos)
                tags.append((k, v))
            value, ts = _VALUE_TS.unpack_from(payload, pos)
            pos += _VALUE_TS.size
            out.append(Point(metric, tuple(tags), value, ts))
        if pos != len(payload):
            raise ValueError(f"{len(payload) - pos} bytes left over")
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise IntegrityError(f"Chronicle WAL payload does not decode: {e}") from e
    return out


def newest_timestamp(payload: bytes) -> int | None:
    """The largest point timestamp (ns) of a payload, None if it has no points.

    Skips strings without decoding them; IntegrityError if the layout is broken.
    """
    try:
        (count,) = _U32.unpack_from(payload, 0)
        pos, newest = 4, None
        for _ in range(count):
            pos = _skip(payload, pos)
            (ntags,) = _U32.unpack_from(payload, pos)
            pos += 4
            for _ in range(2 * ntags):
                pos = _skip(payload, pos)
            ts = _VALUE_TS.unpack_from(payload, pos)[1]
            pos += _VALUE_TS.size
            newest = ts if newest is None or ts > newest else newest
        if pos != len(payload):
            raise ValueError(f"{len(payload) - pos} bytes left over")
    except (struct.error, ValueError) as e:
        raise IntegrityError(f"Chronicle WAL payload does not decode: {e}") from e
    return newest


def encode_frame(payload: bytes) -> bytes:
    return _HEAD.pack(len(payload), zlib.crc32(payload)) + payload


def _skip(payload: bytes, pos: int) -> int:
    (n,) = _U32.unpack_from(payload, pos)
    pos += 4 + n
    if pos > len(payload):
        raise ValueError("string longer than the payload")
    return pos


def _str_at(payload: bytes, pos: int) -> tuple[str, int]:
    end = _skip(payload, pos)
    return payload[pos + 4 : end].decode(), end


def _parse(reader: Reader, off: int) -> RawFrame | None:
    head = reader.read(off, FRAME_HEADER_LEN)
    if len(head) < FRAME_HEADER_LEN:
        return None
    n, crc = _HEAD.unpack(head)
    end = off + FRAME_HEADER_LEN + n
    if end > reader.size:
        return None
    payload = reader.read(off + FRAME_HEADER_LEN, n)
    return RawFrame(off, end, payload, n >= MIN_PAYLOAD and zlib.crc32(payload) == crc)


def _frame_hash(raw: RawFrame) -> str:
    whole = _HEAD.pack(len(raw.payload), zlib.crc32(raw.payload)) + raw.payload
    return hashlib.blake2b(whole, digest_size=16).hexdigest()


# --- the codec -------------------------------------------------------------------------


class ChronicleCodec:
    """WalCodec for Chronicle data directories."""

    name = "chronicle"

    def is_segment(self, relpath: str) -> bool:
        return db_of(relpath) is not None

    def is_metadata(self, relpath: str) -> bool:
        return False

    def metadata_files(self) -> tuple[str, ...]:
        return ()

    def detect(self, root: str) -> bool:
        """Chronicle if some ``*.wal`` / ``*.wal.<stamp>`` file starts with a complete
        frame whose checksum holds and whose payload decodes."""
        for rel in walk_relpaths(root):
            if not self.is_segment(rel):
                continue
            try:
                with open(os.path.join(root, rel), "rb") as f:
                    raw = _parse(Reader(f), 0)
            except OSError:
                continue
            if raw is not None and raw.ok:
                try:
                    newest_timestamp(raw.payload)
                except IntegrityError:
                    continue
                return True
        return False

    def iter_frames(self, data: Source, *, capture_time_ns: int | None = None) -> Iterator[Frame]:
        last_ns = 0
        for raw in walk_frames(Reader(data), 0, _parse, "Chronicle WAL segment"):
            ts = newest_timestamp(raw.payload)
            last_ns = last_ns if ts is None else ts
            yield Frame(raw.offset, raw.end, last_ns // NS_PER_S, last_ns, None)

    def scan(
        self, relpath: str, data: Source, *, capture_time_ns: int | None = None
    ) -> SegmentScan:
        ident = self.segment_identity(relpath, data)
        return summarize(relpath, ident, Reader(data).size, 0, self.iter_frames(data))

    def valid_length(self, data: Source) -> int:
        end = 0
        for fr in self.iter_frames(data):
            end = fr.end
        return end

    def cut_point(self, data: Source, t: int, *, capture_time_ns: int | None = None) -> CutPoint:
        return prefix_cut(self.iter_frames(data), 0, t)

    def cut(self, data: Source, t: int, *, capture_time_ns: int | None = None) -> bytes:
        return read_prefix(data, self.cut_point(data, t).length)

    def segment_identity(self, relpath: str, data: Source) -> str:
        """``<db>.wal@<blake2b-128 of the first frame>``; a segment without a complete
        valid first frame gets the provisional ``<relpath>#empty``."""
        raw = _parse(Reader(data), 0)
        if raw is None or not raw.ok:
            return f"{relpath}#empty"
        return f"{db_of(relpath) or relpath}.wal@{_frame_hash(raw)}"

    def replay_order(self, scans: Iterable[SegmentScan]) -> list[SegmentScan]:
        """By first frame time; segments without frames by rotation time, active last."""

        def key(s: SegmentScan) -> tuple[int, int, str]:
            rot = rotation_time(s.relpath)
            rot_ns = _NEVER if rot is None else rot * NS_PER_S
            first = s.first_time_ns if s.first_time_ns is not None else rot_ns
            return (first, rot_ns, s.relpath)

        return sorted(scans, key=key)

    def find_gaps(
        self, chain: Sequence[SegmentScan], metadata: Mapping[str, bytes] | None = None
    ) -> list[Gap]:
        """None can be seen inside a chain (frames carry no sequence); see capture_gaps."""
        return []

    def capture_gaps(
        self, previous: Sequence[SegmentScan], current: Sequence[SegmentScan]
    ) -> list[Gap]:
        """The newest segment with frames of the previous capture must still be present
        (by identity, under any name) and no segment may lose valid bytes."""
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
