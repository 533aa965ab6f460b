"""Prometheus metrics: repository statistics, and a textfile for node_exporter.

``repository_metrics`` computes gauges from the repository (backups per source, the
latest backup's size and duration, stored bytes). ``update_textfile`` keeps a node_exporter
textfile-collector file up to date after each backup and restore: counters survive from
one run to the next because the file itself is their state; it is replaced atomically.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field

from kyrorepo.repository import Repository
from kyrorepo.snapshot import Snapshot, list_snapshots

PREFIX = "kyrorepo_"
HELP = {
    "backup_total": ("counter", "Backups in the repository (stats) or created by this host (textfile)."),
    "backup_size_bytes": ("gauge", "Logical size of the latest backup of the source."),
    "backup_added_bytes": ("gauge", "Bytes the latest backup of the source added to the repository."),
    "backup_duration_seconds": ("gauge", "Duration of the latest backup of the source."),
    "backup_last_timestamp_seconds": ("gauge", "Unix time of the latest backup of the source."),
    "backup_files": ("gauge", "Files in the latest backup of the source."),
    "restore_total": ("counter", "Restores performed by this host."),
    "restore_last_timestamp_seconds": ("gauge", "Unix time of the latest restore."),
    "restore_bytes": ("gauge", "Bytes written by the latest restore."),
    "repository_stored_bytes": ("gauge", "Bytes of pack files in the repository."),
    "repository_packs": ("gauge", "Pack files in the repository."),
    "repository_backups": ("gauge", "Backups in the repository."),
}
_LINE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$')


@dataclass
class Metrics:
    """name (without prefix) -> {labels text -> value}."""

    values: dict[str, dict[str, float]] = field(default_factory=dict)

    def set(self, name: str, value: float, **labels: str) -> None:
        self.values.setdefault(name, {})[_labels(labels)] = value

    def inc(self, name: str, by: float = 1, **labels: str) -> None:
        key = _labels(labels)
        series = self.values.setdefault(name, {})
        series[key] = series.get(key, 0) + by

    def get(self, name: str, **labels: str) -> float | None:
        return self.values.get(name, {}).get(_labels(labels))

    def render(self) -> str:
        out = []
        for name in sorted(self.values):
            kind, text = HELP.get(name, ("gauge", name))
            out.append(f"# HELP {PREFIX}{name} {text}")
            out.append(f"# TYPE {PREFIX}{name} {kind}")
            for labels, value in sorted(self.values[name].items()):
                shown = f"{{{labels}}}" if labels else ""
                out.append(f"{PREFIX}{name}{shown} {_num(value)}")
        return "\n".join(out) + "\n"

    @classmethod
    def parse(cls, text: str) -> "Metrics":
        m = cls()
        for line in text.splitlines():
            match = _LINE.match(line.strip())
            if not match or not match["name"].startswith(PREFIX):
                continue
            try:
                value = float(match["value"])
            except ValueError:
                continue
            m.values.setdefault(match["name"][len(PREFIX):], {})[match["labels"] or ""] = value
        return m


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def record_backup(m: Metrics, snap: Snapshot, duration: float) -> None:
    src = snap.source
    m.set("backup_size_bytes", snap.stats.get("logical_bytes", 0), source=src)
    m.set("backup_added_bytes", snap.stats.get("added_bytes", 0), source=src)
    m.set("backup_duration_seconds", round(duration, 3), source=src)
    m.set("backup_last_timestamp_seconds", snap.end_time, source=src)
    m.set("backup_files", snap.stats.get("file_count", 0), source=src)


def repository_metrics(repo: Repository) -> Metrics:
    m = Metrics()
    snaps = list_snapshots(repo)
    latest: dict[str, Snapshot] = {}
    for s in snaps:
        m.inc("backup_total", source=s.source)
        if s.source not in latest:
            latest[s.source] = s  # newest first
    for s in latest.values():
        record_backup(m, s, s.stats.get("duration_ms", 0) / 1000)
    packs = list(repo.backend.list("data/"))
    m.set("repository_stored_bytes", sum(size for _, size in packs))
    m.set("repository_packs", len(packs))
    m.set("repository_backups", len(snaps))
    return m


def update_textfile(path: str, update) -> None:  # type: ignore[no-untyped-def]
    """Apply ``update(Metrics)`` to the textfile at ``path`` and replace it atomically."""
    try:
        with open(path) as f:
            m = Metrics.parse(f.read())
    except FileNotFoundError:
        m = Metrics()
    update(m)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".kyrorepo-metrics-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(m.render())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def textfile_after_backup(path: str, snap: Snapshot, duration: float) -> None:
    def update(m: Metrics) -> None:
        m.inc("backup_total", source=snap.source)
        record_backup(m, snap, duration)
    update_textfile(path, update)


def textfile_after_restore(path: str, nbytes: int, when: int) -> None:
    def update(m: Metrics) -> None:
        m.inc("restore_total")
        m.set("restore_last_timestamp_seconds", when)
        m.set("restore_bytes", nbytes)
    update_textfile(path, update)
