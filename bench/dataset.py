"""The data under test: a private copy of the user's directory, its mutation, and checks.

The mutation that turns a first backup into an incremental one is, in order of preference:
1. ``--mutate-cmd``: a shell command, run in the copy with ``{data}`` replaced by its path
   (also exported as ``$DATA``);
2. a make_dataset directory (``CONTROL``, ``MANIFEST``, ``tables/``, ``wal/``) and the
   shared generator ``../shared/bench/make_dataset.py`` next to the repository:
   ``make_dataset.py mutate`` (1% of 8 KiB pages rewritten, 32 MiB of WAL appended);
3. a KyroDB directory (``MANIFEST`` and ``wal_*.wal``) and ``tools/make_kyrodb.py``: append
   frames; a Chronicle directory (``*.wal``) and ``tools/make_chronicle.py``: the same.
Without any of these the incremental phase is skipped.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import stat
import sys
from dataclasses import dataclass

from bench.measure import REPO_ROOT, Command, run_quiet

SHARED_GENERATOR = os.path.join(os.path.dirname(REPO_ROOT), "shared", "bench", "make_dataset.py")
KYRODB_GENERATOR = os.path.join(REPO_ROOT, "tools", "make_kyrodb.py")
CHRONICLE_GENERATOR = os.path.join(REPO_ROOT, "tools", "make_chronicle.py")
APPEND_FRAMES = 20000


def copy_data(src: str, dest: str) -> None:
    if os.path.lexists(dest):
        shutil.rmtree(dest)
    shutil.copytree(src, dest, symlinks=True)


def logical_bytes(root: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for fn in files:
            st = os.lstat(os.path.join(dirpath, fn))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def _is_make_dataset(path: str) -> bool:
    return all(os.path.exists(os.path.join(path, p)) for p in ("CONTROL", "MANIFEST", "tables", "wal"))


def _has(path: str, suffix: str, prefix: str = "") -> bool:
    return any(n.endswith(suffix) and n.startswith(prefix) for n in os.listdir(path))


@dataclass(frozen=True)
class Mutator:
    description: str
    command: Command | None  # None: a shell command string in ``shell``
    shell: str | None = None

    def run(self, data: str) -> None:
        if self.shell is not None:
            cmd = Command(["/bin/sh", "-c", self.shell.replace("{data}", shlex.quote(data))],
                          dict(os.environ, DATA=data), data)
            run_quiet(cmd)
        elif self.command is not None:
            run_quiet(self.command)


def find_mutator(data: str, mutate_cmd: str | None) -> Mutator | None:
    """How to mutate the copy at ``data``, or None when the data is of no known kind."""
    if mutate_cmd:
        return Mutator(f"--mutate-cmd {mutate_cmd}", None, mutate_cmd)
    env = dict(os.environ)
    if _is_make_dataset(data) and os.path.exists(SHARED_GENERATOR):
        return Mutator("make_dataset.py mutate (1% of pages rewritten, 32 MiB WAL appended)",
                       Command([sys.executable, SHARED_GENERATOR, "mutate", data], env))
    if os.path.exists(os.path.join(data, "MANIFEST")) and _has(data, ".wal", "wal_") and os.path.exists(KYRODB_GENERATOR):
        return Mutator(f"make_kyrodb.py append --frames {APPEND_FRAMES}",
                       Command([sys.executable, KYRODB_GENERATOR, "append", data, "--frames", str(APPEND_FRAMES)], env))
    if _has(data, ".wal") and os.path.exists(CHRONICLE_GENERATOR):
        return Mutator(f"make_chronicle.py append --frames {APPEND_FRAMES}",
                       Command([sys.executable, CHRONICLE_GENERATOR, "append", data, "--frames", str(APPEND_FRAMES)],
                               env))
    return None


def tree_digest(root: str) -> dict[str, tuple[str, int, str]]:
    """Relative path -> (kind, size, content digest or link target) of everything below ``root``."""
    out: dict[str, tuple[str, int, str]] = {}
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        for fn in sorted(files) + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = os.path.join(dirpath, fn)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", 0, os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                h = hashlib.blake2b()
                with open(path, "rb") as f:
                    while block := f.read(4 << 20):
                        h.update(block)
                out[rel] = ("file", st.st_size, h.hexdigest())
    return out


def same_tree(a: str, b: str) -> str | None:
    """None when the trees hold the same files with the same content, else what differs."""
    da, db = tree_digest(a), tree_digest(b)
    if da == db:
        return None
    missing = sorted(set(da) - set(db))
    extra = sorted(set(db) - set(da))
    changed = sorted(k for k in set(da) & set(db) if da[k] != db[k])
    return f"missing {missing[:5]}, extra {extra[:5]}, different {changed[:5]}"
