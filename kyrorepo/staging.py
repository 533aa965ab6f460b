"""Staged restores: write into a staging directory, make it durable, then swap it in.

``restore`` and ``restore-pitr`` both go through ``staged_restore``, so a failed or
killed restore never leaves the user with neither the old nor the new data. The staging
directory lies beside the target (``.<name>.kyrorepo-staging-<token>``); when the target
is a mount point (it cannot be renamed), staging happens inside it and entries are
swapped one by one, the old ones kept aside until the new ones are all in place.
Leftovers of a killed restore are removed by the next one (``clean_stale_staging``).

Durability before the swap: on Linux one ``syncfs`` of the staging file system (one call
instead of an fsync per file, which dominated restores of many small files); elsewhere
the writers fsync every file (``FILES_NEED_FSYNC``) and every directory is fsynced here.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import stat
import sys
from typing import Callable, TypeVar

from kyrorepo.backends.local import fsync_dir
from kyrorepo.errors import UsageError

T = TypeVar("T")

STAGING_TAG = ".kyrorepo-staging-"
OLD_TAG = ".kyrorepo-old-"


def _syncfs_call() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_SYNCFS = _syncfs_call()
FILES_NEED_FSYNC = _SYNCFS is None  # without syncfs, whoever writes a file fsyncs it


def recover_interrupted_swap(target: str) -> None:
    """Put back the old content of ``target`` when a restore was killed mid-swap.

    ``_swap_dir`` renames the target aside, then the staging directory in: killed in
    between, it leaves no target and the old content under ``.<name>.kyrorepo-old-*``.
    That content is the user's until a restore completes, so it goes back in place (and
    the next restore sees a non-empty target and asks for --allow-clear again)."""
    parent, name = os.path.split(target)
    if os.path.lexists(target) or not os.path.isdir(parent):
        return
    olds = sorted((e for e in os.listdir(parent) if e.startswith(f".{name}{OLD_TAG}")),
                  key=lambda e: os.stat(os.path.join(parent, e)).st_mtime_ns)
    if olds:
        os.rename(os.path.join(parent, olds[-1]), target)
        fsync_dir(parent)


def clean_stale_staging(target: str) -> None:
    """Remove staging and old directories that an earlier killed restore left beside ``target``
    (after ``recover_interrupted_swap``: an old directory left then is garbage)."""
    parent, name = os.path.split(target)
    if not os.path.isdir(parent):
        return
    recover_interrupted_swap(target)
    for entry in os.listdir(parent):
        if entry.startswith((f".{name}{STAGING_TAG}", f".{name}{OLD_TAG}")):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def staged_restore(target: str, fill: Callable[[str], T]) -> T:
    """Run ``fill(staging)`` in a new empty staging directory, make it durable, swap it in.

    ``target`` is absolute. On any error (also Ctrl-C) the staging directory is removed
    and the target is left as it was; ``fill`` must have stopped every writer of its own
    before it returns or raises.
    """
    parent, name = os.path.split(target)
    if not os.path.isdir(parent):
        raise UsageError(f"parent directory {parent} of the restore target does not exist: create it first")
    clean_stale_staging(target)
    in_place = os.path.isdir(target) and os.path.ismount(target)
    token = secrets.token_hex(4)
    staging = os.path.join(target, STAGING_TAG + token) if in_place else os.path.join(parent, f".{name}{STAGING_TAG}{token}")
    os.mkdir(staging, 0o700)
    try:
        value = fill(staging)
        _make_durable(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if in_place:
        _swap_entries(target, staging, token)
    else:
        _swap_dir(target, staging, parent, name, token)
    return value


def _make_durable(root: str) -> None:
    if _SYNCFS is None:
        for dirpath, _, _ in os.walk(root):
            fsync_dir(dirpath)
        return
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs of {root} failed: {os.strerror(err)}")
    finally:
        os.close(fd)


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
