"""The measuring process: runs one command and reports its wall time, CPU time and peak RSS.

Run as ``python -m bench.child SPEC OUT``. SPEC is a JSON file ``{"argv", "env", "cwd"}``;
OUT receives ``{"wall", "user", "sys", "maxrss_kib", "procmaxrss_kib", "treerss_kib",
"maxanon_kib", "procs", "returncode"}``.

The command may run worker processes (kyrorepo's restore and verify do), so every number
covers the whole process tree, not one process:

* This process is a child subreaper (Linux ``PR_SET_CHILD_SUBREAPER``): descendants whose
  parent exits before them are re-parented here and reaped here, so ``RUSAGE_CHILDREN``
  (user and system seconds) covers the command and every descendant.
* ``treerss_kib``: the peak of the sum of ``VmRSS`` over the command and its descendants,
  sampled every 10 ms; ``maxanon_kib`` likewise for ``RssAnon`` (anonymous memory, without
  file-backed pages such as a memory-mapped index). Pages shared between processes
  (libraries, copy-on-write) count once per process, so the sum is an upper bound.
* ``procmaxrss_kib``: ``ru_maxrss``, the exact peak of the largest single process.
* ``maxrss_kib``: the peak of the tree, the larger of the two above. For a command that
  is one process (restic, borg) it is exactly its ``ru_maxrss``.
* ``procs``: the most processes seen at once.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import subprocess
import sys
import time

SAMPLE_EVERY = 0.01
ORPHAN_WAIT = 30.0  # seconds to wait for descendants still running after the command exited
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
    except OSError:
        pass
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (this process: the command and any re-parented orphans)."""
    found, todo = [], children(pid)
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children(p))
    return found


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of ``pid`` in KiB; zeros once it has exited."""
    rss = anon = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
    except OSError:
        pass
    return rss, anon


def reap(cmd_pid: int) -> int | None:
    """Reap every exited child; return the command's exit code if it was among them."""
    code = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return code
        if pid == 0:
            return code
        if pid == cmd_pid:
            code = os.waitstatus_to_exitcode(status)


def main(argv: list[str]) -> int:
    spec_path, out_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    become_subreaper()
    started = time.perf_counter()
    proc = subprocess.Popen(spec["argv"], env=spec["env"], cwd=spec["cwd"])
    tree_rss = tree_anon = procs = 0
    code: int | None = None
    wall = 0.0
    orphans_until = 0.0
    while True:
        pids = descendants(os.getpid())
        sizes = [rss_kib(p) for p in pids]
        tree_rss = max(tree_rss, sum(s[0] for s in sizes))
        tree_anon = max(tree_anon, sum(s[1] for s in sizes))
        procs = max(procs, len([s for s in sizes if s[0]]))
        got = reap(proc.pid)
        if got is not None:
            code = got
            proc.returncode = got  # reaped here, not by Popen
            wall = time.perf_counter() - started
            orphans_until = time.monotonic() + ORPHAN_WAIT
        if code is not None and (not pids or time.monotonic() > orphans_until):
            break
        time.sleep(SAMPLE_EVERY)
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out_path, "w") as f:
        json.dump({"wall": wall, "user": ru.ru_utime, "sys": ru.ru_stime, "maxrss_kib": max(ru.ru_maxrss, tree_rss),
                   "procmaxrss_kib": ru.ru_maxrss, "treerss_kib": tree_rss, "maxanon_kib": tree_anon,
                   "procs": procs, "returncode": code}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
