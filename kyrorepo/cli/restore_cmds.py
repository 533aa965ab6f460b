"""restore."""

from __future__ import annotations

import os
import time

import click

from kyrorepo.cli.common import (
    RepoOptions,
    emit_json,
    human_bytes,
    json_option,
    metrics_file_option,
    opened_for_restore,
    repo_options,
)
from kyrorepo.cli.progress import byte_progress

DRY_LIST_MAX = 50
# Imported while the key is derived (RepoOptions.open), then by the command that uses them.
RESTORE_MODULES = ("kyrorepo.restore", "kyrorepo.snapshot", "kyrorepo.metrics")


def allow_clear_from_env() -> bool:
    return os.environ.get("BACKUP_ALLOW_CLEAR", "").strip().lower() in ("1", "true", "yes")


def print_plan(plan, snap_id: str, as_json: bool) -> None:  # type: ignore[no-untyped-def]
    if as_json:
        emit_json({"dry_run": True, "backup_id": snap_id, "target": plan.target, "would_delete": plan.existing,
                   "would_restore": plan.files, "refused": plan.refused})
        return
    if plan.existing:
        click.echo(f"DRY-RUN: Would delete {len(plan.existing)} file(s) from {plan.target}:")
        for name in plan.existing[:DRY_LIST_MAX]:
            click.echo(f"  - {name}")
        if len(plan.existing) > DRY_LIST_MAX:
            click.echo("  ...")
    click.echo(f"DRY-RUN: Would restore {len(plan.files)} file(s) from backup {snap_id[:8]}")
    for name in plan.files[:DRY_LIST_MAX]:
        click.echo(f"  + {name}")
    if len(plan.files) > DRY_LIST_MAX:
        click.echo("  ...")
    if plan.refused:
        click.echo("DRY-RUN: the target is not empty: the restore would be refused without --allow-clear "
                   "or BACKUP_ALLOW_CLEAR=true")


@click.command()
@repo_options
@click.option("--backup-id", required=True, help="Backup id, unique id prefix, or 'latest'.")
@click.option("--data-dir", "target", required=True, type=click.Path(file_okay=False), help="Restore into this directory.")
@click.option("--source", help="Resolve 'latest' within this source.")
@click.option("--allow-clear", is_flag=True, help="Replace the content of a non-empty data directory [$BACKUP_ALLOW_CLEAR].")
@click.option("--dry-run", is_flag=True, help="Print what would be deleted and restored; change nothing.")
@click.option("--include", "includes", multiple=True, metavar="GLOB", help="Restore only matching paths (repeatable).")
@metrics_file_option
@json_option
def restore(ropts: RepoOptions, backup_id: str, target: str, source: str | None, allow_clear: bool, dry_run: bool,
            includes: tuple[str, ...], metrics_file: str | None, as_json: bool) -> None:
    """Restore a backup into a data directory (staged, verified, then swapped in)."""
    with opened_for_restore(ropts, dry_run, RESTORE_MODULES) as repo, repo.lock():
        from kyrorepo.metrics import textfile_after_restore
        from kyrorepo.restore import RestoreOptions, plan_restore, run_restore
        from kyrorepo.snapshot import find_snapshot

        opts = RestoreOptions(target=target, allow_clear=allow_clear or allow_clear_from_env(), dry_run=dry_run,
                              includes=includes)
        snap = find_snapshot(repo, backup_id, source)
        repo.sync_index()
        if dry_run:
            print_plan(plan_restore(repo, snap, opts), snap.id, as_json)
            return
        with byte_progress("restore", snap.stats.get("logical_bytes") or None) as progress:
            opts.progress = progress
            result = run_restore(repo, snap, opts)
    if metrics_file:
        textfile_after_restore(metrics_file, result.bytes, int(time.time()))
    if as_json:
        emit_json({"backup_id": snap.id, "target": os.path.abspath(target), "files": result.files,
                   "dirs": result.dirs, "bytes": result.bytes})
        return
    click.echo(f"restored backup {snap.short_id} into {os.path.abspath(target)}: {result.files} files, "
               f"{result.dirs} directories, {human_bytes(result.bytes)}; every file verified against its digest")


def register(group: click.Group) -> None:
    group.add_command(restore)
