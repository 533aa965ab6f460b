"""Tree and content-list encodings: canonical msgpack (docs/format.md, "Trees").

A tree blob holds one directory: ``{"nodes": [node...], "v": 1}``, nodes sorted by
name bytes, every map with its keys in sorted order and default fields left out, so
equal directories encode to equal bytes and dedupe. A file's chunk list is inline in
its node when short (``chunks``), else a hash tree of content-list blobs (``content``)
cut at content-defined boundaries, so changing 1% of a huge file rewrites about 1%
of its metadata and an insertion only touches the blobs around it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import msgpack

from kyrorepo.errors import IntegrityError
from kyrorepo.format import check_version

TREE_VERSION = 1
INLINE_CHUNKS = 8
# A content-list blob ends after a ref whose id's first byte has its low 7 bits zero
# (about every 128 refs), or at MAX_REFS.
BOUNDARY_MASK = 0x7F
MAX_REFS = 1024

FILE = "file"
DIR = "dir"
SYMLINK = "symlink"
NODE_TYPES = (FILE, DIR, SYMLINK)

Ref = tuple[bytes, int]  # (id, byte length under it)


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpackb(data: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise IntegrityError(f"{what} does not decode ({exc})") from None


@dataclass(frozen=True)
class Node:
    name: bytes
    type: str
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    digest: bytes | None = None
    chunks: tuple[Ref, ...] | None = None
    content: tuple[bytes, int] | None = None  # (root content-list id, level)
    subtree: bytes | None = None
    target: bytes | None = None
    links: int | None = None  # hard-link group number within the snapshot
    xattrs: tuple[tuple[bytes, bytes], ...] = field(default_factory=tuple)

    def to_obj(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.chunks is not None:
            d["chunks"] = [[i, n] for i, n in self.chunks]
        if self.content is not None:
            d["content"] = [self.content[0], self.content[1]]
        if self.digest is not None:
            d["digest"] = self.digest
        d["gid"] = self.gid
        if self.links is not None:
            d["links"] = self.links
        d["mode"] = self.mode
        d["mtime_ns"] = self.mtime_ns
        d["name"] = self.name
        d["size"] = self.size
        if self.subtree is not None:
            d["subtree"] = self.subtree
        if self.target is not None:
            d["target"] = self.target
        d["type"] = self.type
        d["uid"] = self.uid
        if self.xattrs:
            d["xattrs"] = [[k, v] for k, v in self.xattrs]
        return d

    @classmethod
    def from_obj(cls, d: Any, what: str) -> "Node":
        try:
            ntype = d["type"]
            if ntype not in NODE_TYPES:
                raise ValueError(f"unknown node type {ntype!r}")
            chunks = d.get("chunks")
            content = d.get("content")
            return cls(
                name=bytes(d["name"]),
                type=ntype,
                mode=int(d["mode"]),
                uid=int(d["uid"]),
                gid=int(d["gid"]),
                mtime_ns=int(d["mtime_ns"]),
                size=int(d["size"]),
                digest=d.get("digest"),
                chunks=None if chunks is None else tuple((bytes(i), int(n)) for i, n in chunks),
                content=None if content is None else (bytes(content[0]), int(content[1])),
                subtree=d.get("subtree"),
                target=d.get("target"),
                links=d.get("links"),
                xattrs=tuple((bytes(k), bytes(v)) for k, v in d.get("xattrs", ())),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise IntegrityError(f"{what}: malformed node ({exc})") from None


def encode_tree(nodes: list[Node]) -> bytes:
    ordered = sorted(nodes, key=lambda n: n.name)
    return packb({"nodes": [n.to_obj() for n in ordered], "v": TREE_VERSION})


def decode_tree(data: bytes, what: str) -> list[Node]:
    obj = unpackb(data, what)
    if not isinstance(obj, dict) or "nodes" not in obj:
        raise IntegrityError(f"{what} is not a tree")
    check_version(int(obj.get("v", -1)), what)
    return [Node.from_obj(n, what) for n in obj["nodes"]]


# --- content lists -----------------------------------------------------------------------


def encode_content(level: int, refs: list[Ref]) -> bytes:
    return packb({"level": level, "refs": [[i, n] for i, n in refs], "v": TREE_VERSION})


def decode_content(data: bytes, what: str) -> tuple[int, list[Ref]]:
    obj = unpackb(data, what)
    try:
        check_version(int(obj["v"]), what)
        return int(obj["level"]), [(bytes(i), int(n)) for i, n in obj["refs"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"{what}: malformed content list ({exc})") from None


def is_boundary(ref_id: bytes) -> bool:
    return (ref_id[0] & BOUNDARY_MASK) == 0


class ContentListBuilder:
    """Streams chunk refs into a hash tree of content-list blobs, bounded in memory.

    ``store(encoded)`` saves one content-list blob and returns its id.
    """

    def __init__(self, store: Callable[[bytes], bytes]) -> None:
        self.store = store
        self.levels: list[list[Ref]] = [[]]
        self.flushed = False

    def add(self, ref: Ref) -> None:
        self._push(0, ref)

    def _push(self, level: int, ref: Ref) -> None:
        if level == len(self.levels):
            self.levels.append([])
        pending = self.levels[level]
        pending.append(ref)
        if is_boundary(ref[0]) or len(pending) >= MAX_REFS:
            self._emit(level)

    def _emit(self, level: int, final: bool = False) -> None:
        """Store the pending refs of ``level`` as one blob and pass its ref up a level.

        While adding, the ref goes through ``_push`` (which may cut the level above);
        when finishing, it is only appended, and the caller walks up level by level.
        """
        pending = self.levels[level]
        if not pending:
            return
        total = sum(n for _, n in pending)
        bid = self.store(encode_content(level, pending))
        self.levels[level] = []
        self.flushed = True
        if not final:
            self._push(level + 1, (bid, total))
            return
        if level + 1 == len(self.levels):
            self.levels.append([])
        self.levels[level + 1].append((bid, total))

    def finish(self) -> tuple[tuple[Ref, ...] | None, tuple[bytes, int] | None]:
        """Return (inline chunks, None) for short lists or (None, (root id, level))."""
        if not self.flushed and len(self.levels[0]) <= INLINE_CHUNKS:
            return tuple(self.levels[0]), None
        level = 0
        while True:
            above = level + 1 < len(self.levels)
            pending = self.levels[level]
            if not above and len(pending) == 1 and level > 0:
                return None, (pending[0][0], level - 1)
            if not above and not pending:
                raise AssertionError("content list lost its root")
            self._emit(level, final=True)
            level += 1


def iter_chunk_refs(node: Node, load: Callable[[bytes], bytes]) -> Iterator[Ref]:
    """Yield a file node's chunk refs in order, loading content-list blobs via ``load``."""
    if node.chunks is not None:
        yield from node.chunks
        return
    if node.content is None:
        return
    yield from _walk(node.content[0], node.content[1], load)


def load_content(bid: bytes, level: int, load: Callable[[bytes], bytes]) -> list[Ref]:
    """The refs of content list ``bid``, checked to be of the expected ``level``."""
    what = f"content list {bid.hex()[:16]}"
    got_level, refs = decode_content(load(bid), what)
    if got_level != level:
        raise IntegrityError(f"{what} is level {got_level}, expected {level}: run 'kyrorepo verify'")
    return refs


def _walk(bid: bytes, level: int, load: Callable[[bytes], bytes]) -> Iterator[Ref]:
    refs = load_content(bid, level, load)
    if level == 0:
        yield from refs
    else:
        for child, _ in refs:
            yield from _walk(child, level - 1, load)
