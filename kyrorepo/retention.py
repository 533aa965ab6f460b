"""Retention policies: which backups a set of keep rules keeps. Pure code, no I/O.

Rules (docs/retention.md), evaluated over one group of backups, newest first:

* ``last N`` keeps the N newest backups;
* ``hourly/daily/weekly/monthly/yearly N`` keep the newest backup of each of the last N
  hours/days/ISO weeks/months/years that have backups (UTC buckets);
* ``within D`` keeps every backup at most D older than the newest backup of the group;
* ``within-hourly/daily/weekly/monthly/yearly D`` keep the newest backup of each
  hour/day/... among the backups at most D older than the newest of the group;
* ``tag T[,T2...]`` keeps every backup carrying all the listed tags.

A backup is kept when any rule keeps it. ``min_age`` protects every backup younger than
that many seconds (measured from ``now``) whatever the rules say; it is not a keep rule
on its own. A count of ``UNLIMITED`` (-1) means every bucket.
"""

from __future__ import annotations

import calendar
import datetime as _dt
import re
from dataclasses import dataclass, field
from typing import Callable, Generic, Iterable, Protocol, Sequence, TypeVar

from kyrorepo.errors import UsageError

UNLIMITED = -1
HOUR = 3600
DAY = 24 * HOUR

BUCKET_KINDS = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
WITHIN_KINDS = ("hourly", "daily", "weekly", "monthly", "yearly")
GROUP_BY = ("source", "host", "none")

_DURATION = re.compile(r"(\d+)([ymwdh])")


class Backup(Protocol):
    """What a policy needs to know about a backup (``kyrorepo.snapshot.Snapshot`` fits)."""

    @property
    def id(self) -> str: ...

    @property
    def time(self) -> int: ...

    @property
    def tags(self) -> tuple[str, ...]: ...

    @property
    def source(self) -> str: ...

    @property
    def host(self) -> str: ...


B = TypeVar("B", bound=Backup)


# --- durations --------------------------------------------------------------------------


@dataclass(frozen=True)
class Duration:
    """A calendar duration as restic writes it: ``1y2m3d4h`` (``w`` adds 7 days)."""

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    def __str__(self) -> str:
        parts = [(self.years, "y"), (self.months, "m"), (self.days, "d"), (self.hours, "h")]
        text = "".join(f"{n}{u}" for n, u in parts if n)
        return text or "0h"

    def is_zero(self) -> bool:
        return not (self.years or self.months or self.days or self.hours)

    def before(self, ts: int) -> int:
        """The Unix time this duration before ``ts`` (UTC calendar; month ends clamp)."""
        t = _dt.datetime.fromtimestamp(ts, _dt.timezone.utc)
        month_index = t.year * 12 + (t.month - 1) - self.years * 12 - self.months
        year, month = divmod(month_index, 12)
        year = max(year, _dt.MINYEAR)
        day = min(t.day, calendar.monthrange(year, month + 1)[1])
        shifted = t.replace(year=year, month=month + 1, day=day)
        return int(shifted.timestamp()) - self.days * DAY - self.hours * HOUR


def parse_duration(text: str) -> Duration:
    """Parse ``1y2m3d4h`` / ``2w`` (y years, m months, w weeks, d days, h hours)."""
    t = text.strip().lower()
    pos = 0
    found: dict[str, int] = {}
    for m in _DURATION.finditer(t):
        if m.start() != pos or m.group(2) in found:
            break
        found[m.group(2)] = int(m.group(1))
        pos = m.end()
    if not t or pos != len(t):
        raise UsageError(f"duration {text!r} is not understood: use numbers with units y, m, w, d, h, e.g. 30d or 1y6m")
    d = Duration(found.get("y", 0), found.get("m", 0), found.get("d", 0) + 7 * found.get("w", 0), found.get("h", 0))
    if d.is_zero():
        raise UsageError(f"duration {text!r} is zero: give a positive duration, e.g. 7d")
    return d


# --- buckets ----------------------------------------------------------------------------


def _utc(ts: int) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc)


def _hourly(ts: int) -> int:
    return ts // HOUR


def _daily(ts: int) -> int:
    return ts // DAY


def _weekly(ts: int) -> int:
    year, week, _ = _utc(ts).isocalendar()
    return year * 100 + week


def _monthly(ts: int) -> int:
    t = _utc(ts)
    return t.year * 100 + t.month


def _yearly(ts: int) -> int:
    return _utc(ts).year


BUCKETS: dict[str, Callable[[int], int]] = {
    "hourly": _hourly, "daily": _daily, "weekly": _weekly, "monthly": _monthly, "yearly": _yearly,
}


# --- policy -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """Keep rules. Counts of 0 and durations of None are rules not given."""

    counts: dict[str, int] = field(default_factory=dict)  # BUCKET_KINDS -> N (or UNLIMITED)
    within: Duration | None = None
    within_buckets: dict[str, Duration] = field(default_factory=dict)  # WITHIN_KINDS -> D
    tags: tuple[frozenset[str], ...] = ()
    min_age: int = 0  # seconds; protection, not a keep rule

    def __post_init__(self) -> None:
        for kind, n in self.counts.items():
            if kind not in BUCKET_KINDS:
                raise UsageError(f"unknown keep rule {kind!r}: use one of {', '.join(BUCKET_KINDS)}")
            if n < UNLIMITED:
                raise UsageError(f"--keep-{kind} {n} is negative: give a count, or 'unlimited'")
        for kind in self.within_buckets:
            if kind not in WITHIN_KINDS:
                raise UsageError(f"unknown keep rule within-{kind}: use one of {', '.join(WITHIN_KINDS)}")
        if self.min_age < 0:
            raise UsageError("--min-age-days is negative: give a number of days")

    def has_rules(self) -> bool:
        return (any(n != 0 for n in self.counts.values()) or self.within is not None
                or bool(self.within_buckets) or bool(self.tags))

    def describe(self) -> list[str]:
        out = [f"keep-{k} {'unlimited' if n == UNLIMITED else n}" for k, n in self.counts.items() if n]
        if self.within is not None:
            out.append(f"keep-within {self.within}")
        out += [f"keep-within-{k} {d}" for k, d in self.within_buckets.items()]
        out += [f"keep-tag {','.join(sorted(t))}" for t in self.tags]
        if self.min_age:
            out.append(f"min-age {self.min_age // DAY}d")
        return out


@dataclass(frozen=True)
class Decision(Generic[B]):
    backup: B
    keep: bool
    reasons: tuple[str, ...]  # the rules that keep it; empty when removed


def newest_first(backups: Iterable[B]) -> list[B]:
    return sorted(backups, key=lambda b: (b.time, b.id), reverse=True)


def apply_policy(backups: Sequence[B], policy: Policy, now: int) -> list[Decision[B]]:
    """Decide every backup of one group; result newest first."""
    if not policy.has_rules():
        raise UsageError("no keep rule given: refusing to remove every backup; pass --keep-last, --keep-daily, "
                         "--keep-within, --older-than-days or another keep rule")
    ordered = newest_first(backups)
    if not ordered:
        return []
    newest = ordered[0].time
    left = {k: n for k, n in policy.counts.items() if n}
    last_bucket: dict[str, int | None] = {k: None for k in left}
    last_within: dict[str, int | None] = {k: None for k in policy.within_buckets}
    cut_within = None if policy.within is None else policy.within.before(newest)
    cuts = {k: d.before(newest) for k, d in policy.within_buckets.items()}
    out: list[Decision[B]] = []
    for nr, b in enumerate(ordered):
        reasons: list[str] = []
        for kind in BUCKET_KINDS:
            if left.get(kind, 0) == 0:
                continue
            val = nr if kind == "last" else BUCKETS[kind](b.time)
            if val != last_bucket[kind]:
                last_bucket[kind] = val
                if left[kind] > 0:
                    left[kind] -= 1
                reasons.append(kind)
        if cut_within is not None and b.time >= cut_within:
            reasons.append(f"within {policy.within}")
        for kind, cut in cuts.items():
            if b.time >= cut:
                val = BUCKETS[kind](b.time)
                if val != last_within[kind]:
                    last_within[kind] = val
                    reasons.append(f"{kind} within {policy.within_buckets[kind]}")
        have = set(b.tags)
        reasons += [f"tag {','.join(sorted(t))}" for t in policy.tags if t <= have]
        if policy.min_age and b.time > now - policy.min_age:
            reasons.append(f"min-age {policy.min_age // DAY}d")
        out.append(Decision(b, bool(reasons), tuple(reasons)))
    return out


def group_key(b: Backup, group_by: str) -> str:
    if group_by == "source":
        return b.source
    if group_by == "host":
        return b.host
    if group_by == "none":
        return ""
    raise UsageError(f"--group-by {group_by!r} is not understood: use one of {', '.join(GROUP_BY)}")


def group_backups(backups: Iterable[B], group_by: str) -> dict[str, list[B]]:
    """Backups by group key, keys sorted, each group newest first."""
    groups: dict[str, list[B]] = {}
    for b in backups:
        groups.setdefault(group_key(b, group_by), []).append(b)
    return {k: newest_first(groups[k]) for k in sorted(groups)}


def apply_grouped(backups: Iterable[B], policy: Policy, group_by: str, now: int) -> dict[str, list[Decision[B]]]:
    return {key: apply_policy(group, policy, now) for key, group in group_backups(backups, group_by).items()}


@dataclass
class ForgetPlan(Generic[B]):
    """The decisions for every group considered by forget/prune."""

    groups: dict[str, list[Decision[B]]]

    @property
    def remove(self) -> list[B]:
        return [d.backup for ds in self.groups.values() for d in ds if not d.keep]


def plan_forget(backups: Iterable[B], policy: Policy, group_by: str, source: str | None, now: int) -> ForgetPlan[B]:
    """Decide every backup (of ``source`` only, when given) by ``policy``."""
    chosen = [b for b in backups if source is None or b.source == source]
    return ForgetPlan(apply_grouped(chosen, policy, group_by, now))


def parse_count(text: str, flag: str) -> int:
    """A keep count: a non-negative integer or ``unlimited``."""
    t = text.strip().lower()
    if t in ("unlimited", "all", "-1"):
        return UNLIMITED
    if not t.isdigit():
        raise UsageError(f"{flag} {text!r} is not a count: give a whole number, or 'unlimited'")
    return int(t)


def parse_tags(values: Iterable[str]) -> tuple[frozenset[str], ...]:
    out = []
    for v in values:
        tags = frozenset(t.strip() for t in v.split(",") if t.strip())
        if not tags:
            raise UsageError(f"--keep-tag {v!r} names no tag")
        out.append(tags)
    return tuple(out)
