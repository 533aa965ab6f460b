"""The backup tools under comparison, each driven through its own command line.

Every tool runs with its defaults except where a choice is required:
* kyrorepo: ``init`` defaults (chunk size, zstd level, Argon2id key), run with the
  interpreter running the bench (``python -m kyrorepo``).
* restic: repository format 2 with ``auto`` compression (restic >= 0.14 defaults).
* borg: ``--encryption repokey-blake2`` (borg requires a choice; this is its fast
  authenticated mode), default ``lz4`` compression.
Caches and keys live in the tool's own directory under the work directory.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field

from bench.measure import REPO_ROOT, Command
from kyrorepo.backup import dir_bytes

PASSWORD = "kyrorepo-bench"


def _base_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER", "KYROREPO_DIRECT_IO")
    return {k: os.environ[k] for k in keep if k in os.environ}


@dataclass
class Tool:
    """One tool with its repository under ``home``."""

    name: str
    home: str
    init_args: tuple[str, ...] = ()
    archives: int = field(default=0)

    @property
    def repo(self) -> str:
        return os.path.join(self.home, "repo")

    def available(self) -> bool:
        raise NotImplementedError

    def version(self) -> str:
        raise NotImplementedError

    def init(self) -> Command:
        raise NotImplementedError

    def backup(self, data: str) -> Command:
        raise NotImplementedError

    def restore(self, target: str, data: str) -> Command:
        """Restore the latest backup of ``data`` into the empty directory ``target``."""
        raise NotImplementedError

    def check(self) -> Command | None:
        """A full data check (every byte read and authenticated), or None when there is none."""
        raise NotImplementedError

    def restored_root(self, target: str, data: str) -> str:
        """Where the restored copy of ``data`` lies below ``target``."""
        raise NotImplementedError

    def repo_bytes(self) -> int:
        return dir_bytes(self.repo)


class Kyrorepo(Tool):
    def _cmd(self, *args: str, cwd: str | None = None) -> Command:
        env = dict(_base_env(), KYROREPO_PASSWORD=PASSWORD, KYROREPO_CACHE_DIR=os.path.join(self.home, "cache"),
                   PYTHONPATH=REPO_ROOT)
        return Command([sys.executable, "-m", "kyrorepo", *args], env, cwd)

    def available(self) -> bool:
        return subprocess.run(self._cmd("--version").argv, env=self._cmd().env, capture_output=True, check=False).returncode == 0

    def version(self) -> str:
        out = subprocess.run(self._cmd("--version").argv, env=self._cmd().env, capture_output=True, text=True, check=False).stdout
        return out.strip()

    def has_verify(self) -> bool:
        c = self._cmd("verify", "--help")
        proc = subprocess.run(c.argv, env=c.env, capture_output=True, text=True, check=False)
        return proc.returncode == 0 and "--full-scan" in proc.stdout

    def init(self) -> Command:
        return self._cmd("init", "--repo", self.repo, *self.init_args)

    def backup(self, data: str) -> Command:
        return self._cmd("backup", "--repo", self.repo, "--data-dir", data, "--json")

    def restore(self, target: str, data: str) -> Command:
        return self._cmd("restore", "--repo", self.repo, "--backup-id", "latest", "--data-dir", target,
                         "--source", f"{socket.gethostname()}:{os.path.abspath(data)}", "--allow-clear")

    def check(self) -> Command | None:
        return self._cmd("verify", "--repo", self.repo, "--full-scan") if self.has_verify() else None

    def restored_root(self, target: str, data: str) -> str:
        return target


class Restic(Tool):
    def _cmd(self, *args: str, cwd: str | None = None) -> Command:
        env = dict(_base_env(), RESTIC_PASSWORD=PASSWORD, RESTIC_CACHE_DIR=os.path.join(self.home, "cache"))
        return Command(["restic", "--repo", self.repo, *args], env, cwd)

    def available(self) -> bool:
        return shutil.which("restic") is not None

    def version(self) -> str:
        out = subprocess.run(["restic", "version"], capture_output=True, text=True, check=False).stdout
        m = re.search(r"restic (\S+)", out)
        return f"restic {m.group(1)}" if m else "restic"

    def init(self) -> Command:
        return self._cmd("init", *self.init_args)

    def backup(self, data: str) -> Command:
        return self._cmd("backup", "--quiet", data)

    def restore(self, target: str, data: str) -> Command:
        return self._cmd("restore", "latest", "--path", os.path.abspath(data), "--target", target)

    def check(self) -> Command | None:
        return self._cmd("check", "--read-data")

    def restored_root(self, target: str, data: str) -> str:
        return os.path.join(target, os.path.abspath(data).lstrip("/"))


class Borg(Tool):
    def _cmd(self, *args: str, cwd: str | None = None) -> Command:
        env = dict(_base_env(), BORG_PASSPHRASE=PASSWORD, BORG_BASE_DIR=os.path.join(self.home, "base"),
                   BORG_RELOCATED_REPO_ACCESS_IS_OK="yes", BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes")
        return Command(["borg", *args], env, cwd)

    def available(self) -> bool:
        return shutil.which("borg") is not None

    def version(self) -> str:
        return subprocess.run(["borg", "--version"], capture_output=True, text=True, check=False).stdout.strip()

    def init(self) -> Command:
        args = self.init_args or ("--encryption", "repokey-blake2")
        return self._cmd("init", *args, self.repo)

    def backup(self, data: str) -> Command:
        self.archives += 1
        return self._cmd("create", f"{self.repo}::b{self.archives}", os.path.abspath(data))

    def restore(self, target: str, data: str) -> Command:
        return self._cmd("extract", f"{self.repo}::b{self.archives}", cwd=target)

    def check(self) -> Command | None:
        return self._cmd("check", "--verify-data", self.repo)

    def restored_root(self, target: str, data: str) -> str:
        return os.path.join(target, os.path.abspath(data).lstrip("/"))


TOOLS: dict[str, type[Tool]] = {"kyrorepo": Kyrorepo, "restic": Restic, "borg": Borg}
