"""``python -m bench scale``: kyrorepo's phases against repositories already holding N GiB.

Each repository is pre-filled quickly (``bench.prefill``: synthetic incompressible
blobs, sealed and packed by the library, referenced by one snapshot), then the dataset
goes through the usual phases. Peak RSS and the phase times should not grow with N:
the index is an LMDB map looked up per block, and nothing loads the whole index.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from bench.phases import PHASE_TITLES, Sequence, cleanup, prepare, stderr_log
from bench.prefill import prefill
from bench.tools import PASSWORD, Kyrorepo, Tool

GIB = 1024 ** 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="Directory to back up (copied first).")
    p.add_argument("--sizes-gib", default="0,8", help="Repository sizes to pre-fill, in GiB.")
    p.add_argument("--work", help="Work directory (default: a new temp directory).")
    p.add_argument("--mutate-cmd", help="Shell command that mutates the copy; {data} is replaced by its path.")
    p.add_argument("--phases", default="first,incremental,nochange,restore",
                   help="Phases to run (check reads the whole repository, so it is left out by default).")
    p.add_argument("--keep", action="store_true", help="Keep the work directory.")


def run(args: argparse.Namespace) -> int:
    work = args.work or tempfile.mkdtemp(prefix="kyrorepo-bench-")
    sizes = [float(s) for s in args.sizes_gib.split(",")]
    tools: list[Tool] = [Kyrorepo(f"kyrorepo-{s:g}GiB", os.path.join(work, f"kyrorepo-{s:g}GiB")) for s in sizes]
    data, mutator = prepare(tools, args.data, work, args.mutate_cmd, stderr_log)
    fills = {}
    for tool, size in zip(tools, sizes):
        started = time.perf_counter()
        blobs = prefill(tool.repo, os.path.join(tool.home, "cache"), PASSWORD.encode(), int(size * GIB))
        fills[tool.name] = (blobs, time.perf_counter() - started, tool.repo_bytes())
        stderr_log(f"pre-filled {tool.name}: {blobs} blobs, {fills[tool.name][2] / 1e9:.2f} GB "
                   f"in {fills[tool.name][1]:.1f} s")
    phases = tuple(p for p in args.phases.split(",") if p)
    results = Sequence(tools, data, work).run(mutator, phases)
    print("| repository before | blobs before | phase | wall s | MB/s | CPU s | peak RSS MiB | peak anon MiB |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for tool in tools:
        blobs, _, size_bytes = fills[tool.name]
        for r in (r for r in results if r.tool == tool.name):
            print(f"| {size_bytes / GIB:.1f} GiB | {blobs} | {PHASE_TITLES[r.phase]} | {r.wall:.2f} | {r.mb_s:.0f} | "
                  f"{r.cpu:.2f} | {r.maxrss_mib:.0f} | {r.maxanon_mib:.0f} |")
    if not args.keep:
        cleanup(tools, work, created_work=not args.work)
    return 0
