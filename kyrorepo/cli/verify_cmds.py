"""verify, and the repair group (repair index, repair snapshots)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from kyrorepo.cli.common import RepoOptions, emit_json, human_bytes, json_option, opened_with_workers, repo_options, warn
from kyrorepo.cli.progress import byte_progress
from kyrorepo.errors import IntegrityError, UsageError
from kyrorepo.verify_options import DEFAULT_WORKERS, VerifyOptions, parse_subset

if TYPE_CHECKING:
    from kyrorepo.repair import IndexRepair, SnapshotRepair
    from kyrorepo.verify_report import Damage, VerifyReport

SHOW_FILES = 5
SHOW_LOST = 20
# Imported while the key is derived (RepoOptions.open), then by the command that uses them.
VERIFY_MODULES = ("kyrorepo.verify",)
REPAIR_MODULES = ("kyrorepo.repair",)

workers_option = click.option("--workers", type=int, default=DEFAULT_WORKERS, show_default=True,
                              help="Packs read and checked in parallel.")


def human_age(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def damage_json(d: Damage) -> dict[str, Any]:
    return {"object": d.object, "reason": d.reason, "message": d.message, "blobs": d.blobs,
            "backups": sorted(d.backups), "files": [{"backup": b, "path": p} for b, p in d.files],
            "files_total": max(d.files_total, len(d.files)), "fixed_by": "repair index" if d.index_level else None}


def report_json(r: VerifyReport) -> dict[str, Any]:
    cov = r.coverage
    return {
        "ok": r.ok, "repository": r.repo_id, "mode": r.mode, "keys": r.keys, "index_segments": r.index_segments,
        "packs": r.packs, "pack_bytes": r.pack_bytes, "unindexed_packs": r.unindexed_packs,
        "backups_checked": r.backups, "packs_checked": r.packs_checked, "packs_resumed": r.packs_resumed,
        "blobs_checked": r.blobs_checked, "bytes_checked": r.bytes_checked,
        "damaged": [damage_json(d) for d in r.damage],
        "affected_backups": r.affected_backups(),
        "affected_files": [{"backup": b, "path": p} for b, p in r.affected_files()],
        "coverage": None if cov is None else {
            "packs_total": cov.packs_total, "packs_covered": cov.packs_covered, "percent": round(cov.percent, 2),
            "bytes_total": cov.bytes_total, "bytes_covered": cov.bytes_covered,
            "oldest_unchecked_pack": cov.oldest_unchecked_pack,
            "oldest_unchecked_age_seconds": cov.oldest_unchecked_age},
        "restore_tests": [{"backup": t.backup_id, "files": t.files, "bytes": t.bytes, "ok": t.ok, "error": t.error}
                          for t in r.restore_tests],
        "notices": r.notices, "duration_seconds": round(r.duration, 3),
    }


def print_damage(d: Damage) -> None:
    click.echo(f"DAMAGED {d.message}")
    for backup in sorted(d.backups):
        paths = [p for b, p in d.files if b == backup]
        more = f" and {len(paths) - SHOW_FILES} more" if len(paths) > SHOW_FILES else ""
        click.echo(f"  backup {backup[:8]}: " + (", ".join(paths[:SHOW_FILES]) + more if paths else "the whole backup"))


def print_report(r: VerifyReport) -> None:
    click.echo(f"repository {r.repo_id[:8]}: {r.keys} key(s), {r.index_segments} index segment(s), {r.packs} pack(s) "
               f"({human_bytes(r.pack_bytes)}), {r.backups} backup(s) checked")
    if r.mode != "structure":
        resumed = f"; {r.packs_resumed} pack(s) read before the interruption" if r.packs_resumed else ""
        click.echo(f"data: {r.packs_checked} pack(s), {r.blobs_checked} blob(s), {human_bytes(r.bytes_checked)} "
                   f"read and checked{resumed}")
    cov = r.coverage
    if cov is not None and cov.packs_total:
        oldest = (f"; longest unread: {cov.oldest_unchecked_pack} ({human_age(cov.oldest_unchecked_age or 0)})"
                  if cov.oldest_unchecked_pack else "; every pack was read in this run")
        click.echo(f"coverage: {cov.percent:.1f}% of {cov.packs_total} pack(s) ({human_bytes(cov.bytes_covered)} of "
                   f"{human_bytes(cov.bytes_total)}) read at least once{oldest}")
    for t in r.restore_tests:
        state = "ok" if t.ok else f"FAILED: {t.error}"
        click.echo(f"restore test of backup {t.backup_id[:8]}: {t.files} file(s), {human_bytes(t.bytes)}: {state}")
    for n in r.notices:
        click.echo(f"note: {n}")
    for d in r.damage:
        print_damage(d)
    if r.ok:
        click.echo("no damage found")
    else:
        click.echo(f"{len(r.damage)} damaged object(s); affected backups: "
                   f"{', '.join(b[:8] for b in r.affected_backups()) or 'none'}; affected files: {len(r.affected_files())}")


@click.command()
@repo_options
@click.option("--backup-id", "backup_ids", multiple=True,
              help="Check only this backup (id, prefix or 'latest' of each source; repeatable).")
@click.option("--source", help="Resolve 'latest' within this source.")
@click.option("--full-scan", is_flag=True, help="Read every pack the checked backups need and re-hash every blob.")
@click.option("--read-data-subset", "subset", metavar="N%|N/M",
              help="Read N% of the packs (least recently checked first) or group N of M.")
@click.option("--resume", is_flag=True, help="Continue an interrupted --full-scan where it stopped.")
@click.option("--restore-test", is_flag=True, help="Restore into a temporary directory and check every file.")
@click.option("--restore-dir", type=click.Path(file_okay=False, exists=True),
              help="Where the restore test's temporary directory goes (default: the system temp dir).")
@workers_option
@json_option
def verify(ropts: RepoOptions, backup_ids: tuple[str, ...], source: str | None, full_scan: bool, subset: str | None,
           resume: bool, restore_test: bool, restore_dir: str | None, workers: int, as_json: bool) -> None:
    """Check the repository's integrity. Exit 0: nothing is wrong; 13: damage found."""
    opts = VerifyOptions(backup_ids=backup_ids, source=source, full_scan=full_scan,
                         subset=parse_subset(subset) if subset else None, resume=resume, restore_test=restore_test,
                         restore_dir=restore_dir, workers=workers).validate()
    from kyrorepo.procpool import SCAN_TASKS

    with opened_with_workers(ropts, workers if opts.reads_data else None, SCAN_TASKS,
                             VERIFY_MODULES) as repo, repo.lock():
        from kyrorepo.verify import run_verify

        with byte_progress("verify", None) as progress:
            opts.progress = progress
            report = run_verify(repo, opts)
    if as_json:
        emit_json(report_json(report))
    else:
        print_report(report)
    if not report.ok:
        raise report.error()


@click.group()
def repair() -> None:
    """Repair a damaged repository: 'repair index', then 'repair snapshots'."""


@repair.command("index")
@repo_options
@workers_option
@json_option
def repair_index_cmd(ropts: RepoOptions, workers: int, as_json: bool) -> None:
    """Rebuild the index segments and the local cache from the pack trailers (and store again a
    compression dictionary object that is missing or damaged, from its intact copy)."""
    repo = ropts.open(preload=REPAIR_MODULES)
    try:
        from kyrorepo.repair import repair_index

        with repo.lock(exclusive=True):
            res = repair_index(repo, workers)
    finally:
        repo.close()
    print_index_repair(res, as_json)
    if res.unreadable:
        raise IntegrityError(f"{len(res.unreadable)} pack(s) could not be indexed (first: {res.unreadable[0]}): "
                             "their trailers are damaged and no index segment lists them; restore them from a copy")
    if res.dicts_lost:
        raise IntegrityError(f"{len(res.dicts_lost)} compression dictionar{'y' if len(res.dicts_lost) == 1 else 'ies'} "
                             f"(first: {res.dicts_lost[0]}) cannot be opened from either copy: the chunks compressed "
                             "with it cannot be opened; restore it from a copy of the repository")


def print_index_repair(res: IndexRepair, as_json: bool) -> None:
    if as_json:
        emit_json({"packs": res.packs, "blobs": res.blobs, "segments_written": res.written,
                   "segments_removed": res.removed, "carried_over": res.carried, "unreadable": res.unreadable,
                   "dictionaries_stored": res.dicts_stored, "dictionaries_lost": res.dicts_lost})
        return
    for path in res.dicts_stored:
        click.echo(f"dictionary {path}: stored again from its intact copy")
    for name in res.carried:
        warn(f"pack {name}: trailer unreadable, kept its listing from the old index")
    for name in res.unreadable:
        warn(f"pack {name}: trailer unreadable and no index segment lists it: not indexed")
    click.echo(f"indexed {res.packs} pack(s), {res.blobs} blob(s) in {len(res.written)} new index segment(s); "
               f"removed {res.removed} old segment(s); local cache rebuilt")


@repair.command("snapshots")
@repo_options
@click.option("--backup-id", "backup_ids", multiple=True, help="Repair only this backup (repeatable).")
@click.option("--dry-run", is_flag=True, help="Show what would be dropped; change nothing.")
@click.option("--yes", is_flag=True, help="Rewrite the damaged backups.")
@click.option("--structure-only", is_flag=True,
              help="Do not read pack data: repair only damage the structure check finds.")
@workers_option
@json_option
def repair_snapshots_cmd(ropts: RepoOptions, backup_ids: tuple[str, ...], dry_run: bool, yes: bool,
                         structure_only: bool, workers: int, as_json: bool) -> None:
    """Rewrite backups whose data is damaged, keeping everything undamaged restorable."""
    if dry_run == yes:
        raise UsageError("repair snapshots rewrites backups and drops damaged files: pass --dry-run to see the "
                         "plan, then --yes to carry it out" if not yes else "pass either --dry-run or --yes, not both")
    opts = VerifyOptions(backup_ids=backup_ids, full_scan=not structure_only, workers=workers).validate()
    repo = ropts.open(preload=REPAIR_MODULES)
    try:
        from kyrorepo.repair import repair_snapshots

        with repo.lock(exclusive=True):
            res = repair_snapshots(repo, opts, apply=yes)
    finally:
        repo.close()
    print_snapshot_repair(res, as_json)


def print_snapshot_repair(res: SnapshotRepair, as_json: bool) -> None:
    if as_json:
        emit_json({"dry_run": not res.applied, "backups": [
            {"old_id": f.old_id, "new_id": f.new_id or None, "source": f.source, "files_lost": f.files_lost,
             "bytes_lost": f.bytes_lost, "lost": f.lost} for f in res.fixes],
            "index_segments": res.segments, "not_repaired": res.not_repaired,
            "damaged": [damage_json(d) for d in res.report.damage]})
        return
    verb = "rewrote" if res.applied else "DRY-RUN: would rewrite"
    for f in res.fixes:
        target = f" as {f.new_id[:8]}" if f.new_id else ""
        click.echo(f"{verb} backup {f.old_id[:8]}{target} ({f.source}), dropping {f.files_lost} damaged "
                   f"entr{'y' if f.files_lost == 1 else 'ies'} ({human_bytes(f.bytes_lost)}):")
        for line in f.lost[:SHOW_LOST]:
            click.echo(f"  - {line}")
        if len(f.lost) > SHOW_LOST:
            click.echo(f"  ... and {len(f.lost) - SHOW_LOST} more")
    if res.segments:
        verb_i = "dropped damaged blobs from" if res.applied else "DRY-RUN: would drop damaged blobs from"
        click.echo(f"{verb_i} {len(res.segments)} index segment(s)")
    for msg in res.not_repaired:
        warn(f"not repaired by 'repair snapshots': {msg}")
    if not res.fixes:
        click.echo("no backup depends on damaged data")
    elif not res.applied:
        click.echo("run again with --yes to carry this out")


def register(group: click.Group) -> None:
    group.add_command(verify)
    group.add_command(repair)
