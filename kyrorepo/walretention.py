"""Which WAL captures prune keeps, and which blobs they hold (pure functions).

Rule: prune keeps the captures that extend each kept backup up to the next kept one,
and drops the rest. Since every kept backup's window reaches the next kept one (the
newest reaches the present), that is every capture of a source from its oldest kept
WAL-bearing backup on; ``--keep-wal-within DURATION`` (``since`` = now minus it) bounds
the window: captures are kept from the newest kept backup that started at or before
``since`` (so the seconds from ``since`` on stay restorable), or from ``since`` when no
kept backup is that old.

Why nothing else is needed: a capture stores only segments that changed since the
capture it was compared with and lists the others. A listed segment's bytes are then
either in a kept capture after the anchor backup, or unchanged since before the anchor,
in which case the anchor (which read the segment after that capture) holds the same
bytes. Captures of a source without a kept WAL-bearing backup are kept (from ``since``):
the database may be waiting for its first base backup, and ``wal-fetch`` serves them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from kyrorepo.wal.capture import Capture


class KeptBackup(Protocol):
    """What is needed of a kept backup (``kyrorepo.snapshot.Snapshot`` fits)."""

    @property
    def source(self) -> str: ...

    @property
    def time(self) -> int: ...

    @property
    def wal(self) -> Mapping[str, Any] | None: ...


@dataclass(frozen=True)
class WalRetention:
    keep: tuple[Capture, ...]
    drop: tuple[Capture, ...]
    blobs: tuple[bytes, ...]  # chunk ids the kept captures list inline
    contents: tuple[tuple[bytes, int], ...]  # content-list roots (id, level) they reference


def anchor_time(kept: Iterable[KeptBackup], since: int | None) -> int | None:
    """The start of the kept WAL window of one source's kept backups (None: no anchor)."""
    starts = sorted(b.time for b in kept if b.wal)
    if not starts:
        return since
    if since is None:
        return starts[0]
    older = [t for t in starts if t <= since]
    return older[-1] if older else since


def captures_to_keep(
    kept: Iterable[KeptBackup], captures: Iterable[Capture], since: int | None = None
) -> tuple[list[Capture], list[Capture]]:
    """(keep, drop) for every capture, source by source."""
    by_source: dict[str, list[KeptBackup]] = {}
    for b in kept:
        by_source.setdefault(b.source, []).append(b)
    anchors: dict[str, int | None] = {}
    keep: list[Capture] = []
    drop: list[Capture] = []
    for cap in captures:
        if cap.source not in anchors:
            anchors[cap.source] = anchor_time(by_source.get(cap.source, []), since)
        anchor = anchors[cap.source]
        (keep if anchor is None or cap.time >= anchor else drop).append(cap)
    return keep, drop


def referenced_blobs(captures: Iterable[Capture]) -> tuple[tuple[bytes, ...], tuple[tuple[bytes, int], ...]]:
    """Inline chunk ids and content-list roots of the captures' stored segments."""
    blobs: dict[bytes, None] = {}
    contents: dict[tuple[bytes, int], None] = {}
    for cap in captures:
        for seg in cap.stored:
            if seg.data.chunks is not None:
                blobs.update((bid, None) for bid, _ in seg.data.chunks)
            if seg.data.content is not None:
                contents[seg.data.content] = None
    return tuple(blobs), tuple(contents)


def plan_wal_retention(
    kept: Iterable[KeptBackup], captures: Iterable[Capture], since: int | None = None
) -> WalRetention:
    """The captures prune keeps and drops, and the blobs the kept ones need."""
    keep, drop = captures_to_keep(list(kept), captures, since)
    blobs, contents = referenced_blobs(keep)
    return WalRetention(tuple(keep), tuple(drop), blobs, contents)
