"""The restore drill of ``verify --restore-test`` (docs/integrity.md, "Restore drill").

A backup is restored with ``run_restore`` (which authenticates every blob and checks every
file's digest as it writes) into a fresh directory under the system temporary directory
or ``restore_dir``; every restored entry is then read back and compared with the
backup's tree, and the directory is removed. Damage is recorded by the caller.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from kyrorepo.repository import Repository
from kyrorepo.restore import RestoreOptions, RestoreResult, run_restore
from kyrorepo.snapshot import Snapshot
from kyrorepo.tree import DIR, FILE, SYMLINK
from kyrorepo.walk import walk

READ_BLOCK = 1024 * 1024
TEMP_PREFIX = "kyrorepo-restore-test-"

Problem = tuple[str, str]  # (path, what is wrong with it)


def compare_restored(repo: Repository, snap: Snapshot, target: str) -> list[Problem]:
    """Compare a restored directory with the backup's tree: every file re-read and re-hashed."""
    problems = []
    for rel, node in walk(repo, snap.tree):
        shown = os.fsdecode(rel)
        path = os.path.join(target, shown)
        if node.type == DIR:
            if not os.path.isdir(path):
                problems.append((shown, "is not a restored directory"))
        elif node.type == SYMLINK:
            if not os.path.islink(path) or os.fsencode(os.readlink(path)) != node.target:
                problems.append((shown, "is not the recorded symlink"))
        elif node.type == FILE:
            hasher = repo.keys.hasher()
            size = 0
            try:
                with open(path, "rb") as f:
                    while block := f.read(READ_BLOCK):
                        hasher.update(block)
                        size += len(block)
            except OSError as exc:
                problems.append((shown, f"cannot be read back ({exc.strerror})"))
                continue
            if size != node.size or hasher.digest() != node.digest:
                problems.append((shown, "does not match its recorded digest"))
    return problems


def restore_and_compare(repo: Repository, snap: Snapshot, workers: int,
                        restore_dir: str | None) -> tuple[RestoreResult, list[Problem]]:
    """Restore ``snap`` into a temporary directory, compare it, remove it.

    Raises IntegrityError when the restore itself finds damage.
    """
    tmp = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=restore_dir)
    try:
        target = os.path.join(tmp, "data")
        result = run_restore(repo, snap, RestoreOptions(target=target, workers=workers))
        return result, compare_restored(repo, snap, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
