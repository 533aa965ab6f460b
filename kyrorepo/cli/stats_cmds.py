"""stats: repository statistics as text, JSON or Prometheus exposition format."""

from __future__ import annotations

from typing import Any

import click

from kyrorepo.cli.common import RepoOptions, emit_json, human_bytes, json_option, repo_options
from kyrorepo.metrics import repository_metrics


@click.command()
@repo_options
@click.option("--prometheus", is_flag=True, help="Print metrics in Prometheus text exposition format.")
@json_option
def stats(ropts: RepoOptions, prometheus: bool, as_json: bool) -> None:
    """Repository statistics: backups per source, latest backup size and duration, stored bytes."""
    repo = ropts.open()
    try:
        m = repository_metrics(repo)
    finally:
        repo.close()
    if prometheus:
        click.echo(m.render(), nl=False)
        return
    sources = sorted({labels for labels in m.values.get("backup_total", {})})
    per_source: list[dict[str, Any]] = []
    for labels in sources:
        def g(name: str) -> float:
            return m.values.get(name, {}).get(labels, 0)
        per_source.append({
            "source": labels.split('"', 2)[1], "backups": int(g("backup_total")),
            "latest_timestamp": int(g("backup_last_timestamp_seconds")),
            "latest_logical_bytes": int(g("backup_size_bytes")), "latest_added_bytes": int(g("backup_added_bytes")),
            "latest_duration_seconds": g("backup_duration_seconds"), "latest_files": int(g("backup_files")),
        })
    total: dict[str, Any] = {"backups": int(m.get("repository_backups") or 0), "packs": int(m.get("repository_packs") or 0),
             "stored_bytes": int(m.get("repository_stored_bytes") or 0), "sources": per_source}
    if as_json:
        emit_json(total)
        return
    click.echo(f"{total['backups']} backup(s), {total['packs']} pack(s), {human_bytes(total['stored_bytes'])} stored")
    for s in per_source:
        click.echo(f"  {s['source']}: {s['backups']} backup(s); latest {human_bytes(s['latest_logical_bytes'])}, "
                   f"added {human_bytes(s['latest_added_bytes'])}, {s['latest_duration_seconds']:.2f}s")


def register(group: click.Group) -> None:
    group.add_command(stats)
