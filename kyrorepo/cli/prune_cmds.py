"""forget and prune: retention policies, and garbage collection."""

from __future__ import annotations

import time
from typing import Any, Callable

import click

from kyrorepo.cli.common import RepoOptions, emit_json, human_bytes, json_option, repo_options, warn
from kyrorepo.cli.repo_cmds import parse_size
from kyrorepo.errors import UsageError
from kyrorepo.prune import DEFAULT_MAX_UNUSED_PCT, GcOptions, GcResult, PruneResult, prune
from kyrorepo.retention import (
    BUCKET_KINDS,
    DAY,
    GROUP_BY,
    WITHIN_KINDS,
    Decision,
    Duration,
    Policy,
    parse_count,
    parse_duration,
    parse_tags,
)
from kyrorepo.snapshot import Snapshot
from kyrorepo.timefmt import iso_time

# Seed (kyrodb_backup) forms: flag -> (within rule it stands for, Duration from its number)
SEED_FORMS: dict[str, tuple[str, Callable[[int], Duration]]] = {
    "older_than_days": ("within", lambda n: Duration(days=n)),
    "hourly_hours": ("hourly", lambda n: Duration(hours=n)),
    "daily_days": ("daily", lambda n: Duration(days=n)),
    "weekly_weeks": ("weekly", lambda n: Duration(days=7 * n)),
    "monthly_months": ("monthly", lambda n: Duration(months=n)),
}


def policy_options(func: Callable[..., Any]) -> Callable[..., Any]:
    opts = [click.option(f"--keep-{k}", f"keep_{k}", metavar="N",
                         help=f"Keep the newest backup of each of the last N {_unit(k)} that have backups "
                         "(N or 'unlimited')." if k != "last" else "Keep the N newest backups.") for k in BUCKET_KINDS]
    opts.append(click.option("--keep-within", metavar="DURATION",
                             help="Keep backups at most DURATION older than the group's newest (e.g. 30d, 1y6m)."))
    opts += [click.option(f"--keep-within-{k}", f"keep_within_{k}", metavar="DURATION",
                          help=f"Keep the newest backup of each {_unit(k)[:-1]} within DURATION of the group's newest.")
             for k in WITHIN_KINDS]
    opts += [
        click.option("--keep-tag", "keep_tags", multiple=True, metavar="TAG[,TAG]",
                     help="Keep backups carrying all these tags (repeatable)."),
        click.option("--older-than-days", type=click.IntRange(min=1), metavar="N",
                     help="Seed form of --keep-within Nd: remove backups more than N days older than the newest."),
    ]
    opts += [click.option(f"--{flag.replace('_', '-')}", type=click.IntRange(min=1), metavar=meta,
                          help=f"Seed form of --keep-within-{rule} {meta}{unit}.")
             for flag, meta, rule, unit in (("hourly_hours", "H", "hourly", "h"), ("daily_days", "D", "daily", "d"),
                                            ("weekly_weeks", "W", "weekly", "w"),
                                            ("monthly_months", "M", "monthly", "m"))]
    opts += [
        click.option("--min-age-days", type=click.IntRange(min=0), default=0, metavar="N",
                     help="Never remove a backup younger than N days (from now), whatever the rules say."),
        click.option("--group-by", type=click.Choice(GROUP_BY), default="source", show_default=True,
                     help="Apply the rules to each group of backups separately."),
        click.option("--source", help="Only consider backups of this source; leave the others alone."),
        click.option("--dry-run", is_flag=True,
                     help="Print what would be removed and why the rest is kept; change nothing."),
        click.option("--retry-lock", type=click.IntRange(min=0), default=0, metavar="SECONDS",
                     help="Wait up to SECONDS for other processes (running backups) to release the repository."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def _unit(kind: str) -> str:
    return {"hourly": "hours", "daily": "days", "weekly": "weeks", "monthly": "months", "yearly": "years"}.get(kind, "")


def build_policy(kw: dict[str, Any]) -> Policy:
    """A Policy from the parsed options (popped from ``kw``)."""
    counts = {k: parse_count(v, f"--keep-{k}") for k in BUCKET_KINDS if (v := kw.pop(f"keep_{k}")) is not None}
    within_text = kw.pop("keep_within")
    within = parse_duration(within_text) if within_text else None
    buckets = {k: parse_duration(v) for k in WITHIN_KINDS if (v := kw.pop(f"keep_within_{k}")) is not None}
    for flag, (rule, make) in SEED_FORMS.items():
        n = kw.pop(flag)
        if n is None:
            continue
        long_flag = "--" + flag.replace("_", "-")
        if (rule == "within" and within is not None) or rule in buckets:
            other = "--keep-within" + ("" if rule == "within" else f"-{rule}")
            raise UsageError(f"{long_flag} and {other} are the same rule: give only one of them")
        if rule == "within":
            within = make(n)
        else:
            buckets[rule] = make(n)
    return Policy(counts=counts, within=within, within_buckets=buckets, tags=parse_tags(kw.pop("keep_tags")),
                  min_age=kw.pop("min_age_days") * DAY)


def parse_max_unused(text: str) -> tuple[float | None, int | None]:
    t = text.strip().lower()
    if t == "unlimited":
        return None, None
    if t.endswith("%"):
        try:
            pct = float(t[:-1])
        except ValueError:
            pct = -1.0
        if not 0 <= pct <= 100:
            raise UsageError(f"--max-unused {text!r} is not a percentage from 0% to 100%")
        return (pct, None) if pct < 100 else (None, None)
    return None, parse_size(t)


def _decision_json(d: Decision[Snapshot]) -> dict[str, Any]:
    s = d.backup
    return {"id": s.id, "short_id": s.short_id, "time": iso_time(s.time), "timestamp": s.time, "source": s.source,
            "host": s.host, "tags": list(s.tags), "reasons": list(d.reasons)}


def _gc_json(r: GcResult, dry_run: bool) -> dict[str, Any]:
    p = r.plan
    out = {"packs": p.packs, "used_blobs": p.used_blobs, "used_bytes": p.used_bytes, "unused_bytes": p.unused_bytes,
           "packs_to_delete": len(p.delete) + len(p.unindexed_delete), "packs_to_repack": len(p.repack),
           "unindexed_packs_waiting": p.unindexed_waiting, "estimated_freed_bytes": p.freed_estimate(),
           "warnings": r.warnings}
    if not dry_run:
        out.update({"packs_written": r.packs_written, "blobs_moved": r.blobs_moved, "packs_removed": r.packs_removed,
                    "bytes_removed": r.bytes_removed, "bytes_written": r.bytes_written,
                    "freed_bytes": r.bytes_removed - r.bytes_written, "segments_written": r.segments_written,
                    "segments_removed": r.segments_removed})
    return out


def report(result: PruneResult, policy: Policy | None, dry_run: bool, as_json: bool) -> None:
    fplan = result.forget
    if as_json:
        emit_json({
            "dry_run": dry_run,
            "policy": policy.describe() if policy else [],
            "groups": [{"group": key, "keep": [_decision_json(d) for d in ds if d.keep],
                        "remove": [_decision_json(d) for d in ds if not d.keep]}
                       for key, ds in (fplan.groups.items() if fplan else [])],
            "removed": [s.id for s in result.removed],
            "wal_captures_dropped": result.captures_dropped,
            "gc": _gc_json(result.gc, dry_run) if result.gc else None,
        })
        return
    pre = "DRY-RUN: " if dry_run else ""
    if fplan is not None and policy is not None:
        click.echo(f"Policy: {', '.join(policy.describe())}")
        for key, ds in fplan.groups.items():
            kept = sum(d.keep for d in ds)
            click.echo(f"{key or 'all backups'}: {len(ds)} backup(s), keep {kept}, remove {len(ds) - kept}")
            for d in ds:
                s = d.backup
                action = "keep  " if d.keep else "remove"
                click.echo(f"  {action} {s.short_id}  {iso_time(s.time)}  {', '.join(d.reasons)}".rstrip())
        click.echo(f"{pre}{'would remove' if dry_run else 'removed'} {len(result.removed)} backup(s)")
    gc = result.gc
    if gc is None:
        if not dry_run and result.removed:
            click.echo("Run 'kyrorepo prune' to free the space they used.")
        return
    for w in gc.warnings:
        warn(w)
    if result.captures_dropped:
        click.echo(f"{pre}{'would drop' if dry_run else 'dropped'} {len(result.captures_dropped)} WAL capture(s) "
                   "that no kept backup needs")
    p = gc.plan
    if dry_run:
        click.echo(f"DRY-RUN: {p.packs} pack(s), {human_bytes(p.used_bytes)} used, "
                   f"{human_bytes(p.unused_bytes)} unused in partly used packs")
        click.echo(f"DRY-RUN: would delete {len(p.delete) + len(p.unindexed_delete)} pack(s) and repack "
                   f"{len(p.repack)}; about {human_bytes(p.freed_estimate())} would be freed")
    elif not (gc.packs_removed or gc.packs_written or gc.segments_written):
        click.echo("No garbage to collect")
    else:
        click.echo(f"Removed {gc.packs_removed} pack(s), repacked {len(p.repack)} into {gc.packs_written} "
                   f"({gc.blobs_moved} blobs moved); index: {gc.segments_written} segment(s) written, "
                   f"{gc.segments_removed} removed")
        click.echo(f"Freed {human_bytes(gc.bytes_removed - gc.bytes_written)}")
    if p.unindexed_waiting:
        click.echo(f"{p.unindexed_waiting} unindexed pack(s) kept for the grace period (a running or killed "
                   "backup's); a later prune removes them")


def _run(ropts: RepoOptions, kw: dict[str, Any], gc: GcOptions | None, gc_only: bool, as_json: bool,
         keep_wal_within: Duration | None = None) -> None:
    dry_run = kw.pop("dry_run")
    group_by = kw.pop("group_by")
    source = kw.pop("source")
    retry_lock = kw.pop("retry_lock")
    policy = build_policy(kw)
    if gc_only:
        if policy.has_rules():
            raise UsageError("--gc-only removes no backup: drop the keep rules, or drop --gc-only")
        active = None
    elif not policy.has_rules():
        hint = ", or --gc-only to only collect garbage" if gc is not None else ""
        raise UsageError("no keep rule given: refusing to remove every backup; pass --keep-last, --keep-daily, "
                         f"--keep-within, --older-than-days or another keep rule{hint}")
    else:
        active = policy
    repo = ropts.open()
    try:
        result = prune(repo, active, group_by, source, gc, dry_run, int(time.time()), retry_lock, keep_wal_within)
    finally:
        repo.close()
    report(result, active, dry_run, as_json)


@click.command()
@repo_options
@policy_options
@json_option
def forget(ropts: RepoOptions, as_json: bool, **kw: Any) -> None:
    """Remove the backups that no keep rule keeps (the data goes at the next 'prune').

    DURATION: numbers with units y (years), m (months), w (weeks), d (days), h (hours),
    e.g. 1y6m or 36h, measured back from the newest backup of each group.
    """
    _run(ropts, kw, None, False, as_json)


@click.command()
@repo_options
@policy_options
@click.option("--gc-only", is_flag=True, help="Apply no keep rules, remove no backup: only collect garbage.")
@click.option("--max-unused", default=f"{DEFAULT_MAX_UNUSED_PCT:g}%", show_default=True, metavar="LIMIT",
              help="Repack partly used packs until the unused space is at most LIMIT: N% of the used data, "
                   "a SIZE, or 'unlimited'.")
@click.option("--max-repack-size", metavar="SIZE", help="Read at most SIZE of packs for repacking.")
@click.option("--unindexed-grace", default="24h", show_default=True, metavar="DURATION",
              help="Remove packs that no index lists only once first seen this long ago ('0' for now).")
@click.option("--keep-wal-within", metavar="DURATION",
              help="Keep WAL captures (point-in-time recovery) only this far back from now; default: from the "
                   "oldest kept backup on.")
@json_option
def prune_cmd(ropts: RepoOptions, gc_only: bool, max_unused: str, max_repack_size: str | None,
              unindexed_grace: str, keep_wal_within: str | None, as_json: bool, **kw: Any) -> None:
    """Remove the backups no keep rule keeps, then free the space of data no backup uses.

    DURATION: numbers with units y (years), m (months), w (weeks), d (days), h (hours),
    e.g. 1y6m or 36h, measured back from the newest backup of each group.
    """
    pct, limit = parse_max_unused(max_unused)
    grace = 0 if unindexed_grace.strip() == "0" else _seconds(parse_duration(unindexed_grace))
    gc = GcOptions(max_unused_pct=pct, max_unused_bytes=limit,
                   max_repack_size=parse_size(max_repack_size) if max_repack_size else None,
                   unindexed_grace=grace)
    _run(ropts, kw, gc, gc_only, as_json, parse_duration(keep_wal_within) if keep_wal_within else None)


def _seconds(d: Duration) -> int:
    now = int(time.time())
    return now - d.before(now)


def register(group: click.Group) -> None:
    group.add_command(forget)
    group.add_command(prune_cmd, "prune")

