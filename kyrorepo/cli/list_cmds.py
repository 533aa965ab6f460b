"""list (alias snapshots) and ls."""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

import click

from kyrorepo.cli.common import RepoOptions, emit_json, human_bytes, json_option, repo_options
from kyrorepo.errors import NotFoundError
from kyrorepo.timefmt import iso_time
from kyrorepo.tree import DIR, FILE, SYMLINK

if TYPE_CHECKING:
    from kyrorepo.snapshot import Snapshot

# Imported while the key is derived (RepoOptions.open), then by the commands that use them.
LIST_MODULES = ("kyrorepo.snapshot", "kyrorepo.walk")


def snapshot_json(s: Snapshot) -> dict:
    return {
        "id": s.id, "short_id": s.short_id, "timestamp": s.time, "time": iso_time(s.time),
        "end_timestamp": s.end_time, "source": s.source, "host": s.host, "data_dir": s.data_dir,
        "tags": list(s.tags), "description": s.description, "parent_id": s.parent, "type": s.kind,
        "logical_bytes": s.stats.get("logical_bytes", 0), "added_bytes": s.stats.get("added_bytes", 0),
        "stored_bytes": s.stats.get("stored_bytes", 0), "file_count": s.stats.get("file_count", 0),
        "warnings": len(s.warnings), "lost": list(s.lost),
    }


def _list(ropts: RepoOptions, source: str | None, as_json: bool) -> None:
    repo = ropts.open(preload=LIST_MODULES)
    try:
        from kyrorepo.snapshot import list_snapshots

        snaps = list_snapshots(repo, source)
    finally:
        repo.close()
    if as_json:
        emit_json([snapshot_json(s) for s in snaps])
        return
    if not snaps:
        click.echo("No backups found")
        return
    header = f"{'ID':<9} {'Time (UTC)':<20} {'Timestamp':<11} {'Type':<12} {'Size':>11} {'Added':>11}  Source / description"
    click.echo(header)
    click.echo("-" * len(header))
    for s in snaps:
        desc = f"{s.source}" + (f"  {s.description}" if s.description else "") + \
            (f"  [{','.join(s.tags)}]" if s.tags else "")
        click.echo(f"{s.short_id:<9} {iso_time(s.time):<20} {s.time:<11} {s.kind:<12} "
                   f"{human_bytes(s.stats.get('logical_bytes', 0)):>11} {human_bytes(s.stats.get('added_bytes', 0)):>11}  {desc}")
    click.echo(f"{len(snaps)} backup(s)")


@click.command("list")
@repo_options
@click.option("--source", help="Only backups of this source.")
@json_option
def list_cmd(ropts: RepoOptions, source: str | None, as_json: bool) -> None:
    """List backups, newest first."""
    _list(ropts, source, as_json)


@click.command("snapshots")
@repo_options
@click.option("--source", help="Only backups of this source.")
@json_option
def snapshots_cmd(ropts: RepoOptions, source: str | None, as_json: bool) -> None:
    """Alias of 'list'."""
    _list(ropts, source, as_json)


_TYPE_CHAR = {DIR: "d", FILE: "-", SYMLINK: "l"}


@click.command("ls")
@repo_options
@click.argument("backup_id")
@click.argument("path", required=False, default="")
@click.option("--source", help="Resolve 'latest' within this source.")
@json_option
def ls_cmd(ropts: RepoOptions, backup_id: str, path: str, source: str | None, as_json: bool) -> None:
    """List the files of a backup (below PATH)."""
    repo = ropts.open(preload=LIST_MODULES)
    try:
        from kyrorepo.snapshot import find_snapshot
        from kyrorepo.walk import find_node, walk

        snap = find_snapshot(repo, backup_id, source)
        prefix = os.fsencode(path.strip("/"))
        tree = snap.tree
        rows = []
        if prefix:
            node = find_node(repo, tree, prefix)
            if node is None:
                raise NotFoundError(f"path {path} is not in backup {snap.short_id}: run 'kyrorepo ls {snap.short_id}'")
            rows.append((prefix, node))
            entries = walk(repo, node.subtree, prefix) if node.type == DIR and node.subtree else iter(())
        else:
            entries = walk(repo, tree)
        rows.extend(entries)
    finally:
        repo.close()
    if as_json:
        emit_json([{"path": os.fsdecode(p), "type": n.type, "mode": n.mode, "size": n.size, "uid": n.uid,
                    "gid": n.gid, "mtime_ns": n.mtime_ns,
                    **({"target": os.fsdecode(n.target)} if n.target is not None else {})} for p, n in rows])
        return
    for p, n in rows:
        line = f"{_TYPE_CHAR[n.type]}{stat.filemode(n.mode)[1:]} {n.uid:>5} {n.gid:>5} {n.size:>12} {os.fsdecode(p)}"
        if n.target is not None:
            line += f" -> {os.fsdecode(n.target)}"
        click.echo(line)


def register(group: click.Group) -> None:
    for cmd in (list_cmd, snapshots_cmd, ls_cmd):
        group.add_command(cmd)
