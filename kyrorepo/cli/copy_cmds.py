"""copy and sync between related repositories, and the seed forms upload-s3, download-s3, sync-s3."""

from __future__ import annotations

import click

from kyrorepo.cli.common import RepoOptions, emit_json, get_password, human_bytes, json_option, repo_options, with_kdf
from kyrorepo.copy import (
    CopyResult,
    capture_blobs,
    captures_of,
    check_at_destination,
    copy_dictionaries,
    copy_objects,
    copy_snapshot,
    open_or_create_related,
)
from kyrorepo.errors import UsageError
from kyrorepo.format import BlobType
from kyrorepo.keys import KdfParams
from kyrorepo.repository import Repository
from kyrorepo.snapshot import Snapshot, find_snapshot, list_snapshots


def s3_location(bucket: str, prefix: str) -> str:
    if not bucket:
        raise UsageError("no bucket given: pass --bucket")
    prefix = prefix.strip("/")
    return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"


def _choose(src: Repository, backup_ids: tuple[str, ...], source: str | None) -> list[Snapshot]:
    if backup_ids:
        return [find_snapshot(src, ref, source) for ref in backup_ids]
    return list(reversed(list_snapshots(src, source)))  # oldest first


def run_copy(ropts: RepoOptions, src_location: str, dest_location: str, backup_ids: tuple[str, ...],
             source: str | None, dest_password_file: str | None, kdf: KdfParams,
             delete_after_upload: bool = False) -> tuple[CopyResult, list[str]]:
    if src_location == dest_location:
        raise UsageError("source and destination repositories are the same: pass another --to")
    src_backend = ropts.backend(src_location)
    password = get_password(ropts.password_file, ropts.password_command)
    src = Repository.open(src_backend, password, ropts.cache_dir)
    dest_password = get_password(dest_password_file, None) if dest_password_file else password
    forgotten: list[str] = []
    try:
        dest, created = open_or_create_related(src, ropts.backend(dest_location), dest_password, ropts.cache_dir, kdf)
        try:
            with src.lock(), dest.lock():
                src.sync_index()
                dest.sync_index()
                result = CopyResult(created=created)
                snaps = _choose(src, backup_ids, source)
                # dictionaries first: the chunks that travel next may need them to open
                copy_dictionaries(src, dest)
                for snap in snaps:
                    copy_snapshot(src, dest, snap, result)
                # The WAL captures of the copied sources travel too, so the copy keeps PITR.
                caps = captures_of(src, {s.source for s in snaps})
                copy_objects(src, dest, BlobType.WALCAP, caps, lambda n: capture_blobs(src, n), result)
                result.captures = len(caps)
                if delete_after_upload:
                    for snap in snaps:
                        check_at_destination(dest, snap)
                    for snap in snaps:
                        src.remove_object(BlobType.SNAPSHOT, snap.id)
                        forgotten.append(snap.id)
        finally:
            dest.close()
    finally:
        src.close()
    return result, forgotten


def report(result: CopyResult, forgotten: list[str], dest: str, as_json: bool) -> None:
    if as_json:
        emit_json({"destination": dest, "created": result.created, "copied": result.copied,
                   "already_present": result.skipped, "blobs_sent": result.blobs_sent,
                   "bytes_sent": result.bytes_sent, "wal_captures": result.captures,
                   "forgotten": forgotten})
        return
    if result.created:
        click.echo(f"created related repository at {dest}")
    click.echo(f"copied {len(result.copied)} backup(s), {len(result.skipped)} already present; "
               f"sent {result.blobs_sent} blobs, {human_bytes(result.bytes_sent)}")
    if forgotten:
        click.echo(f"forgot {len(forgotten)} local backup(s) after checking every blob at {dest}; "
                   "run 'kyrorepo prune' to free their space")


@click.command()
@repo_options
@click.option("--to", "dest", required=True, metavar="LOCATION", help="Destination repository (created if empty).")
@click.option("--backup-id", "backup_ids", multiple=True, help="Backup to copy (repeatable; default: all).")
@click.option("--source", help="Only backups of this source.")
@click.option("--to-password-file", type=click.Path(dir_okay=False),
              help="Passphrase of the destination, when it differs.")
@with_kdf
@json_option
def copy(ropts: RepoOptions, dest: str, backup_ids: tuple[str, ...], source: str | None, to_password_file: str | None,
         kdf_memory_kib: int, kdf_iterations: int, as_json: bool) -> None:
    """Copy backups to a related repository; sealed data travels without being opened."""
    result, forgotten = run_copy(ropts, ropts.location, dest, backup_ids, source, to_password_file,
                                 KdfParams(kdf_memory_kib, kdf_iterations))
    report(result, forgotten, dest, as_json)


@click.command()
@repo_options
@click.option("--to", "dest", required=True, metavar="LOCATION", help="Destination repository (created if empty).")
@click.option("--delete-after-upload", is_flag=True,
              help="Forget local backups once every blob they need was read back from the destination and checked.")
@click.option("--to-password-file", type=click.Path(dir_okay=False), help="Passphrase of the destination.")
@with_kdf
@json_option
def sync(ropts: RepoOptions, dest: str, delete_after_upload: bool, to_password_file: str | None, kdf_memory_kib: int,
         kdf_iterations: int, as_json: bool) -> None:
    """Copy every backup to a related repository."""
    result, forgotten = run_copy(ropts, ropts.location, dest, (), None, to_password_file,
                                 KdfParams(kdf_memory_kib, kdf_iterations), delete_after_upload)
    report(result, forgotten, dest, as_json)


s3_options = [
    click.option("--bucket", required=True, help="S3 bucket."),
    click.option("--prefix", default="", help="Key prefix inside the bucket."),
]


def with_s3(func):  # type: ignore[no-untyped-def]
    for opt in reversed(s3_options):
        func = opt(func)
    return func


@click.command("upload-s3")
@repo_options
@click.option("--backup-id", "backup_ids", multiple=True, required=True, help="Backup to upload (repeatable).")
@with_s3
@with_kdf
@json_option
def upload_s3(ropts: RepoOptions, backup_ids: tuple[str, ...], bucket: str, prefix: str, kdf_memory_kib: int,
              kdf_iterations: int, as_json: bool) -> None:
    """Seed form: copy backups to s3://BUCKET/PREFIX."""
    dest = s3_location(bucket, prefix)
    result, forgotten = run_copy(ropts, ropts.location, dest, backup_ids, None, None,
                                 KdfParams(kdf_memory_kib, kdf_iterations))
    report(result, forgotten, dest, as_json)


@click.command("download-s3")
@repo_options
@click.option("--backup-id", "backup_ids", multiple=True, required=True, help="Backup to download (repeatable).")
@with_s3
@click.option("--output-dir", required=True, type=click.Path(file_okay=False),
              help="Local related repository to copy into (created if empty); restore from it.")
@with_kdf
@json_option
def download_s3(ropts: RepoOptions, backup_ids: tuple[str, ...], bucket: str, prefix: str, output_dir: str,
                kdf_memory_kib: int, kdf_iterations: int, as_json: bool) -> None:
    """Seed form: copy backups from s3://BUCKET/PREFIX into a local repository."""
    result, forgotten = run_copy(ropts, s3_location(bucket, prefix), output_dir, backup_ids, None, None,
                                 KdfParams(kdf_memory_kib, kdf_iterations))
    report(result, forgotten, output_dir, as_json)


@click.command("sync-s3")
@repo_options
@with_s3
@click.option("--delete-after-upload", is_flag=True, help="Forget local backups once checked in S3.")
@with_kdf
@json_option
def sync_s3(ropts: RepoOptions, bucket: str, prefix: str, delete_after_upload: bool, kdf_memory_kib: int,
            kdf_iterations: int, as_json: bool) -> None:
    """Seed form: copy every local backup to s3://BUCKET/PREFIX."""
    dest = s3_location(bucket, prefix)
    result, forgotten = run_copy(ropts, ropts.location, dest, (), None, None,
                                 KdfParams(kdf_memory_kib, kdf_iterations), delete_after_upload)
    report(result, forgotten, dest, as_json)


def register(group: click.Group) -> None:
    for cmd in (copy, sync, upload_s3, download_s3, sync_s3):
        group.add_command(cmd)
