"""Shared fixtures: a CLI runner bound to a fresh repository and cache."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# A suite started as a background job of a non-interactive shell (`cmd &`) inherits SIGINT
# ignored, and so would every kyrorepo it starts: the tests that interrupt a command with
# SIGINT need it at its default, as in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

KYROREPO = [sys.executable, "-m", "kyrorepo"]
FAST_KDF = ["--kdf-memory-kib", "1024", "--kdf-iterations", "1"]


class Cli:
    """Runs the real kyrorepo command in a subprocess against one repository."""

    def __init__(self, repo: str, cache: str, password: str = "test-pass") -> None:
        self.repo = repo
        self.cache = cache
        self.env = dict(os.environ, KYROREPO_PASSWORD=password, KYROREPO_CACHE_DIR=cache)
        self.env.pop("BACKUP_ALLOW_CLEAR", None)
        self.env.pop("KYROREPO_REPO", None)

    def run(self, *args: str, expect: int | None = 0, env: dict | None = None, repo: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess:
        argv = list(args)
        if repo:
            argv += ["--repo", self.repo]
        proc = subprocess.run(KYROREPO + argv, capture_output=True, encoding="utf-8", errors="replace", env={**self.env, **(env or {})},
                              input=input, timeout=600)
        if expect is not None and proc.returncode != expect:
            raise AssertionError(f"kyrorepo {' '.join(argv)} exited {proc.returncode}, expected {expect}\n"
                                 f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def popen(self, *args: str, env: dict | None = None) -> subprocess.Popen:
        return subprocess.Popen(KYROREPO + list(args) + ["--repo", self.repo], env={**self.env, **(env or {})},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", errors="replace")

    def init(self, *extra: str, expect: int | None = 0) -> subprocess.CompletedProcess:
        return self.run("init", *FAST_KDF, *extra, expect=expect)


@pytest.fixture
def cli(tmp_path) -> Cli:
    return Cli(str(tmp_path / "repo"), str(tmp_path / "cache"))


@pytest.fixture
def repo_cli(cli) -> Cli:
    """A Cli whose repository is already initialised (1 MiB packs)."""
    cli.init("--pack-size", "1M")
    return cli
