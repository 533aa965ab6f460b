"""backup, and the seed forms create-full and create-incremental."""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING

import click

from kyrorepo.cli.common import (
    RepoOptions,
    emit_json,
    human_bytes,
    json_option,
    metrics_file_option,
    repo_options,
    warn,
)
from kyrorepo.cli.progress import byte_progress
from kyrorepo.errors import ExitCode, NotFoundError, UsageError
from kyrorepo.timefmt import iso_time, parse_time

if TYPE_CHECKING:
    from kyrorepo.backup import BackupResult
    from kyrorepo.snapshot import Snapshot
    from kyrorepo.walcapture import WalBackup

# Imported while the key is derived (RepoOptions.open), then by the functions that use them.
BACKUP_MODULES = ("kyrorepo.backup", "kyrorepo.walcapture", "kyrorepo.snapshot", "kyrorepo.metrics")


def wal_backup(wal_spec: str | None, data_dir: str, t: int | None) -> WalBackup | None:
    """WAL capture for a backup: the codec given or detected; None for plain files."""
    from kyrorepo.walcapture import WalBackup, choose_codec

    if not os.path.isdir(data_dir):
        return None  # run_backup says what is wrong
    codec = choose_codec(wal_spec, data_dir)
    if codec is None:
        return None
    return WalBackup(codec, data_dir, time.time_ns() if t is None else t * 1_000_000_000)


def do_backup(ropts: RepoOptions, data_dir: str, source: str | None, description: str, tags: tuple[str, ...],
              when: str | None, full: bool, parent_id: str | None, as_json: bool,
              wal_spec: str | None = None, metrics_file: str | None = None) -> None:
    if not data_dir:
        raise UsageError("no data directory given: pass --data-dir")
    t = parse_time(when) if when else None
    repo = ropts.open(preload=BACKUP_MODULES)
    try:
        from kyrorepo.backup import BackupOptions, default_source, dir_bytes, run_backup
        from kyrorepo.metrics import textfile_after_backup
        from kyrorepo.snapshot import find_snapshot, list_snapshots

        src = source or default_source(data_dir)
        with repo.lock():
            parent: Snapshot | None = None
            if parent_id:
                try:
                    parent = find_snapshot(repo, parent_id)
                except NotFoundError:
                    raise NotFoundError(f"parent backup {parent_id} not found: run 'kyrorepo list', or "
                                        "make a full backup with 'create-full'") from None
            elif not full:
                previous = list_snapshots(repo, src)
                parent = previous[0] if previous else None
            kind = "incremental" if parent is not None and not full else "full"
            total = dir_bytes(data_dir) if not as_json and sys.stderr.isatty() else None
            wal = wal_backup(wal_spec, data_dir, t)
            with byte_progress("backup", total) as progress:
                opts = BackupOptions(data_dir=data_dir, source=src, parent=parent if not full else None,
                                     full=full, tags=tags, description=description, time=t, kind=kind,
                                     progress=progress, read_limit=wal.read_limit if wal else None,
                                     wal=wal.record if wal else None)
                result = run_backup(repo, opts)
    finally:
        repo.close()
    if wal is not None:
        result.warnings.extend(wal.warnings)
    if metrics_file:
        textfile_after_backup(metrics_file, result.snapshot, result.duration)
    report(result, as_json)
    if result.incomplete:
        raise click.exceptions.Exit(int(ExitCode.INCOMPLETE))


def report(result: BackupResult, as_json: bool) -> None:
    s = result.snapshot
    st = s.stats
    if as_json:
        emit_json({
            "id": s.id, "short_id": s.short_id, "timestamp": s.time, "time": iso_time(s.time), "source": s.source,
            "type": s.kind, "parent_id": s.parent,
            "logical_bytes": st["logical_bytes"], "added_bytes": st["added_bytes"], "stored_bytes": st["stored_bytes"],
            "files_new": st["files_new"], "files_changed": st["files_changed"],
            "files_unmodified": st["files_unmodified"], "file_count": st["file_count"],
            "duration_seconds": round(result.duration, 3), "warnings": result.warnings,
            "incomplete": result.incomplete,
            "wal": None if not s.wal else {"codec": s.wal.get("codec"), "segments": len(s.wal.get("segments", []))},
        })
        return
    for w in result.warnings:
        warn(w)
    click.echo(f"Files: {st['files_new']} new, {st['files_changed']} changed, {st['files_unmodified']} unmodified")
    click.echo(f"Added to the repository: {human_bytes(st['added_bytes'])} ({human_bytes(st['stored_bytes'])} stored)")
    click.echo(f"Processed {st['file_count']} files, {human_bytes(st['logical_bytes'])} in {result.duration:.2f}s")
    if s.wal:
        click.echo(f"WAL ({s.wal.get('codec')}): {len(s.wal.get('segments', []))} segment(s) captured")
    click.echo(f"{s.kind} backup {s.short_id} saved ({s.id})")


def common_backup_options(func):  # type: ignore[no-untyped-def]
    for opt in reversed([
        click.option("--data-dir", "data_dir", required=True, type=click.Path(file_okay=False),
                     help="Directory to back up."),
        click.option("--source", help="Source name (default: <hostname>:<absolute data dir>)."),
        click.option("--description", default="", help="Free text stored with the backup."),
        click.option("--tag", "tags", multiple=True, help="Tag the backup (repeatable)."),
        click.option("--time", "when", help="Record this backup time (Unix seconds or ISO 8601) instead of now."),
        metrics_file_option,
        click.option("--wal", "wal_spec", metavar="NAME",
                     help="WAL codec: kyrodb, chronicle, segments[:GLOB,...], or none "
                          "(default: detected from the content)."),
    ]):
        func = opt(func)
    return func


@click.command()
@repo_options
@common_backup_options
@click.option("--full", is_flag=True, help="Re-read every file, ignoring the parent backup.")
@click.option("--parent-id", help="Compare against this backup instead of the latest of the source.")
@json_option
def backup(ropts: RepoOptions, data_dir: str, source: str | None, description: str, tags: tuple[str, ...],
           when: str | None, wal_spec: str | None, metrics_file: str | None, full: bool, parent_id: str | None,
           as_json: bool) -> None:
    """Back up a data directory. Every backup is a complete snapshot.

    A database's WAL (KyroDB, Chronicle, or --wal segments:GLOB) is captured too: each
    segment up to its last complete frame, its position recorded for restore-pitr.
    """
    do_backup(ropts, data_dir, source, description, tags, when, full, parent_id, as_json, wal_spec, metrics_file)


@click.command("create-full")
@repo_options
@common_backup_options
@json_option
def create_full(ropts: RepoOptions, data_dir: str, source: str | None, description: str, tags: tuple[str, ...],
                when: str | None, wal_spec: str | None, metrics_file: str | None, as_json: bool) -> None:
    """Seed form of 'backup --full'."""
    do_backup(ropts, data_dir, source, description, tags, when, True, None, as_json, wal_spec, metrics_file)


@click.command("create-incremental")
@repo_options
@common_backup_options
@click.option("--parent-id", required=True, help="The backup to compare against.")
@json_option
def create_incremental(ropts: RepoOptions, data_dir: str, source: str | None, description: str,
                       tags: tuple[str, ...], when: str | None, wal_spec: str | None, metrics_file: str | None,
                       parent_id: str,
                       as_json: bool) -> None:
    """Seed form of 'backup --parent-id ID'."""
    do_backup(ropts, data_dir, source, description, tags, when, False, parent_id, as_json, wal_spec, metrics_file)


def register(group: click.Group) -> None:
    for cmd in (backup, create_full, create_incremental):
        group.add_command(cmd)
