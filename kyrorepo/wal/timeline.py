"""The WAL timeline of one source: its backups and captures folded in time order (pure).

Every backup of a WAL-bearing directory and every capture is a *state*: what was known of
the WAL at one time (``State``). Restoring to second ``T`` starts from a base backup's
state and folds the later states into it (``Fold``):

* frame codecs (kyrodb, chronicle): the states up to ``T`` and the first one after it
  (frames written up to ``T`` may only be captured then); every segment identity ever
  seen, with its longest version, is replayed and cut at ``T``;
* the segments codec (no frames): the states up to ``T`` only; each file present in the
  last of them, as it was then ("precision is the capture interval").

A state that lists a segment without storing it (unchanged since the capture it was
compared with) reuses the version with the same identity and valid length. Gaps come
from the codec (``find_gaps`` over the folded chain, ``capture_gaps`` between complete
states) and from versions no kept state holds (``missing``). A gap makes the targets from
``TimedGap.unreachable_from`` on unreachable with this base.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from kyrorepo.wal.base import Gap, SegmentScan, WalCodec
from kyrorepo.wal.capture import Present

PER_FILE_CODECS = ("segments",)
_NEVER = -(1 << 62)  # sorts before every second


@dataclass(frozen=True)
class Version:
    """One stored version of a segment: its scan and where its bytes are."""

    scan: SegmentScan
    ref: object  # opaque here: a capture's ContentRef, or a file of a backup
    time_ns: int  # when the bytes were captured (the segments codec's frame time)
    state: str  # id of the backup or capture that stored it


@dataclass(frozen=True)
class State:
    id: str
    kind: str  # "backup", "archive" or "push"
    time: int  # when the state was known: a capture's time, a backup's end time
    start: int  # a backup's start time; a capture's time
    complete: bool  # ``present`` lists every segment of the directory
    present: tuple[Present, ...]
    stored: tuple[Version, ...]


@dataclass(frozen=True)
class TimedGap:
    """A gap and the first target second whose plan meets it (None: the base's own)."""

    gap: Gap
    appear: int | None

    @property
    def unreachable_from(self) -> int | None:
        """First unreachable second; None when no second is reachable across it."""
        lgt = self.gap.last_good_time
        marks = [m for m in (None if lgt is None else lgt + 1, self.appear) if m is not None]
        return max(marks) if marks else None

    def blocks(self, t: int) -> bool:
        first = self.unreachable_from
        return first is None or first <= t


def is_per_file(codec: WalCodec) -> bool:
    return codec.name in PER_FILE_CODECS


class Fold:
    """Folds states (base first, then in time order) into the chain of segment versions."""

    def __init__(self, codec: WalCodec, metadata: Mapping[str, bytes], names_until: int | None = None) -> None:
        self.codec = codec
        self.names_until = names_until  # segments keep the names they had then, if seen by then
        self.metadata = dict(metadata)
        self.per_file = is_per_file(codec)
        self.current: dict[str, Version] = {}  # identity -> version, as of the last state
        self.best: dict[str, Version] = {}  # identity -> longest version seen
        self.names: dict[str, str] = {}  # identity -> name in the newest state listing it
        self.gaps: list[TimedGap] = []
        self.states = 0
        self._seen: set[tuple[object, ...]] = set()
        self._prev_time: int | None = None

    def add(self, state: State) -> None:
        appear = None
        if self.states:
            appear = state.time if self.per_file else self._prev_time
        before = [self._named(v) for v in self.current.values()]
        cur: dict[str, Version] = {} if state.complete else dict(self.current)
        stored = {v.scan.identity: v for v in state.stored}
        named = {p.identity for p in state.present}
        listed = list(state.present) + [
            Present(i, v.scan.relpath, v.scan.end_of_valid) for i, v in stored.items() if i not in named
        ]
        for p in listed:
            version = stored.get(p.identity) or self._carry(p)
            if self.names_until is None or state.time <= self.names_until or p.identity not in self.names:
                self.names[p.identity] = p.relpath
            if version is None:
                self._missing(state, p, appear)
                continue
            cur[p.identity] = version
            old = self.best.get(p.identity)
            if old is None or version.scan.end_of_valid > old.scan.end_of_valid:
                self.best[p.identity] = version
        if state.complete and self.states:
            after = [self._named(v) for v in cur.values()]
            self._record(self.codec.capture_gaps(before, after), appear)
        self.current = cur
        self.states += 1
        self._prev_time = state.time
        self._record(self.codec.find_gaps(self._pool_scans(), self.metadata or None), appear)

    def chain(self) -> list[Version]:
        """The versions to restore, named as restored, in replay order."""
        pool = self.current if self.per_file else self.best
        named = {i: replace(v, scan=self._named(v)) for i, v in pool.items()}
        return [named[s.identity] for s in self.codec.replay_order(v.scan for v in named.values())]

    def _pool_scans(self) -> list[SegmentScan]:
        pool = self.current if self.per_file else self.best
        return [self._named(v) for v in pool.values()]

    def _named(self, v: Version) -> SegmentScan:
        name = self.names.get(v.scan.identity, v.scan.relpath)
        return v.scan if name == v.scan.relpath else replace(v.scan, relpath=name)

    def _carry(self, p: Present) -> Version | None:
        for pool in (self.current, self.best):
            v = pool.get(p.identity)
            if v is not None and v.scan.end_of_valid == p.end_of_valid:
                return v
        return None

    def _missing(self, state: State, p: Present, appear: int | None) -> None:
        known = self.best.get(p.identity)
        gap = Gap(
            kind="missing",
            detail=f"{p.relpath}: {state.kind} {state.id[:8]} saw {p.end_of_valid} valid bytes "
            "of it, but no remaining backup or capture holds them",
            after_segment=p.identity,
            last_good_time=None if known is None else known.scan.last_time,
        )
        self._record([gap], appear)

    def _record(self, gaps: Iterable[Gap], appear: int | None) -> None:
        for g in gaps:
            key = (g.kind, g.after_segment, g.before_segment, repr(g.after_ident), repr(g.before_ident))
            if key not in self._seen:
                self._seen.add(key)
                self.gaps.append(TimedGap(g, appear))


# --- planning --------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainPlan:
    t: int
    states: tuple[State, ...]  # the base first, then the states folded into it
    versions: tuple[Version, ...]  # replay order, named as restored
    gaps: tuple[TimedGap, ...]  # gaps that block ``t``


def later_states(base: State, states: Iterable[State]) -> list[State]:
    """The states a restore from ``base`` can use: those that began at or after it."""
    out = [s for s in states if s.id != base.id and s.time >= base.start and s.start >= base.start]
    return sorted(out, key=lambda s: (s.time, s.start, s.id))


def states_for(later: Sequence[State], t: int, per_file: bool) -> list[State]:
    """Frame codecs: the states up to ``t`` and the first after it; per-file: up to ``t``."""
    out: list[State] = []
    for s in later:
        if s.time > t:
            if not per_file:
                out.append(s)
            break
        out.append(s)
    return out


def plan_chain(
    codec: WalCodec, base: State, metadata: Mapping[str, bytes], later: Sequence[State], t: int
) -> ChainPlan:
    fold = Fold(codec, metadata, names_until=t)
    used = [base, *states_for(later, t, fold.per_file)]
    for s in used:
        fold.add(s)
    blocking = tuple(g for g in fold.gaps if g.blocks(t))
    return ChainPlan(t, tuple(used), tuple(fold.chain()), blocking)


def first_gap(
    codec: WalCodec, base: State, metadata: Mapping[str, bytes], later: Sequence[State],
    until: int | None = None,
) -> TimedGap | None:
    """The gap that makes the earliest second unreachable from ``base`` (before ``until``)."""
    fold = Fold(codec, metadata)
    fold.add(base)
    last = base.time
    for s in later:
        if until is not None and last >= until:
            break  # no target before ``until`` folds this state in
        fold.add(s)
        last = s.time
    return earliest(fold.gaps)


def earliest(gaps: Sequence[TimedGap]) -> TimedGap | None:
    """The gap that blocks the earliest second."""
    if not gaps:
        return None
    return min(gaps, key=lambda g: _NEVER if g.unreachable_from is None else g.unreachable_from)


# --- the recoverable window ------------------------------------------------------------


@dataclass(frozen=True)
class BaseCandidate:
    state: State
    usable_from: int  # first second the codec accepts this base for
    metadata: Mapping[str, bytes]


@dataclass(frozen=True)
class Hole:
    start: int
    end: int  # inclusive
    detail: str


@dataclass(frozen=True)
class Window:
    earliest: int | None  # None: no second is restorable
    latest: int | None
    holes: tuple[Hole, ...]  # unreachable stretches between earliest and latest
    tail: Hole | None  # after ``latest`` up to the newest state, when a gap ends the window


def window(
    codec: WalCodec, bases: Sequence[BaseCandidate], states: Sequence[State], latest: int
) -> Window:
    """Earliest and latest restorable second and the unreachable stretches between."""
    reach: list[tuple[int, int]] = []
    unreachable: list[Hole] = []
    for cand, start, end in _base_spans(bases, latest):
        later = later_states(cand.state, states)
        gap = first_gap(codec, cand.state, cand.metadata, later, until=end)
        stop = end
        if gap is not None:
            first = gap.unreachable_from
            stop = start if first is None else max(start, min(end, first))
        if stop > start:
            reach.append((start, stop))
        if stop < end and gap is not None:
            unreachable.append(Hole(stop, end - 1, gap.gap.detail))
    if not reach:
        return Window(None, None, (), None)
    earliest, last = reach[0][0], reach[-1][1] - 1
    holes = [h for h in unreachable if earliest < h.start <= last]
    tail = next((h for h in unreachable if h.start > last), None)
    return Window(earliest, last, tuple(holes), tail)


def _base_spans(
    bases: Sequence[BaseCandidate], latest: int
) -> list[tuple[BaseCandidate, int, int]]:
    """For each stretch of targets, the base a restore would choose: the newest usable one."""
    spans: list[tuple[BaseCandidate, int, int]] = []
    chosen: BaseCandidate | None = None
    start = 0
    for cand in sorted(bases, key=lambda b: (b.usable_from, b.state.time)):
        if cand.usable_from > latest:
            break
        if chosen is not None and cand.state.time <= chosen.state.time:
            continue
        if chosen is not None and cand.usable_from > start:
            spans.append((chosen, start, cand.usable_from))
        chosen, start = cand, cand.usable_from
    if chosen is not None:
        spans.append((chosen, start, latest + 1))
    return spans
