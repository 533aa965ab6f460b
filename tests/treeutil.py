"""Helpers to build data directories and compare them byte for byte, metadata included."""

from __future__ import annotations

import os
import stat
from typing import Any


def snapshot_tree(root: str, mtimes: bool = True) -> dict[bytes, tuple[Any, ...]]:
    """path -> (kind, mode, content or target, mtime_ns, inode group) for every entry below root."""
    out: dict[bytes, tuple[Any, ...]] = {}
    inodes: dict[int, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        dirnames.sort()  # a hard link group is named by its first path: the same in both trees
        for name in dirnames + sorted(filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, os.fsencode(root))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns if mtimes else 0)
            else:
                with open(p, "rb") as f:
                    data = f.read()
                group = None
                if st.st_nlink > 1:
                    group = inodes.setdefault(st.st_ino, rel)
                out[rel] = ("file", stat.S_IMODE(st.st_mode), data, st.st_mtime_ns if mtimes else 0,
                            st.st_uid, st.st_gid, group)
    return out


def make_rich_tree(root: str) -> None:
    """Every kind of entry kyrorepo preserves."""
    os.makedirs(os.path.join(root, "sub", "deeper"))
    os.makedirs(os.path.join(root, "empty_dir"))
    with open(os.path.join(root, "plain.txt"), "wb") as f:
        f.write(b"hello world\n" * 100)
    open(os.path.join(root, "empty_file"), "wb").close()
    with open(os.path.join(root, "sub", "deeper", "big.bin"), "wb") as f:
        f.write(os.urandom(3 * 1024 * 1024) + b"\0" * 1024 * 1024)
    with open(os.path.join(root, "sub", "ünïcødé ✓.txt"), "wb") as f:
        f.write("unicode content ✓".encode())
    with open(os.path.join(os.fsencode(root), b"bad-\xff\xfe-name"), "wb") as f:
        f.write(b"non-utf8 name")
    os.symlink("plain.txt", os.path.join(root, "link_to_plain"))
    os.symlink("/nonexistent/target", os.path.join(root, "dangling"))
    os.link(os.path.join(root, "plain.txt"), os.path.join(root, "sub", "hardlink.txt"))
    exe = os.path.join(root, "run.sh")
    with open(exe, "w") as f:
        f.write("#!/bin/sh\necho hi\n")
    os.chmod(exe, 0o750)
    os.chmod(os.path.join(root, "sub", "deeper"), 0o700)
    if os.geteuid() == 0:
        os.chown(os.path.join(root, "plain.txt"), 1234, 5678)
    os.utime(os.path.join(root, "empty_file"), ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    os.utime(os.path.join(root, "empty_dir"), ns=(1_500_000_000_000_000_001, 1_500_000_000_000_000_001))


def start_restore_over_old_content(cli, tmp_path, files: int):
    """Back up ``files`` files of 40 MiB of random bytes, then start (not wait for) a
    restore of them over a target holding one old file; return (process, target)."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(files):
        (data / f"f{i}").write_bytes(os.urandom(40 * 1024 * 1024))
    cli.run("backup", "--data-dir", str(data))
    target = tmp_path / "target"
    target.mkdir()
    (target / "old").write_text("old content")
    return cli.popen("restore", "--backup-id", "latest", "--data-dir", str(target), "--allow-clear"), target
