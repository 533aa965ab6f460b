"""KyroDB (vector database) WAL codec.

Segments are ``wal_<unix micros>.wal``: a 4-byte header (u32 LE ``0x57414C00``), then
frames ``[u32 LE len][payload][u32 LE crc32(payload)]``. The payload is bincode 1 of
``{op u32, doc_id u64, embedding Vec<f32>, metadata HashMap<String,String>, seq_no u64,
timestamp u64}``; ``seq_no`` and ``timestamp`` (Unix seconds) are its last 16 bytes.
``seq_no`` is a frame's identity and goes up by one from frame to frame, across
segments. Snapshots are ``snapshot_<unix micros>.snap``; the JSON ``MANIFEST`` names the
latest snapshot, the last sequence number it contains and the segments to replay.
Byte tables and rules: ``docs/wal-codecs.md``.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
import struct
import zlib
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from kyrorepo.errors import IntegrityError, PitrUnreachableError
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
    read_head,
    read_prefix,
    summarize,
    walk_frames,
    walk_relpaths,
)

MAGIC = 0x57414C00
HEADER = struct.pack("<I", MAGIC)  # b"\x00LAW"
HEADER_LEN = len(HEADER)
MIN_PAYLOAD = 16  # seq_no u64 + timestamp u64
MANIFEST = "MANIFEST"

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_TAIL = struct.Struct("<QQ")  # seq_no, timestamp
_SEGMENT_RE = re.compile(r"^wal_(\d+)\.wal$")
_SNAPSHOT_RE = re.compile(r"^snapshot_(\d+)(?:\.snap)?$")


@dataclass(frozen=True)
class Record:
    """The decoded payload of one frame."""

    op: int
    doc_id: int
    embedding: tuple[float, ...]
    metadata: tuple[tuple[str, str], ...]  # HashMap entries in file order
    seq_no: int
    timestamp: int  # Unix seconds


@dataclass(frozen=True)
class Manifest:
    version: int
    latest_snapshot: str | None
    latest_snapshot_wal_seq: int
    wal_segments: tuple[str, ...]
    last_updated: int


# --- names ---------------------------------------------------------------------------


def segment_time(relpath: str) -> int | None:
    """Unix micros from a ``wal_<micros>.wal`` name, None for other names."""
    m = _SEGMENT_RE.match(posixpath.basename(relpath))
    return int(m.group(1)) if m else None


def snapshot_time(relpath: str) -> int | None:
    """Unix micros from a ``snapshot_<micros>.snap`` name, None for other names."""
    m = _SNAPSHOT_RE.match(posixpath.basename(relpath))
    return int(m.group(1)) if m else None


def segment_name(micros: int) -> str:
    return f"wal_{micros}.wal"


def snapshot_name(micros: int) -> str:
    return f"snapshot_{micros}.snap"


# --- payload and frame encoding --------------------------------------------------------


def encode_record(r: Record) -> bytes:
    """bincode 1 (fixint, little-endian, u64 lengths) of a Record."""
    parts = [struct.pack("<IQQ", r.op, r.doc_id, len(r.embedding))]
    parts.append(struct.pack(f"<{len(r.embedding)}f", *r.embedding))
    parts.append(_U64.pack(len(r.metadata)))
    for key, value in r.metadata:
        for s in (key.encode(), value.encode()):
            parts.append(_U64.pack(len(s)))
            parts.append(s)
    parts.append(_TAIL.pack(r.seq_no, r.timestamp))
    return b"".join(parts)


def decode_record(payload: bytes) -> Record:
    """Parse a frame payload completely; IntegrityError if it is not a valid record."""
    try:
        op, doc_id, n = struct.unpack_from("<IQQ", payload, 0)
        pos = 20
        if n > (len(payload) - pos) // 4:
            raise ValueError("embedding longer than the payload")
        embedding = struct.unpack_from(f"<{n}f", payload, pos)
        pos += 4 * n
        (m,) = _U64.unpack_from(payload, pos)
        pos += 8
        meta = []
        for _ in range(m):
            kv = []
            for _ in range(2):
                (ln,) = _U64.unpack_from(payload, pos)
                pos += 8
                if pos + ln > len(payload):
                    raise ValueError("string longer than the payload")
                kv.append(payload[pos : pos + ln].decode())
                pos += ln
            meta.append((kv[0], kv[1]))
        seq_no, timestamp = _TAIL.unpack_from(payload, pos)
        pos += _TAIL.size
        if pos != len(payload):
            raise ValueError(f"{len(payload) - pos} bytes left over")
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise IntegrityError(f"KyroDB WAL record does not decode: {e}") from e
    return Record(op, doc_id, tuple(embedding), tuple(meta), seq_no, timestamp)


def encode_frame(payload: bytes) -> bytes:
    return _U32.pack(len(payload)) + payload + _U32.pack(zlib.crc32(payload))


def _parse(reader: Reader, off: int) -> RawFrame | None:
    head = reader.read(off, 4)
    if len(head) < 4:
        return None
    (n,) = _U32.unpack(head)
    end = off + 4 + n + 4
    if end > reader.size:
        return None
    body = reader.read(off + 4, n + 4)
    payload = body[:n]
    ok = n >= MIN_PAYLOAD and _U32.unpack_from(body, n)[0] == zlib.crc32(payload)
    return RawFrame(off, end, payload, ok)


# --- manifest --------------------------------------------------------------------------


def parse_manifest(data: bytes) -> Manifest:
    """Parse a MANIFEST; IntegrityError if it is not KyroDB's JSON manifest."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise IntegrityError(f"KyroDB MANIFEST is not JSON: {e}") from e
    return _manifest_from(obj)


def _manifest_from(obj: object) -> Manifest:
    if not isinstance(obj, dict):
        raise IntegrityError("KyroDB MANIFEST is not a JSON object")
    segs = obj.get("wal_segments")
    snap = obj.get("latest_snapshot")
    ints = [obj.get(k) for k in ("version", "latest_snapshot_wal_seq", "last_updated")]
    if (
        not isinstance(segs, list)
        or not all(isinstance(s, str) for s in segs)
        or not (snap is None or isinstance(snap, str))
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in ints)
    ):
        raise IntegrityError(
            "KyroDB MANIFEST lacks version, latest_snapshot, latest_snapshot_wal_seq, "
            "wal_segments or last_updated, or one has the wrong type"
        )
    version, seq, updated = (i for i in ints if isinstance(i, int))
    return Manifest(version, snap, seq, tuple(segs), updated)


# --- the codec -------------------------------------------------------------------------


class KyroDBCodec:
    """WalCodec for KyroDB data directories."""

    name = "kyrodb"

    def is_segment(self, relpath: str) -> bool:
        return segment_time(relpath) is not None

    def is_metadata(self, relpath: str) -> bool:
        return posixpath.basename(relpath) == MANIFEST

    def metadata_files(self) -> tuple[str, ...]:
        return (MANIFEST,)

    def detect(self, root: str) -> bool:
        """KyroDB if every ``wal_*.wal`` of 4+ bytes starts with the magic and at least
        one does, or a MANIFEST parses as KyroDB's JSON manifest."""
        evidence = False
        for rel in walk_relpaths(root):
            path = os.path.join(root, rel)
            if self.is_segment(rel):
                head = read_head(path, HEADER_LEN)
                if len(head) == HEADER_LEN:
                    if head != HEADER:
                        return False
                    evidence = True
            elif self.is_metadata(rel) and not evidence:
                try:
                    with open(path, "rb") as f:
                        parse_manifest(f.read(1 << 20))
                    evidence = True
                except (OSError, IntegrityError):
                    pass
        return evidence

    def iter_frames(self, data: Source, *, capture_time_ns: int | None = None) -> Iterator[Frame]:
        reader = Reader(data)
        if not self._header_ok(reader):
            return
        for raw in walk_frames(reader, HEADER_LEN, _parse, "KyroDB WAL segment"):
            seq_no, ts = _TAIL.unpack_from(raw.payload, len(raw.payload) - _TAIL.size)
            yield Frame(raw.offset, raw.end, ts, ts * NS_PER_S, seq_no)

    def scan(
        self, relpath: str, data: Source, *, capture_time_ns: int | None = None
    ) -> SegmentScan:
        size = Reader(data).size
        header = HEADER_LEN if size >= HEADER_LEN else 0
        ident = self.segment_identity(relpath, data)
        return summarize(relpath, ident, size, header, self.iter_frames(data), check_idents=True)

    def valid_length(self, data: Source) -> int:
        end = HEADER_LEN if Reader(data).size >= HEADER_LEN else 0
        for fr in self.iter_frames(data):
            end = fr.end
        return end

    def cut_point(self, data: Source, t: int, *, capture_time_ns: int | None = None) -> CutPoint:
        header = HEADER_LEN if Reader(data).size >= HEADER_LEN else 0
        return prefix_cut(self.iter_frames(data), header, t)

    def cut(self, data: Source, t: int, *, capture_time_ns: int | None = None) -> bytes:
        return read_prefix(data, self.cut_point(data, t).length)

    def segment_identity(self, relpath: str, data: Source) -> str:
        """The relative path: KyroDB never renames a segment."""
        return relpath

    def replay_order(self, scans: Iterable[SegmentScan]) -> list[SegmentScan]:
        """By first seq_no; segments without frames by name (creation micros)."""
        by_name = sorted(scans, key=lambda s: (_name_key(s.relpath), s.relpath))
        keyed: list[tuple[int, int, int, SegmentScan]] = []
        prev_last = -1
        for i, s in enumerate(by_name):
            if isinstance(s.first_ident, int) and isinstance(s.last_ident, int):
                keyed.append((s.first_ident, 0, i, s))
                prev_last = s.last_ident
            else:
                keyed.append((prev_last, 1, i, s))
        keyed.sort(key=lambda k: k[:3])
        return [k[3] for k in keyed]

    def find_gaps(
        self, chain: Sequence[SegmentScan], metadata: Mapping[str, bytes] | None = None
    ) -> list[Gap]:
        """seq_no must go up by exactly one from frame to frame across the chain. With
        the base's MANIFEST, the chain must hold ``latest_snapshot_wal_seq + 1`` (if it
        goes past it) and breaks wholly inside the snapshot are ignored."""
        ordered = self.replay_order(latest_versions(chain))
        gaps = [s.internal_gap for s in ordered if s.internal_gap is not None]
        framed = [s for s in ordered if isinstance(s.first_ident, int)]
        for prev, nxt in zip(framed, framed[1:]):
            assert isinstance(prev.last_ident, int) and isinstance(nxt.first_ident, int)
            if nxt.first_ident != prev.last_ident + 1:
                gaps.append(
                    Gap(
                        kind="overlap" if nxt.first_ident <= prev.last_ident else "seq",
                        detail=f"{prev.relpath} ends at seq_no {prev.last_ident}, "
                        f"{nxt.relpath} starts at {nxt.first_ident}",
                        after_segment=prev.identity,
                        before_segment=nxt.identity,
                        after_ident=prev.last_ident,
                        before_ident=nxt.first_ident,
                        last_good_time=prev.last_time,
                    )
                )
        mpaths = sorted(p for p in metadata or {} if self.is_metadata(p))
        if not mpaths or not metadata:
            return gaps
        m = parse_manifest(metadata[mpaths[0]])
        need = m.latest_snapshot_wal_seq + 1
        gaps = [g for g in gaps if not isinstance(g.before_ident, int) or g.before_ident > need]
        first = framed[0] if framed else None
        if first is not None and isinstance(first.first_ident, int) and first.first_ident > need:
            snap = snapshot_time(m.latest_snapshot) if m.latest_snapshot else None
            gaps.insert(
                0,
                Gap(
                    kind="start",
                    detail=f"the snapshot holds seq_no up to {need - 1} but the WAL starts "
                    f"at {first.first_ident} (in {first.relpath})",
                    before_segment=first.identity,
                    after_ident=need - 1,
                    before_ident=first.first_ident,
                    last_good_time=None if snap is None else snap // 1_000_000,
                ),
            )
        return gaps

    def capture_gaps(
        self, previous: Sequence[SegmentScan], current: Sequence[SegmentScan]
    ) -> list[Gap]:
        shrunk = [g for g in newest_survives(previous, current, []) if g.kind == "shrunk"]
        return shrunk + self.find_gaps(latest_versions(previous, current))

    def base_usable(self, relpaths: Iterable[str], t: int) -> bool:
        """False if the base holds a snapshot taken after second ``t``."""
        for rel in relpaths:
            micros = snapshot_time(rel)
            if micros is not None and micros // 1_000_000 > t:
                return False
        return True

    def fix_metadata(
        self,
        metadata: Mapping[str, bytes],
        restored_segments: Sequence[str],
        present: Collection[str],
        t: int,
    ) -> dict[str, bytes | None]:
        """Rewrite each MANIFEST: ``wal_segments`` = the restored segments under its
        directory, in the given (replay) order; ``last_updated`` = ``t``; other keys kept.
        The snapshot it names must be present and not newer than ``t``."""
        manifests = sorted(p for p in metadata if self.is_metadata(p))
        if not manifests:
            raise PitrUnreachableError(
                "the base backup has no KyroDB MANIFEST; choose another base backup"
            )
        out: dict[str, bytes | None] = {}
        for mpath in manifests:
            d = posixpath.dirname(mpath)
            try:
                obj = json.loads(metadata[mpath])
            except (ValueError, UnicodeDecodeError) as e:
                raise IntegrityError(f"{mpath}: KyroDB MANIFEST is not JSON: {e}") from e
            old = _manifest_from(obj)
            self._check_snapshot(mpath, old, present, t)
            mine = [s for s in restored_segments if _owner(s, manifests) == mpath]
            nested = any("/" in s for s in old.wal_segments) or not old.wal_segments
            obj["wal_segments"] = [
                posixpath.relpath(s, d or ".") if nested else posixpath.basename(s) for s in mine
            ]
            obj["last_updated"] = t
            out[mpath] = json.dumps(obj, indent=2).encode()
        return out

    # --- helpers ---

    def _header_ok(self, reader: Reader) -> bool:
        head = reader.read(0, HEADER_LEN)
        if len(head) < HEADER_LEN:
            if HEADER.startswith(head):
                return False
        elif head == HEADER:
            return True
        raise IntegrityError(
            f"not a KyroDB WAL segment: starts with {head.hex()}, expected {HEADER.hex()}; "
            "choose another --wal codec"
        )

    def _check_snapshot(self, mpath: str, m: Manifest, present: Collection[str], t: int) -> None:
        if m.latest_snapshot is None:
            return
        snap = posixpath.join(posixpath.dirname(mpath), m.latest_snapshot)
        if snap not in present:
            raise PitrUnreachableError(
                f"{mpath} names snapshot {m.latest_snapshot}, which the base backup lacks; "
                "choose another base backup"
            )
        micros = snapshot_time(snap)
        if micros is not None and micros // 1_000_000 > t:
            raise PitrUnreachableError(
                f"{mpath} names snapshot {m.latest_snapshot}, taken after the target time "
                f"{t}; choose an older base backup"
            )


def _name_key(relpath: str) -> float:
    micros = segment_time(relpath)
    return math.inf if micros is None else float(micros)


def _owner(segment: str, manifests: list[str]) -> str:
    """The MANIFEST whose directory is the nearest ancestor of ``segment``."""
    best, best_len = manifests[0], -1
    for m in manifests:
        d = posixpath.dirname(m)
        if (d == "" or segment.startswith(d + "/")) and len(d) > best_len:
            best, best_len = m, len(d)
    return best
