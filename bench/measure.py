"""Run a command in a fresh measuring process (``bench.child``) and collect what it reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env: dict[str, str]
    cwd: str | None = None


@dataclass(frozen=True)
class Measurement:
    wall: float
    cpu: float  # user + system seconds of the command's process tree
    maxrss_mib: float
    maxanon_mib: float  # peak anonymous RSS (without file-backed pages), sampled
    returncode: int
    output: str  # stdout, then stderr


class CommandFailed(Exception):
    pass


def run_measured(cmd: Command, check: bool = True) -> Measurement:
    with tempfile.TemporaryDirectory(prefix="kyrorepo-bench-m-") as tmp:
        spec_path = os.path.join(tmp, "spec.json")
        out_path = os.path.join(tmp, "out.json")
        with open(spec_path, "w") as f:
            json.dump({"argv": cmd.argv, "env": cmd.env, "cwd": cmd.cwd}, f)
        env = dict(os.environ, PYTHONPATH=REPO_ROOT)
        proc = subprocess.run([sys.executable, "-m", "bench.child", spec_path, out_path], env=env,
                              capture_output=True, text=True, errors="replace", cwd=REPO_ROOT, check=False)
        if proc.returncode != 0 or not os.path.exists(out_path):
            raise CommandFailed(f"measuring process failed ({proc.returncode}): {proc.stderr.strip()}")
        with open(out_path) as f:
            r = json.load(f)
    m = Measurement(r["wall"], r["user"] + r["sys"], r["maxrss_kib"] / 1024, r["maxanon_kib"] / 1024,
                    r["returncode"], proc.stdout + proc.stderr)
    if check and m.returncode != 0:
        raise CommandFailed(f"{' '.join(cmd.argv)} exited {m.returncode}:\n{m.output[-3000:]}")
    return m


def run_quiet(cmd: Command) -> str:
    """Run an unmeasured helper command (init, mutate); return its stdout."""
    proc = subprocess.run(cmd.argv, env=cmd.env, cwd=cmd.cwd, capture_output=True, text=True, errors="replace", check=False)
    if proc.returncode != 0:
        raise CommandFailed(f"{' '.join(cmd.argv)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


def settle(drop_caches: bool) -> float:
    """Flush dirty pages (and drop the page cache when asked); return the seconds the flush took.

    Run between measured commands so that one tool's deferred writeback is not billed to
    the next; the flush time is reported beside the command it follows.
    """
    started = time.perf_counter()
    os.sync()
    took = time.perf_counter() - started
    if drop_caches:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    return took
