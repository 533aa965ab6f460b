"""init, key management and unlock."""

from __future__ import annotations

import datetime as _dt
from typing import Any

import click

from kyrorepo.chunker import DEFAULT_AVG
from kyrorepo.cli.common import RepoOptions, emit_json, json_option, repo_options, with_kdf
from kyrorepo.errors import NotFoundError, UsageError
from kyrorepo.keys import KdfParams, key_opens, parse_key_file
from kyrorepo.repository import DEFAULT_COMPRESSION, Repository


def parse_compression(text: str) -> int:
    algo, _, level = text.partition(":")
    if algo == "none":
        return 0
    if algo != "zstd" or (level and not level.lstrip("-").isdigit()):
        raise UsageError(f"compression {text!r} is not understood: use zstd:LEVEL (1-22) or none")
    return int(level) if level else DEFAULT_COMPRESSION


def parse_size(text: str) -> int:
    units = {"k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = units.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in units else t
    if not num.isdigit():
        raise UsageError(f"size {text!r} is not understood: use bytes or a K/M/G suffix, e.g. 32K")
    return int(num) * mult


@click.command()
@repo_options
@click.option("--chunk-size", default=str(DEFAULT_AVG // 1024) + "K", show_default=True,
              help="Nominal average chunk size (power of two, 4K..4M); fixed for the repository's life.")
@click.option("--compression", default=f"zstd:{DEFAULT_COMPRESSION}", show_default=True,
              help="zstd:LEVEL or none.")
@click.option("--pack-size", default="16M", show_default=True, help="Target pack file size.")
@with_kdf
@json_option
def init(ropts: RepoOptions, chunk_size: str, compression: str, pack_size: str, kdf_memory_kib: int,
         kdf_iterations: int, as_json: bool) -> None:
    """Create a new, empty repository."""
    backend = ropts.backend()
    kdf = KdfParams(kdf_memory_kib, kdf_iterations).validate()
    level = parse_compression(compression)
    size = parse_size(chunk_size)
    psize = parse_size(pack_size)
    password = ropts.password(confirm=True)
    repo = Repository.create(backend, password, ropts.cache_dir, chunk_size=size, compression_level=level,
                             pack_size=psize, kdf=kdf)
    try:
        if as_json:
            emit_json({"id": repo.config.repo_id, "location": backend.describe(), "chunk_size": size,
                       "compression_level": level, "pack_size": psize})
        else:
            click.echo(f"created kyrorepo repository {repo.config.repo_id[:8]} at {backend.describe()}")
            click.echo("Keep the passphrase safe: without it the data cannot be read.")
    finally:
        repo.close()


@click.group()
def key() -> None:
    """Manage the passphrase keys that open the repository."""


@key.command("list")
@repo_options
@json_option
def key_list(ropts: RepoOptions, as_json: bool) -> None:
    """List the key objects."""
    repo = ropts.open()
    try:
        rows: list[dict[str, Any]] = []
        for key_id in repo.key_ids():
            info, _ = parse_key_file(repo.backend.load(f"keys/{key_id}"), key_id)
            rows.append({"id": key_id, "created": info.created, "host": info.host, "username": info.username,
                         "memory_kib": info.params.memory_kib, "iterations": info.params.iterations})
    finally:
        repo.close()
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        when = _dt.datetime.fromtimestamp(r["created"], _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"{r['id'][:8]}  {when}  {r['username']}@{r['host']}")


new_password_option = click.option("--new-password-file", type=click.Path(dir_okay=False),
                                   help="Read the new passphrase from this file.")


def _new_password_source(new_password_file: str | None) -> bytes:
    if new_password_file:
        with open(new_password_file, "rb") as f:
            pw = f.read().rstrip(b"\r\n")
        if not pw:
            raise UsageError(f"new password file {new_password_file} is empty")
        return pw
    typed: str = click.prompt("New passphrase", hide_input=True, confirmation_prompt=True, err=True)
    return typed.encode()


@key.command("add")
@repo_options
@new_password_option
@with_kdf
def key_add(ropts: RepoOptions, new_password_file: str | None, kdf_memory_kib: int, kdf_iterations: int) -> None:
    """Add a key with another passphrase."""
    repo = ropts.open()
    try:
        key_id = repo.add_key(_new_password_source(new_password_file), KdfParams(kdf_memory_kib, kdf_iterations))
    finally:
        repo.close()
    click.echo(f"added key {key_id[:8]}")


@key.command("remove")
@repo_options
@click.argument("key_id")
def key_remove(ropts: RepoOptions, key_id: str) -> None:
    """Remove a key (never the last one)."""
    repo = ropts.open()
    try:
        ids = repo.key_ids()
        matches = [k for k in ids if k.startswith(key_id)]
        if len(matches) != 1:
            raise NotFoundError(f"key {key_id} not found or ambiguous: run 'kyrorepo key list'")
        if len(ids) == 1:
            raise UsageError("refusing to remove the last key: the repository could never be opened again")
        repo.backend.remove(f"keys/{matches[0]}")
    finally:
        repo.close()
    click.echo(f"removed key {matches[0][:8]}")


@key.command("passwd")
@repo_options
@new_password_option
@with_kdf
def key_passwd(ropts: RepoOptions, new_password_file: str | None, kdf_memory_kib: int, kdf_iterations: int) -> None:
    """Change the passphrase: add a key with the new one, then remove the key the old one opened."""
    old = ropts.password()
    repo = ropts.open()
    try:
        opened = [k for k in repo.key_ids() if key_opens(repo.backend.load(f"keys/{k}"), k, old)]
        new_id = repo.add_key(_new_password_source(new_password_file), KdfParams(kdf_memory_kib, kdf_iterations))
        for k in opened:
            repo.backend.remove(f"keys/{k}")
    finally:
        repo.close()
    click.echo(f"passphrase changed: key {new_id[:8]} added, {len(opened)} old key(s) removed")


@click.command()
@repo_options
@click.option("--remove-all", is_flag=True, help="Remove every lock, not only stale ones.")
def unlock(ropts: RepoOptions, remove_all: bool) -> None:
    """Remove stale locks (left by a killed process)."""
    repo = ropts.open()
    try:
        removed = repo.remove_stale_locks(all_locks=remove_all)
    finally:
        repo.close()
    for info in removed:
        click.echo(f"removed {info.describe()}")
    click.echo(f"{len(removed)} lock(s) removed")


def register(group: click.Group) -> None:
    group.add_command(init)
    group.add_command(key)
    group.add_command(unlock)
