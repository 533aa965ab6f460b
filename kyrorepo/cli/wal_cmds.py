"""wal-archive, wal-push, wal-fetch, restore-pitr and pitr-window."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

import click

from kyrorepo.cli.common import RepoOptions, emit_json, human_bytes, json_option, opened_for_restore, repo_options, warn
from kyrorepo.cli.restore_cmds import DRY_LIST_MAX, allow_clear_from_env
from kyrorepo.errors import KyroError, NotFoundError, UsageError
from kyrorepo.timefmt import iso_time, parse_time

if TYPE_CHECKING:
    from kyrorepo.pitr import PitrResult, SourceWindow
    from kyrorepo.walcapture import Archiver, CaptureResult

# Imported while the key is derived (RepoOptions.open), then by the commands that use them:
# wal-push runs once per WAL file (an archive command), so its start-up counts.
WAL_MODULES = ("kyrorepo.walcapture", "kyrorepo.backup")
PITR_MODULES = ("kyrorepo.pitr",)

_INTERVAL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
WAL_HELP = "WAL codec: kyrodb, chronicle, segments[:GLOB,...] (default: detected)."


def parse_interval(text: str) -> float:
    m = _INTERVAL.match(text)
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"interval {text!r} is not understood: use e.g. 1s, 500ms, 2m")
    return float(m.group(1)) * _UNIT[m.group(2)]


def _when_ns(when: str | None) -> int | None:
    return None if when is None else parse_time(when) * 1_000_000_000


def _t(ts: int | None) -> str:
    return "-" if ts is None else f"{iso_time(ts)} ({ts})"


# --- wal-archive --------------------------------------------------------------------------


def _capture_json(r: CaptureResult) -> dict[str, Any]:
    c = r.capture
    return {"capture": c.id if c else None, "time": c.time if c else None, "segments_stored": r.stored,
            "segments_present": r.present, "added_bytes": r.added_bytes,
            "gaps": [{"kind": g.kind, "detail": g.detail, "last_good_time": g.last_good_time} for g in r.gaps],
            "warnings": r.warnings}


def _report_capture(r: CaptureResult, as_json: bool, loop: bool) -> None:
    for w in r.warnings:
        warn(w)
    for g in r.gaps:
        warn(f"WAL gap ({g.kind}): {g.detail}; point-in-time recovery cannot cross it")
    if as_json:
        if not (loop and r.capture is None):
            click.echo(json.dumps(_capture_json(r)) if loop else json.dumps(_capture_json(r), indent=2))
        return
    if r.capture is None:
        if not loop:
            click.echo("nothing changed since the last capture: no capture saved")
        return
    click.echo(f"capture {r.capture.id[:8]} at {_t(r.capture.time)}: {r.stored} of {r.present} segment(s) "
               f"stored, {human_bytes(r.added_bytes)} added")


@click.command("wal-archive")
@repo_options
@click.option("--data-dir", "data_dir", required=True, type=click.Path(file_okay=False),
              help="The database's data directory.")
@click.option("--source", help="Source name (default: <hostname>:<absolute data dir>, as backup).")
@click.option("--interval", default="1s", show_default=True, help="Time between captures (500ms, 1s, 1m).")
@click.option("--once", is_flag=True, help="Capture once and exit.")
@click.option("--wal", "wal_spec", metavar="NAME", help=WAL_HELP)
@click.option("--time", "when", help="With --once: record this capture time (Unix seconds or ISO 8601).")
@json_option
def wal_archive(ropts: RepoOptions, data_dir: str, source: str | None, interval: str, once: bool,
                wal_spec: str | None, when: str | None, as_json: bool) -> None:
    """Capture the growth of a database's WAL, every INTERVAL (or --once).

    A capture is saved only when a segment appeared, grew, was renamed or removed; it
    stores only new bytes. Captures are not backups: 'list' does not show them,
    'pitr-window' does.
    """
    from kyrorepo.walcapture import NO_WAL, Archiver, choose_codec

    pause = parse_interval(interval)
    if when is not None and not once:
        raise UsageError("--time is only allowed with --once")
    if wal_spec == NO_WAL:
        raise UsageError("wal-archive needs a WAL codec: --wal none makes no sense here")
    if not os.path.isdir(data_dir):
        raise NotFoundError(f"data directory {os.path.abspath(data_dir)} does not exist: check --data-dir")
    codec = choose_codec(wal_spec, data_dir)
    if codec is None:
        raise UsageError(f"no database WAL found in {data_dir}: pass --wal kyrodb, chronicle or segments:GLOB")
    repo = ropts.open(preload=WAL_MODULES)
    try:
        from kyrorepo.backup import default_source

        archiver = Archiver(repo, codec, data_dir, source or default_source(data_dir))
        if once:
            _report_capture(archiver.capture(_when_ns(when)), as_json, loop=False)
            return
        _loop(archiver, pause, as_json)
    finally:
        repo.close()


def _loop(archiver: Archiver, pause: float, as_json: bool) -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    last_error = ""
    while not stop.is_set():
        started = time.monotonic()
        try:
            _report_capture(archiver.capture(), as_json, loop=True)
            last_error = ""
        except KyroError as exc:  # a lock held by prune, a network failure: retry next time
            if exc.message != last_error:
                warn(f"capture failed, retrying every {pause:g}s: {exc.message}")
            last_error = exc.message
        stop.wait(max(0.0, pause - (time.monotonic() - started)))


# --- wal-push / wal-fetch ------------------------------------------------------------------


@click.command("wal-push")
@repo_options
@click.option("--source", help="Source name (default: <hostname>:<current directory>, the data directory "
              "archive commands run in).")
@click.option("--wal", "wal_spec", metavar="NAME", help="WAL codec of the file (default: by name and content).")
@click.argument("file", type=click.Path(dir_okay=False))
@json_option
def wal_push(ropts: RepoOptions, source: str | None, wal_spec: str | None, file: str, as_json: bool) -> None:
    """Store one WAL file (an archive command); exit 0 once it is durable.

    Pushing the same file again does nothing and succeeds; a different file under a
    name already pushed is refused (exit 1).
    """
    if not os.path.isfile(file):
        raise UsageError(f"wal-push: {file} is not a regular file")
    codec = None
    if wal_spec:
        from kyrorepo.walcapture import NO_WAL, codec_from_spec

        codec = None if wal_spec == NO_WAL else codec_from_spec(wal_spec)
    repo = ropts.open(preload=WAL_MODULES)
    try:
        from kyrorepo.backup import default_source
        from kyrorepo.walcapture import push_file

        src = source or default_source(os.getcwd())
        r = push_file(repo, file, src, codec, os.getcwd())
    finally:
        repo.close()
    if as_json:
        emit_json({"name": r.name, "source": src, "size": r.size, "already_pushed": r.already,
                   "capture": r.capture.id if r.capture else None})
    elif r.already:
        click.echo(f"{r.name} was already pushed with the same content: nothing to do")
    else:
        assert r.capture is not None
        click.echo(f"pushed {r.name} ({human_bytes(r.size)}) for source {src} as capture {r.capture.id[:8]}")


@click.command("wal-fetch")
@repo_options
@click.option("--source", help="Source name (default: <hostname>:<current directory>).")
@click.argument("name")
@click.argument("dest", type=click.Path(dir_okay=False))
@json_option
def wal_fetch(ropts: RepoOptions, source: str | None, name: str, dest: str, as_json: bool) -> None:
    """Write the captured WAL file NAME to DEST (a restore command); exit 1 if unknown."""
    repo = ropts.open(preload=WAL_MODULES)
    try:
        from kyrorepo.backup import default_source
        from kyrorepo.walcapture import fetch_file

        src = source or default_source(os.getcwd())
        cap, size = fetch_file(repo, name, dest, src)
    finally:
        repo.close()
    if as_json:
        emit_json({"name": name, "source": src, "dest": os.path.abspath(dest), "size": size, "capture": cap.id})
    else:
        click.echo(f"fetched {name} ({human_bytes(size)}) from capture {cap.id[:8]} into {dest}")


# --- restore-pitr --------------------------------------------------------------------------


def _pitr_json(r: PitrResult) -> dict[str, Any]:
    return {
        "dry_run": r.dry_run, "source": r.source, "codec": r.codec, "target": r.target,
        "requested_timestamp": r.requested, "timestamp": r.t, "time": iso_time(r.t),
        "base": {"id": r.base.id, "timestamp": r.base.time, "end_timestamp": r.base.end_time},
        "segments": [{"path": s.relpath, "from": s.origin, "from_timestamp": s.origin_time,
                      "restored": s.kept, "frames": s.frames, "frames_in_capture": s.total_frames,
                      "bytes": s.bytes, "last_frame_timestamp": s.last_time} for s in r.segments],
        "frames": sum(s.frames for s in r.segments if s.kept),
        "last_frame_timestamp": r.last_frame_time, "metadata_rewritten": r.metadata,
        "stopped_at_gap": None if r.gap is None else r.gap.gap.detail,
        "would_delete": r.existing if r.dry_run else [], "refused": r.refused, "warnings": r.warnings,
    }


def _print_pitr(r: PitrResult) -> None:
    lead = "DRY-RUN: would restore" if r.dry_run else "restored"
    kept = [s for s in r.segments if s.kept]
    click.echo(f"{lead} source {r.source} ({r.codec}) to {_t(r.t)} into {r.target}")
    click.echo(f"  base: backup {r.base.short_id}, finished {_t(r.base.end_time)}")
    for s in r.segments[:DRY_LIST_MAX]:
        if s.kept:
            click.echo(f"  + {s.relpath}: {s.frames} of {s.total_frames} frame(s), {s.bytes} bytes, "
                       f"last frame {_t(s.last_time)}, from {s.origin}")
        else:
            click.echo(f"  - {s.relpath}: not restored (every frame after the target), from {s.origin}")
    if len(r.segments) > DRY_LIST_MAX:
        click.echo("  ...")
    frames = sum(s.frames for s in kept)
    click.echo(f"  {len(kept)} segment(s), {frames} frame(s), last frame {_t(r.last_frame_time)}")
    if r.metadata:
        click.echo(f"  metadata rewritten: {', '.join(r.metadata)}")
    if r.dry_run and r.existing:
        click.echo(f"DRY-RUN: would delete {len(r.existing)} file(s) from {r.target}")
    if r.dry_run and r.refused:
        click.echo("DRY-RUN: the target is not empty: the restore would be refused without --allow-clear "
                   "or BACKUP_ALLOW_CLEAR=true")
    if not r.dry_run:
        click.echo("every file verified against its digest")


@click.command("restore-pitr")
@repo_options
@click.option("--timestamp", required=True, help="Target second: Unix seconds or ISO 8601 (UTC if no offset).")
@click.option("--data-dir", "target", required=True, type=click.Path(file_okay=False), help="Restore into this directory.")
@click.option("--source", help="Source to restore (default: the data dir's own source, or the only one).")
@click.option("--allow-clear", is_flag=True, help="Replace the content of a non-empty data directory [$BACKUP_ALLOW_CLEAR].")
@click.option("--dry-run", is_flag=True, help="Print the plan (base, segments, frames); change nothing.")
@click.option("--allow-gap", is_flag=True, help="If the captured WAL has a gap before the target, restore up to it.")
@json_option
def restore_pitr(ropts: RepoOptions, timestamp: str, target: str, source: str | None, allow_clear: bool,
                 dry_run: bool, allow_gap: bool, as_json: bool) -> None:
    """Restore a database as it was at a second: a backup, then its WAL cut at that second.

    Exit 14 when the second cannot be reached exactly (before the oldest backup, after the
    newest capture, or across a gap in the captured WAL).
    """
    t = parse_time(timestamp)
    with opened_for_restore(ropts, dry_run, PITR_MODULES) as repo, repo.lock():
        from kyrorepo.pitr import PitrOptions, run_pitr

        opts = PitrOptions(target=target, t=t, source=source, allow_clear=allow_clear or allow_clear_from_env(),
                           allow_gap=allow_gap, dry_run=dry_run)
        result = run_pitr(repo, opts)
    for w in result.warnings:
        warn(w)
    if result.gap is not None:
        warn(f"restored only up to {_t(result.t)}, not {_t(result.requested)}: the captured WAL has a gap: "
             f"{result.gap.gap.detail}")
    if as_json:
        emit_json(_pitr_json(result))
    else:
        _print_pitr(result)


# --- pitr-window ----------------------------------------------------------------------------


def _window_json(w: SourceWindow) -> dict[str, Any]:
    win = w.window
    return {
        "source": w.source, "codec": w.codec, "earliest": win.earliest, "latest": win.latest,
        "earliest_time": None if win.earliest is None else iso_time(win.earliest),
        "latest_time": None if win.latest is None else iso_time(win.latest),
        "gaps": [{"from": h.start, "to": h.end, "detail": h.detail} for h in win.holes],
        "after_latest": None if win.tail is None else {"from": win.tail.start, "to": win.tail.end,
                                                        "detail": win.tail.detail},
        "backups": w.backups, "captures": w.captures, "newest": w.newest, "warnings": w.warnings,
    }


@click.command("pitr-window")
@repo_options
@click.option("--source", help="Only this source.")
@json_option
def pitr_window(ropts: RepoOptions, source: str | None, as_json: bool) -> None:
    """Per source: the earliest and latest second restore-pitr can reach, and the gaps."""
    repo = ropts.open(preload=PITR_MODULES)
    try:
        from kyrorepo.pitr import pitr_windows

        windows = pitr_windows(repo, source)
    finally:
        repo.close()
    if as_json:
        emit_json([_window_json(w) for w in windows])
        return
    if not windows:
        click.echo("No source with WAL in this repository")
    for w in windows:
        win = w.window
        click.echo(f"{w.source} ({w.codec}; {w.backups} backup(s), {w.captures} capture(s))")
        if win.earliest is None:
            click.echo("  no second is restorable")
        else:
            click.echo(f"  restorable from {_t(win.earliest)} to {_t(win.latest)}")
        for h in win.holes:
            click.echo(f"  gap: {_t(h.start)} to {_t(h.end)}: {h.detail}")
        if win.tail is not None:
            click.echo(f"  after {_t(win.latest)} unreachable: {win.tail.detail}")
        for msg in w.warnings:
            click.echo(f"  warning: {msg}")


def register(group: click.Group) -> None:
    for cmd in (wal_archive, wal_push, wal_fetch, restore_pitr, pitr_window):
        group.add_command(cmd)
