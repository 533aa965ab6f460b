"""WAL capture records (``walcaps/<id>``) and a backup's WAL record: pure encodings.

A *capture* is one small object saved by ``wal-archive`` (a whole data directory's WAL,
``kind = "archive"``) or ``wal-push`` (one file, ``kind = "push"``). It lists every
segment present (identity, name, valid bytes) but stores data only for the segments
that are new or grew since the capture it was compared with: an unchanged segment is a
``Present`` entry without a ``StoredSegment``, and its bytes are those of the newest
earlier version with the same identity and valid length. Plaintext: a canonical msgpack
map (byte table: ``docs/pitr.md``, "Capture objects"). Data is referenced as a file node
does: inline chunk refs, or the root of a content-list hash tree.

A backup of a WAL-bearing directory records ``Snapshot.wal`` (``BackupWal``): the codec
and a ``SegmentScan`` of every segment as stored (its valid prefix).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kyrorepo.errors import IntegrityError
from kyrorepo.format import check_version
from kyrorepo.wal.base import SegmentScan

CAPTURE_VERSION = 1
WAL_RECORD_VERSION = 1
KIND_ARCHIVE = "archive"
KIND_PUSH = "push"
KINDS = (KIND_ARCHIVE, KIND_PUSH)

Ref = tuple[bytes, int]


@dataclass(frozen=True)
class ContentRef:
    """Where the stored bytes of one segment version are: like a file node's content."""

    size: int
    digest: bytes  # keyed BLAKE3 of the bytes (the repository's file digest)
    chunks: tuple[Ref, ...] | None = None  # inline chunk refs (short lists)
    content: tuple[bytes, int] | None = None  # (content-list root id, level)

    def to_obj(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.chunks is not None:
            d["chunks"] = [[i, n] for i, n in self.chunks]
        if self.content is not None:
            d["content"] = [self.content[0], self.content[1]]
        d["digest"] = self.digest
        d["size"] = self.size
        return d

    @classmethod
    def from_obj(cls, d: Mapping[str, Any]) -> ContentRef:
        chunks = d.get("chunks")
        content = d.get("content")
        return cls(
            size=int(d["size"]),
            digest=bytes(d["digest"]),
            chunks=None if chunks is None else tuple((bytes(i), int(n)) for i, n in chunks),
            content=None if content is None else (bytes(content[0]), int(content[1])),
        )


@dataclass(frozen=True)
class StoredSegment:
    """A segment version whose valid prefix a capture stored."""

    scan: SegmentScan
    data: ContentRef


@dataclass(frozen=True)
class Present:
    """A segment present at capture time: identity, name then, valid bytes then."""

    identity: str
    relpath: str
    end_of_valid: int


@dataclass(frozen=True)
class Capture:
    source: str
    host: str
    kind: str  # "archive": the whole WAL of a directory; "push": the pushed file only
    time: int  # capture time, Unix seconds
    time_ns: int
    codec: str
    codec_options: dict[str, Any] = field(default_factory=dict)
    present: tuple[Present, ...] = ()
    stored: tuple[StoredSegment, ...] = ()
    id: str = ""  # hex object name; not part of the encoding

    @property
    def complete(self) -> bool:
        """True when ``present`` lists every segment of the directory (not a push)."""
        return self.kind == KIND_ARCHIVE

    def to_obj(self) -> dict[str, Any]:
        return {
            "codec": self.codec,
            "codec_options": dict(sorted(self.codec_options.items())),
            "host": self.host,
            "kind": self.kind,
            "present": [[p.identity, p.relpath, p.end_of_valid] for p in self.present],
            "segments": [{"data": s.data.to_obj(), "scan": s.scan.to_dict()} for s in self.stored],
            "source": self.source,
            "time": self.time,
            "time_ns": self.time_ns,
            "v": CAPTURE_VERSION,
        }

    @classmethod
    def from_obj(cls, d: Any, ident: str) -> Capture:
        what = f"WAL capture {ident[:8]}"
        try:
            check_version(int(d["v"]), what)
            kind = str(d["kind"])
            if kind not in KINDS:
                raise ValueError(f"unknown kind {kind!r}")
            return cls(
                source=str(d["source"]), host=str(d["host"]), kind=kind, time=int(d["time"]),
                time_ns=int(d["time_ns"]), codec=str(d["codec"]),
                codec_options=dict(d.get("codec_options") or {}),
                present=tuple(Present(str(i), str(r), int(e)) for i, r, e in d["present"]),
                stored=tuple(
                    StoredSegment(SegmentScan.from_dict(s["scan"]), ContentRef.from_obj(s["data"]))
                    for s in d["segments"]
                ),
                id=ident,
            )  # fmt: skip
        except IntegrityError as e:
            raise IntegrityError(f"{what}: {e.message}") from e
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise IntegrityError(f"{what} is malformed ({e}): run 'kyrorepo verify'") from None


@dataclass(frozen=True)
class BackupWal:
    """``Snapshot.wal``: the codec of a backed-up directory and its segments as stored."""

    codec: str
    options: dict[str, Any]
    time_ns: int  # when the segments were scanned (the segments codec's frame time)
    segments: tuple[SegmentScan, ...]

    def to_obj(self) -> dict[str, Any]:
        return {
            "codec": self.codec,
            "options": dict(sorted(self.options.items())),
            "segments": [s.to_dict() for s in self.segments],
            "time_ns": self.time_ns,
            "v": WAL_RECORD_VERSION,
        }

    @classmethod
    def from_obj(cls, d: Any, what: str) -> BackupWal:
        try:
            check_version(int(d["v"]), what)
            return cls(
                codec=str(d["codec"]),
                options=dict(d.get("options") or {}),
                time_ns=int(d["time_ns"]),
                segments=tuple(SegmentScan.from_dict(s) for s in d["segments"]),
            )
        except IntegrityError as e:
            raise IntegrityError(f"{what}: {e.message}") from e
        except (KeyError, TypeError, ValueError) as e:
            raise IntegrityError(f"{what}: malformed WAL record ({e})") from None


def present_of(scan: SegmentScan) -> Present:
    return Present(scan.identity, scan.relpath, scan.end_of_valid)
