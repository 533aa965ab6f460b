"""Shared CLI plumbing: repository options, passphrase sources, output helpers.

CLI modules parse arguments and format output only; the work is done by library calls.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable

import click

from kyrorepo.backends import open_backend
from kyrorepo.errors import UsageError
from kyrorepo.keys import DEFAULT_ITERATIONS, DEFAULT_MEMORY_KIB
from kyrorepo.opening import Unlocking, default_cache_root

if TYPE_CHECKING:
    from kyrorepo.repository import Repository

# Set by option callbacks so that main() formats errors the way the command asked.
STATE: dict[str, bool] = {"json": False, "debug": False}


def _set_state(key: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value:
            STATE[key] = True
        return value
    return callback


json_option = click.option("--json", "as_json", is_flag=True, callback=_set_state("json"), is_eager=True,
                           help="Print machine-readable JSON.")
metrics_file_option = click.option(
    "--metrics-file", envvar="KYROREPO_METRICS_FILE", type=click.Path(dir_okay=False),
    help="Update this Prometheus textfile (node_exporter) after success [$KYROREPO_METRICS_FILE].")
debug_option = click.option("--debug", is_flag=True, callback=_set_state("debug"), expose_value=False,
                            is_eager=True, help="Show tracebacks for errors.")


def with_kdf(func: Callable[..., Any]) -> Callable[..., Any]:
    """--kdf-memory-kib / --kdf-iterations for commands that write a new key object."""
    func = click.option("--kdf-iterations", type=int, default=DEFAULT_ITERATIONS, show_default=True,
                        help="Argon2id time cost of a new key.")(func)
    return click.option("--kdf-memory-kib", type=int, default=DEFAULT_MEMORY_KIB, show_default=True,
                        help="Argon2id memory cost of a new key, in KiB.")(func)


def repo_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--repo/--backup-dir, passphrase sources and --cache-dir, collected into ``ropts``."""

    @click.option("--repo", "--backup-dir", "repo", envvar="KYROREPO_REPO", metavar="LOCATION",
                  help="Repository: a path, sftp://user@host/path or s3://bucket/prefix [$KYROREPO_REPO].")
    @click.option("--password-file", envvar="KYROREPO_PASSWORD_FILE", type=click.Path(dir_okay=False),
                  help="Read the passphrase from this file [$KYROREPO_PASSWORD_FILE].")
    @click.option("--password-command", envvar="KYROREPO_PASSWORD_COMMAND",
                  help="Run this shell command and use its output as the passphrase.")
    @click.option("--cache-dir", envvar="KYROREPO_CACHE_DIR", type=click.Path(file_okay=False),
                  help="Local cache directory (default: $XDG_CACHE_HOME/kyrorepo).")
    @click.option("--s3-endpoint", envvar="AWS_ENDPOINT_URL", help="Endpoint URL of an S3-compatible store.")
    @debug_option
    @functools.wraps(func)
    def wrapper(*args: Any, repo: str | None, password_file: str | None, password_command: str | None,
                cache_dir: str | None, s3_endpoint: str | None, **kwargs: Any) -> Any:
        ropts = RepoOptions(repo or "", password_file, password_command, cache_dir or default_cache_root(),
                            s3_endpoint)
        return func(*args, ropts=ropts, **kwargs)

    return wrapper


class RepoOptions:
    def __init__(self, location: str, password_file: str | None, password_command: str | None,
                 cache_dir: str, s3_endpoint: str | None) -> None:
        self.location = location
        self.password_file = password_file
        self.password_command = password_command
        self.cache_dir = cache_dir
        self.s3_endpoint = s3_endpoint

    def backend(self, location: str | None = None):  # type: ignore[no-untyped-def]
        loc = self.location if location is None else location
        if not loc:
            raise UsageError("no repository given: pass --repo (or --backup-dir) or set KYROREPO_REPO")
        return open_backend(loc, s3_endpoint=self.s3_endpoint)

    def password(self, confirm: bool = False) -> bytes:
        return get_password(self.password_file, self.password_command, confirm)

    def open(self, on_backend: Callable[[Any], None] | None = None, preload: tuple[str, ...] = ()) -> Repository:
        """Open the repository; ``on_backend(backend)`` runs before the passphrase is read and
        stretched. The passphrase is stretched on a thread (``kyrorepo.opening``) while this
        thread imports the repository's modules and those named in ``preload``: the command's
        own, which a command module imports only after this returns (~0.1 s of start-up)."""
        backend = self.backend()
        unlocking: Unlocking | None = None
        try:
            if on_backend is not None:
                on_backend(backend)
            unlocking = Unlocking(backend, self.password())
            for name in ("kyrorepo.repository", *preload):
                importlib.import_module(name)
            from kyrorepo.repository import Repository

            return Repository.unlocked(backend, unlocking.master(), self.cache_dir)
        except BaseException:
            if unlocking is not None:
                unlocking.wait()
            backend.close()
            raise


@contextlib.contextmanager
def opened_with_workers(ropts: RepoOptions, workers: int | None, task_module: str,
                        preload: tuple[str, ...] = ()) -> Iterator[Repository]:
    """The repository, opened after the worker processes of a command that reads many blobs were
    started (``kyrorepo.procpool.prestart_for``: they import ``task_module`` while the passphrase
    is stretched; none when ``workers`` is None), and closed; prestarted workers no pool took
    (the command was refused or failed first) are stopped on the way out. ``preload``: as for
    ``RepoOptions.open``."""
    from kyrorepo import procpool

    try:
        repo = ropts.open(None if workers is None else
                          lambda backend: procpool.prestart_for(backend, workers, task_module), preload)
        try:
            yield repo
        finally:
            repo.close()
    finally:
        procpool.stop_spares()


def opened_for_restore(ropts: RepoOptions, dry_run: bool,
                       preload: tuple[str, ...] = ()) -> contextlib.AbstractContextManager[Repository]:
    """``opened_with_workers`` for a command that writes restored files (restore, restore-pitr):
    ``procpool.default_workers()`` restore workers, none for a dry run."""
    from kyrorepo.procpool import RESTORE_TASKS, default_workers

    return opened_with_workers(ropts, None if dry_run else default_workers(), RESTORE_TASKS, preload)


def get_password(password_file: str | None, password_command: str | None, confirm: bool = False) -> bytes:
    env = os.environ.get("KYROREPO_PASSWORD")
    if env is not None:
        return env.encode()
    if password_file:
        try:
            with open(password_file, "rb") as f:
                pw = f.read().rstrip(b"\r\n")
        except OSError as exc:
            raise UsageError(f"cannot read password file {password_file}: {exc.strerror}") from None
        if not pw:
            raise UsageError(f"password file {password_file} is empty")
        return pw
    if password_command:
        proc = subprocess.run(password_command, shell=True, capture_output=True)
        if proc.returncode != 0:
            raise UsageError(f"password command failed with exit code {proc.returncode}: {password_command}")
        pw = proc.stdout.rstrip(b"\r\n")
        if not pw:
            raise UsageError(f"password command printed nothing: {password_command}")
        return pw
    if not sys.stdin.isatty():
        raise UsageError("no passphrase: set KYROREPO_PASSWORD, KYROREPO_PASSWORD_FILE, --password-file "
                         "or --password-command (no terminal to ask on)")
    typed: str = click.prompt("Repository passphrase", hide_input=True, err=True)
    if confirm:
        again = click.prompt("Repeat passphrase", hide_input=True, err=True)
        if again != typed:
            raise UsageError("the passphrases do not match")
    if not typed:
        raise UsageError("an empty passphrase is not allowed")
    return typed.encode()


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


def warn(msg: str) -> None:
    click.echo(f"warning: {msg}", err=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()
