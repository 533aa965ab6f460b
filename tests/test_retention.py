"""Retention policies (kyrorepo.retention): rules one by one, and properties under hypothesis."""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kyrorepo.errors import UsageError
from kyrorepo.retention import (
    DAY,
    HOUR,
    UNLIMITED,
    Duration,
    Policy,
    apply_grouped,
    apply_policy,
    group_backups,
    parse_count,
    parse_duration,
    parse_tags,
)


@dataclass(frozen=True)
class B:
    id: str
    time: int
    tags: tuple[str, ...] = ()
    source: str = "src"
    host: str = "host"


def ts(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=dt.timezone.utc).timestamp())


def kept(policy: Policy, backups: list[B], now: int = 0) -> set[str]:
    return {d.backup.id for d in apply_policy(backups, policy, now) if d.keep}


# A fixed history; b7 is the newest. 2024-12-30 (Monday) starts ISO week 2025-W01.
HISTORY = [
    B("b0", ts("2023-06-15T12:00:00"), ("old",)),
    B("b1", ts("2024-11-20T08:00:00")),
    B("b2", ts("2024-12-30T10:00:00")),
    B("b3", ts("2025-01-01T09:00:00")),
    B("b4", ts("2025-01-05T23:00:00")),
    B("b5", ts("2025-01-06T01:00:00")),
    B("b6", ts("2025-01-06T01:30:00")),
    B("b7", ts("2025-01-06T05:00:00"), ("prod", "db")),
]


# --- durations -----------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("1y2m3d4h", Duration(1, 2, 3, 4)),
    ("30d", Duration(days=30)),
    ("2w", Duration(days=14)),
    ("1w2d", Duration(days=9)),
    ("36h", Duration(hours=36)),
    ("6M", Duration(months=6)),
])
def test_parse_duration(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "5", "d", "1x", "0d", "1d1d", "1d 2h", "-1d"])
def test_parse_duration_rejects(text):
    with pytest.raises(UsageError):
        parse_duration(text)


def test_duration_before_is_calendar_arithmetic():
    assert Duration(months=1).before(ts("2025-03-31T10:00:00")) == ts("2025-02-28T10:00:00")
    assert Duration(years=1).before(ts("2024-02-29T00:00:00")) == ts("2023-02-28T00:00:00")
    assert Duration(days=1, hours=2).before(ts("2025-01-02T01:00:00")) == ts("2024-12-31T23:00:00")
    assert str(Duration(1, 0, 3, 0)) == "1y3d"


def test_parse_count_and_tags():
    assert parse_count("7", "--keep-last") == 7
    assert parse_count("unlimited", "--keep-daily") == UNLIMITED
    with pytest.raises(UsageError):
        parse_count("seven", "--keep-last")
    assert parse_tags(["a,b", "c"]) == (frozenset({"a", "b"}), frozenset({"c"}))
    with pytest.raises(UsageError):
        parse_tags([","])


# --- each rule ---------------------------------------------------------------------------


@pytest.mark.parametrize("policy, expected", [
    (Policy(counts={"last": 2}), {"b7", "b6"}),
    (Policy(counts={"hourly": 2}), {"b7", "b6"}),
    (Policy(counts={"daily": 2}), {"b7", "b4"}),
    (Policy(counts={"weekly": 2}), {"b7", "b4"}),
    (Policy(counts={"monthly": 2}), {"b7", "b2"}),
    (Policy(counts={"yearly": 2}), {"b7", "b2"}),
    (Policy(counts={"yearly": UNLIMITED}), {"b7", "b2", "b0"}),
    (Policy(counts={"daily": UNLIMITED}), {"b7", "b4", "b3", "b2", "b1", "b0"}),
    (Policy(within=Duration(days=1)), {"b7", "b6", "b5", "b4"}),
    (Policy(within_buckets={"hourly": Duration(days=1)}), {"b7", "b6", "b4"}),
    (Policy(within_buckets={"daily": Duration(days=7)}), {"b7", "b4", "b3", "b2"}),
    (Policy(within_buckets={"weekly": Duration(days=14)}), {"b7", "b4"}),
    (Policy(within_buckets={"monthly": Duration(months=2)}), {"b7", "b2", "b1"}),
    (Policy(within_buckets={"yearly": Duration(years=2)}), {"b7", "b2", "b0"}),
    (Policy(tags=(frozenset({"old"}),)), {"b0"}),
    (Policy(tags=(frozenset({"prod", "db"}),)), {"b7"}),
    (Policy(tags=(frozenset({"prod", "other"}),)), set()),
    (Policy(counts={"last": 1}, tags=(frozenset({"old"}),)), {"b7", "b0"}),
])
def test_each_rule(policy, expected):
    shuffled = HISTORY[:]
    random.Random(1).shuffle(shuffled)
    assert kept(policy, shuffled) == expected


def test_reasons_name_every_rule_that_keeps():
    policy = Policy(counts={"last": 1, "daily": 2}, within=Duration(days=1), tags=(frozenset({"old"}),))
    by_id = {d.backup.id: d for d in apply_policy(HISTORY, policy, 0)}
    assert by_id["b7"].reasons == ("last", "daily", "within 1d")
    assert by_id["b4"].reasons == ("daily", "within 1d")
    assert by_id["b0"].reasons == ("tag old",)
    assert by_id["b1"].keep is False and by_id["b1"].reasons == ()
    assert [d.backup.id for d in apply_policy(HISTORY, policy, 0)] == [f"b{i}" for i in range(7, -1, -1)]


def test_min_age_protects_young_backups_whatever_the_rules():
    now = HISTORY[-1].time + HOUR
    policy = Policy(counts={"last": 1}, min_age=2 * DAY)
    decisions = {d.backup.id: d for d in apply_policy(HISTORY, policy, now)}
    assert {i for i, d in decisions.items() if d.keep} == {"b7", "b6", "b5", "b4"}
    assert decisions["b5"].reasons == ("min-age 2d",)


def test_no_keep_rule_is_refused():
    for policy in (Policy(), Policy(min_age=DAY), Policy(counts={"last": 0, "daily": 0})):
        assert not policy.has_rules()
        with pytest.raises(UsageError, match="no keep rule"):
            apply_policy(HISTORY, policy, 0)


def test_bad_policies_are_usage_errors():
    with pytest.raises(UsageError):
        Policy(counts={"fortnightly": 1})
    with pytest.raises(UsageError):
        Policy(counts={"last": -5})
    with pytest.raises(UsageError):
        Policy(within_buckets={"last": Duration(days=1)})


def test_groups():
    backups = [B("a1", 10, source="a", host="h1"), B("a2", 20, source="a", host="h1"),
               B("b1", 15, source="b", host="h1"), B("c1", 5, source="c", host="h2")]
    assert {k: [b.id for b in v] for k, v in group_backups(backups, "source").items()} == \
        {"a": ["a2", "a1"], "b": ["b1"], "c": ["c1"]}
    assert list(group_backups(backups, "host")) == ["h1", "h2"]
    last1 = Policy(counts={"last": 1})
    by_source = apply_grouped(backups, last1, "source", 0)
    assert {d.backup.id for ds in by_source.values() for d in ds if d.keep} == {"a2", "b1", "c1"}
    by_none = apply_grouped(backups, last1, "none", 0)
    assert {d.backup.id for ds in by_none.values() for d in ds if d.keep} == {"a2"}
    with pytest.raises(UsageError):
        group_backups(backups, "planet")


def test_empty_group_is_fine():
    assert apply_policy([], Policy(counts={"last": 1}), 0) == []


# --- properties ----------------------------------------------------------------------------

T0 = ts("2020-01-01T00:00:00")
times = st.integers(min_value=T0, max_value=T0 + 3 * 365 * DAY)
histories = st.lists(st.tuples(times, st.sets(st.sampled_from("xyz"), max_size=2)), max_size=40).map(
    lambda items: [B(f"s{i:02d}", t, tuple(sorted(tags))) for i, (t, tags) in enumerate(items)])
counts = st.integers(min_value=0, max_value=6) | st.just(UNLIMITED)
durations = st.builds(Duration, st.integers(0, 1), st.integers(0, 3), st.integers(0, 20), st.integers(0, 30)).filter(
    lambda d: not d.is_zero())
policies = st.builds(
    Policy,
    counts=st.dictionaries(st.sampled_from(["last", "hourly", "daily", "weekly", "monthly", "yearly"]), counts),
    within=st.none() | durations,
    within_buckets=st.dictionaries(st.sampled_from(["hourly", "daily", "weekly", "monthly", "yearly"]), durations,
                                   max_size=2),
    tags=st.lists(st.frozensets(st.sampled_from("xyz"), min_size=1, max_size=2), max_size=2).map(tuple),
    min_age=st.sampled_from([0, DAY, 30 * DAY]),
).filter(lambda p: p.has_rules())
nows = st.integers(min_value=T0, max_value=T0 + 4 * 365 * DAY)


@settings(max_examples=150, deadline=None)
@given(histories, policies, nows, st.randoms(use_true_random=False))
def test_decides_every_backup_once_whatever_the_input_order(history, policy, now, rnd):
    decisions = apply_policy(history, policy, now)
    assert sorted(d.backup.id for d in decisions) == sorted(b.id for b in history)
    assert all(d.keep == bool(d.reasons) for d in decisions)
    times_out = [d.backup.time for d in decisions]
    assert times_out == sorted(times_out, reverse=True)
    shuffled = history[:]
    rnd.shuffle(shuffled)
    assert kept(policy, shuffled, now) == kept(policy, history, now)


@settings(max_examples=150, deadline=None)
@given(histories, policies, nows)
def test_newest_is_kept_by_any_time_rule_and_young_ones_always(history, policy, now):
    decisions = apply_policy(history, policy, now)
    time_rules = any(policy.counts.values()) or policy.within is not None or policy.within_buckets
    if history and time_rules:
        assert decisions[0].keep
    for d in decisions:
        if policy.min_age and d.backup.time > now - policy.min_age:
            assert d.keep


@settings(max_examples=150, deadline=None)
@given(histories, policies, st.sampled_from(["last", "hourly", "daily", "weekly", "monthly", "yearly"]),
       st.integers(1, 3))
def test_more_generous_rules_never_remove_more(history, policy, kind, extra):
    before = kept(policy, history)
    n = policy.counts.get(kind, 0)
    more = dict(policy.counts, **{kind: UNLIMITED if n == UNLIMITED else n + extra})
    assert before <= kept(Policy(counts=more, within=policy.within, within_buckets=policy.within_buckets,
                                 tags=policy.tags, min_age=policy.min_age), history)
    assert before <= kept(Policy(counts=policy.counts, within=Duration(days=1) if policy.within is None else
                                 Duration(policy.within.years + 1, policy.within.months, policy.within.days,
                                          policy.within.hours),
                                 within_buckets=policy.within_buckets, tags=policy.tags, min_age=policy.min_age),
                          history)


@settings(max_examples=150, deadline=None)
@given(histories, st.integers(1, 8))
def test_keep_last_keeps_exactly_the_newest(history, n):
    expected = {b.id for b in sorted(history, key=lambda b: (b.time, b.id), reverse=True)[:n]}
    assert kept(Policy(counts={"last": n}), history) == expected


@settings(max_examples=150, deadline=None)
@given(histories, st.integers(1, 8))
def test_keep_daily_keeps_the_newest_of_each_of_the_last_n_days(history, n):
    days = sorted({b.time // DAY for b in history}, reverse=True)[:n]
    expected = {max((b for b in history if b.time // DAY == day), key=lambda b: (b.time, b.id)).id for day in days}
    assert kept(Policy(counts={"daily": n}), history) == expected


@settings(max_examples=150, deadline=None)
@given(histories, durations)
def test_keep_within_keeps_exactly_the_window(history, d):
    if not history:
        return
    cut = d.before(max(b.time for b in history))
    assert kept(Policy(within=d), history) == {b.id for b in history if b.time >= cut}


@settings(max_examples=100, deadline=None)
@given(histories, st.sampled_from(["hourly", "daily", "weekly", "monthly", "yearly"]), durations)
def test_within_buckets_keep_one_per_bucket_inside_the_window(history, kind, d):
    if not history:
        return
    decisions = apply_policy(history, Policy(within_buckets={kind: d}), 0)
    cut = d.before(max(b.time for b in history))
    kept_ones = [x.backup for x in decisions if x.keep]
    assert all(b.time >= cut for b in kept_ones)
    inside = [b for b in history if b.time >= cut]
    bucket = {"hourly": HOUR, "daily": DAY}.get(kind)
    if bucket:
        assert len(kept_ones) == len({b.time // bucket for b in inside})
