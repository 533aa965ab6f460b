"""Restore a snapshot into a data directory, safely.

The restore is written into a staging directory beside the target, every chunk checked
against its id and every file against its recorded digest, everything fsynced, and only
then swapped into place; the old content is removed after the swap. A failed or killed
restore never leaves the user with neither the old nor the new data. When the target is
a mount point (it cannot be renamed), staging happens inside it and entries are swapped
one by one, the old ones kept aside until the new ones are all in place.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import secrets
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

from kyrorepo.backends.local import fsync_dir
from kyrorepo.errors import IntegrityError, KyroError, RefusedError, UsageError
from kyrorepo.format import BlobType
from kyrorepo.index import BlobLocation
from kyrorepo.pack import pack_name
from kyrorepo.repository import Repository
from kyrorepo.snapshot import Snapshot
from kyrorepo.tree import DIR, FILE, SYMLINK, Node, Ref
from kyrorepo.walk import chunk_refs, walk

STAGING_TAG = ".kyrorepo-staging-"
OLD_TAG = ".kyrorepo-old-"
MAX_RANGE = 8 * 1024 * 1024
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

Progress = Callable[[int, int], None]


@dataclass
class RestoreOptions:
    target: str
    allow_clear: bool = False
    dry_run: bool = False
    includes: tuple[str, ...] = ()
    workers: int = 2
    progress: Progress | None = None


@dataclass
class RestorePlan:
    target: str
    existing: list[str]  # files now in the target, relative
    files: list[str]  # files the backup would write, relative
    refused: bool  # the target is not empty and clearing was not allowed


@dataclass
class RestoreResult:
    files: int = 0
    dirs: int = 0
    bytes: int = 0
    warnings: list[str] = field(default_factory=list)


def existing_files(target: str) -> list[str]:
    if not os.path.isdir(target):
        return []
    out = []
    for dirpath, dirnames, filenames in os.walk(target):
        dirnames.sort()
        rel = os.path.relpath(dirpath, target)
        for fn in sorted(filenames):
            out.append(fn if rel == "." else os.path.join(rel, fn))
    return out


def is_nonempty(target: str) -> bool:
    if os.path.lexists(target) and not os.path.isdir(target):
        raise UsageError(f"restore target {target} exists and is not a directory")
    return os.path.isdir(target) and any(True for _ in os.scandir(target))


def selected(path: bytes, includes: tuple[str, ...]) -> bool:
    if not includes:
        return True
    text = os.fsdecode(path)
    return any(fnmatch.fnmatchcase(text, g) or fnmatch.fnmatchcase(text, g.rstrip("/") + "/*") for g in includes)


def selected_entries(repo: Repository, snap: Snapshot, includes: tuple[str, ...]) -> Iterator[tuple[bytes, Node]]:
    """Entries to restore: matching ones and the directories that lead to them."""
    for path, node in walk(repo, snap.tree):
        if node.type == DIR:
            yield path, node  # filtered below when empty
        elif selected(path, includes):
            yield path, node


def plan_restore(repo: Repository, snap: Snapshot, opts: RestoreOptions) -> RestorePlan:
    target = os.path.abspath(opts.target)
    files = [os.fsdecode(p) for p, n in selected_entries(repo, snap, opts.includes) if n.type != DIR]
    nonempty = is_nonempty(target)
    return RestorePlan(target, existing_files(target) if nonempty else [], files, nonempty and not opts.allow_clear)


def refuse_message(target: str, count: int) -> str:
    return (f"data directory {target} is not empty ({count} file(s)): it was left untouched; "
            "pass --allow-clear or set BACKUP_ALLOW_CLEAR=true to replace its content")


class _Writer:
    def __init__(self, repo: Repository, opts: RestoreOptions, pool: ThreadPoolExecutor) -> None:
        self.repo = repo
        self.opts = opts
        self.pool = pool
        self.result = RestoreResult()
        self.links: dict[int, str] = {}
        self.dirs: list[tuple[str, Node]] = []

    def write_tree(self, snap: Snapshot, staging: str) -> None:
        for path, node in selected_entries(self.repo, snap, self.opts.includes):
            dest = os.path.join(staging, os.fsdecode(path))
            if node.type == DIR:
                os.makedirs(dest, mode=0o700, exist_ok=True)
                self.dirs.append((dest, node))
                continue
            os.makedirs(os.path.dirname(dest), mode=0o700, exist_ok=True)
            if node.type == SYMLINK:
                assert node.target is not None
                os.symlink(node.target, dest)
                self.set_meta(dest, node, symlink=True)
            elif node.type == FILE:
                self.write_file(dest, path, node)
            self.result.files += 1
        if self.opts.includes:
            self.prune_empty_dirs(staging)
        for dest, node in reversed(self.dirs):
            if os.path.isdir(dest):
                self.set_meta(dest, node)
                self.result.dirs += 1

    def prune_empty_dirs(self, staging: str) -> None:
        for dest, _ in reversed(self.dirs):
            with contextlib.suppress(OSError):
                os.rmdir(dest)  # only succeeds when empty

    def write_file(self, dest: str, path: bytes, node: Node) -> None:
        if node.links is not None and node.links in self.links:
            os.link(self.links[node.links], dest)
            return
        hasher = self.repo.keys.hasher()
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        size = 0
        try:
            for data in self.file_chunks(path, node):
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                hasher.update(data)
                size += len(data)
                if self.opts.progress:
                    self.opts.progress(len(data), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        shown = os.fsdecode(path)
        if size != node.size or hasher.digest() != node.digest:
            raise IntegrityError(f"restored file {shown} does not match its recorded digest: the backup is damaged, "
                                 "run 'kyrorepo verify --full-scan'")
        self.set_meta(dest, node)
        self.result.bytes += size
        if node.links is not None:
            self.links[node.links] = dest
        if self.opts.progress:
            self.opts.progress(0, 1)

    def file_chunks(self, path: bytes, node: Node) -> Iterator[bytes]:
        """The file's chunks in order, loaded in coalesced pack ranges and opened in parallel."""
        batch: list[tuple[Ref, BlobLocation]] = []
        for ref in chunk_refs(self.repo, node):
            loc = self.repo.lookup(ref[0])
            if loc is None:
                raise IntegrityError(f"file {os.fsdecode(path)}: chunk {ref[0].hex()[:16]} is not in the index; "
                                     "run 'kyrorepo verify'")
            if batch and not _contiguous(batch, loc):
                yield from self.load_batch(batch)
                batch = []
            batch.append((ref, loc))
        if batch:
            yield from self.load_batch(batch)

    def load_batch(self, batch: list[tuple[Ref, BlobLocation]]) -> Iterator[bytes]:
        first = batch[0][1]
        last = batch[-1][1]
        start, end = first.offset, last.offset + last.length
        name = pack_name(first.pack_id)
        try:
            data = self.repo.backend.load(name, start, end - start)
        except KyroError as exc:
            raise IntegrityError(f"pack {name} cannot be read ({exc.message})") from None
        if len(data) != end - start:
            raise IntegrityError(f"pack {name} is truncated")

        def open_one(item: tuple[Ref, BlobLocation]) -> bytes:
            (bid, _), loc = item
            sealed = data[loc.offset - start:loc.offset - start + loc.length]
            return self.repo.codec.decode(BlobType.DATA, bid, sealed, f"chunk {bid.hex()[:16]} in {name}")

        if len(batch) == 1:
            yield open_one(batch[0])
        else:
            yield from self.pool.map(open_one, batch)

    def set_meta(self, dest: str, node: Node, symlink: bool = False) -> None:
        if IS_ROOT:
            with contextlib.suppress(OSError):
                os.lchown(dest, node.uid, node.gid)
        for k, v in node.xattrs:
            with contextlib.suppress(OSError):
                os.setxattr(dest, os.fsdecode(k), v, follow_symlinks=False)
        if not symlink:
            os.chmod(dest, node.mode)
        with contextlib.suppress(NotImplementedError, OSError):
            os.utime(dest, ns=(node.mtime_ns, node.mtime_ns), follow_symlinks=False)


def _contiguous(batch: list[tuple[Ref, BlobLocation]], loc: BlobLocation) -> bool:
    prev = batch[-1][1]
    return (prev.pack_id == loc.pack_id and prev.offset + prev.length == loc.offset
            and loc.offset + loc.length - batch[0][1].offset <= MAX_RANGE)


def _fsync_tree(root: str) -> None:
    for dirpath, _, filenames in os.walk(root):
        fsync_dir(dirpath)


def clean_stale_staging(target: str) -> None:
    """Remove staging and old directories that an earlier killed restore left beside ``target``."""
    parent, name = os.path.split(target)
    if not os.path.isdir(parent):
        return
    for entry in os.listdir(parent):
        if entry.startswith(f".{name}{STAGING_TAG}") or entry.startswith(f".{name}{OLD_TAG}"):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def run_restore(repo: Repository, snap: Snapshot, opts: RestoreOptions) -> RestoreResult:
    target = os.path.abspath(opts.target)
    if is_nonempty(target) and not opts.allow_clear:
        raise RefusedError(refuse_message(target, len(existing_files(target))))
    repo.sync_index()
    parent, name = os.path.split(target)
    if not os.path.isdir(parent):
        raise UsageError(f"parent directory {parent} of the restore target does not exist: create it first")
    clean_stale_staging(target)
    in_place = os.path.isdir(target) and os.path.ismount(target)
    token = secrets.token_hex(4)
    staging = os.path.join(target, STAGING_TAG + token) if in_place else os.path.join(parent, f".{name}{STAGING_TAG}{token}")
    os.mkdir(staging, 0o700)
    try:
        with ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="open") as pool:
            writer = _Writer(repo, opts, pool)
            writer.write_tree(snap, staging)
        writer.set_meta(staging, snap.root)
        _fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if in_place:
        _swap_entries(target, staging, token)
    else:
        _swap_dir(target, staging, parent, name, token)
    return writer.result


def _swap_dir(target: str, staging: str, parent: str, name: str, token: str) -> None:
    old = os.path.join(parent, f".{name}{OLD_TAG}{token}")
    had_old = os.path.lexists(target)
    if had_old:
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        if had_old:
            os.rename(old, target)
        raise
    fsync_dir(parent)
    if had_old:
        shutil.rmtree(old, ignore_errors=True)


def _swap_entries(target: str, staging: str, token: str) -> None:
    old = os.path.join(target, OLD_TAG + token)
    os.mkdir(old, 0o700)
    skip = {os.path.basename(staging), os.path.basename(old)}
    for entry in os.listdir(target):
        if entry not in skip:
            os.rename(os.path.join(target, entry), os.path.join(old, entry))
    fsync_dir(target)
    for entry in os.listdir(staging):
        os.rename(os.path.join(staging, entry), os.path.join(target, entry))
    st = os.stat(staging)
    os.chmod(target, stat.S_IMODE(st.st_mode))
    fsync_dir(target)
    os.rmdir(staging)
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target)
