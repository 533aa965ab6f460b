"""Snapshot objects (``snapshots/<id>``): one per backup, saved last.

Plaintext: canonical msgpack map (docs/format.md, "Snapshots"). Ids are the keyed
BLAKE3 of that plaintext; listing decrypts each object (they are small).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from kyrorepo.errors import IntegrityError, NotFoundError, UsageError
from kyrorepo.format import BlobType, check_version
from kyrorepo.repository import Repository
from kyrorepo.tree import Node, packb, unpackb

SNAPSHOT_VERSION = 1


@dataclass(frozen=True)
class Snapshot:
    time: int  # start, Unix seconds
    end_time: int  # finish, Unix seconds
    host: str
    username: str
    source: str
    data_dir: str
    root: Node  # the data directory itself; root.subtree is the top tree
    kind: str = "full"  # "full" or "incremental", as created
    parent: str | None = None
    tags: tuple[str, ...] = ()
    description: str = ""
    stats: dict[str, int] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    wal: dict[str, Any] | None = None
    lost: tuple[str, ...] = ()  # paths dropped by 'repair snapshots'
    program: str = ""
    id: str = ""  # hex name; not part of the encoding

    def to_obj(self) -> dict[str, Any]:
        return {
            "data_dir": self.data_dir,
            "description": self.description,
            "end_time": self.end_time,
            "host": self.host,
            "kind": self.kind,
            "lost": list(self.lost),
            "parent": self.parent,
            "program": self.program,
            "root": self.root.to_obj(),
            "source": self.source,
            "stats": dict(sorted(self.stats.items())),
            "tags": list(self.tags),
            "time": self.time,
            "username": self.username,
            "v": SNAPSHOT_VERSION,
            "wal": self.wal,
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_obj(cls, d: Any, ident: str) -> "Snapshot":
        what = f"backup {ident[:8]}"
        try:
            check_version(int(d["v"]), what)
            return cls(
                time=int(d["time"]), end_time=int(d["end_time"]), host=str(d["host"]),
                username=str(d["username"]), source=str(d["source"]), data_dir=str(d["data_dir"]),
                root=Node.from_obj(d["root"], what), kind=str(d["kind"]), parent=d.get("parent"),
                tags=tuple(d.get("tags", ())), description=str(d.get("description", "")),
                stats={str(k): int(v) for k, v in d.get("stats", {}).items()},
                warnings=tuple(d.get("warnings", ())), wal=d.get("wal"), lost=tuple(d.get("lost", ())),
                program=str(d.get("program", "")), id=ident,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"{what} is malformed ({exc})") from None

    @property
    def short_id(self) -> str:
        return self.id[:8]

    @property
    def tree(self) -> bytes:
        assert self.root.subtree is not None
        return self.root.subtree


def save_snapshot(repo: Repository, snap: Snapshot) -> Snapshot:
    name = repo.save_object(BlobType.SNAPSHOT, packb(snap.to_obj()))
    return replace(snap, id=name)


def load_snapshot(repo: Repository, name: str) -> Snapshot:
    return Snapshot.from_obj(unpackb(repo.load_object(BlobType.SNAPSHOT, name), f"backup {name[:8]}"), name)


def list_snapshots(repo: Repository, source: str | None = None) -> list[Snapshot]:
    """All backups, newest first: by start time, end time, then (backups of the same second)
    descent, a backup before the one it is the parent of, then id."""
    snaps = [load_snapshot(repo, n) for n in repo.object_names(BlobType.SNAPSHOT)]
    if source is not None:
        snaps = [s for s in snaps if s.source == source]
    depth = _descent(snaps)
    snaps.sort(key=lambda s: (s.time, s.end_time, depth[s.id], s.id), reverse=True)
    return snaps


def _descent(snaps: list[Snapshot]) -> dict[str, int]:
    """For each backup, how many of its ancestors (parent, its parent, ...) are in ``snaps``."""
    by_id = {s.id: s for s in snaps}
    depth: dict[str, int] = {}
    for s in snaps:
        chain: dict[str, None] = {}  # the ids walked up from s, in order (a dict: O(1) membership)
        cur: Snapshot | None = s
        while cur is not None and cur.id not in depth and cur.id not in chain:
            chain[cur.id] = None
            cur = by_id.get(cur.parent) if cur.parent else None
        base = depth[cur.id] + 1 if cur is not None and cur.id in depth else 0
        for sid in reversed(chain):
            depth[sid] = base
            base += 1
    return depth


def sources_of(snaps: list[Snapshot]) -> list[str]:
    return sorted({s.source for s in snaps})


def find_snapshot(repo: Repository, ref: str, source: str | None = None) -> Snapshot:
    """Resolve ``latest`` (within one source) or a unique id prefix."""
    if ref == "latest":
        snaps = list_snapshots(repo)
        if source is not None:
            snaps = [s for s in snaps if s.source == source]
        elif len(sources_of(snaps)) > 1:
            raise UsageError(
                "several sources in this repository, name one with --source: " + ", ".join(sources_of(snaps))
            )
        if not snaps:
            where = f" of source {source}" if source else ""
            raise NotFoundError(f"no backups{where} in the repository: run 'kyrorepo backup' first")
        return snaps[0]
    name = repo.resolve_object(BlobType.SNAPSHOT, ref, "backup")
    snap = load_snapshot(repo, name)
    if source is not None and snap.source != source:
        raise UsageError(f"backup {snap.short_id} belongs to source {snap.source}, not {source}")
    return snap
