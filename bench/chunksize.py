"""``python -m bench chunksize``: the chunk size trade-off, measured on a mutation.

Smaller chunks store less after a scattered rewrite (a changed 8 KiB page renews about
two chunks) but compress worse (zstd sees less context per chunk) and cost more per
byte (more ids, lookups and blobs). Each size (and zstd level) gets its own repository;
all take turns on the same copy of the data, so they see identical mutations.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from bench.phases import Sequence, cleanup, prepare, stderr_log
from bench.tools import Kyrorepo, Tool


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="Directory to back up (copied first).")
    p.add_argument("--sizes", default="32K,64K", help="Nominal average chunk sizes (powers of two).")
    p.add_argument("--levels", default="3", help="zstd levels to combine with every size.")
    p.add_argument("--work", help="Work directory (default: a new temp directory).")
    p.add_argument("--mutate-cmd", help="Shell command that mutates the copy; {data} is replaced by its path.")
    p.add_argument("--keep", action="store_true", help="Keep the work directory.")


def run(args: argparse.Namespace) -> int:
    work = args.work or tempfile.mkdtemp(prefix="kyrorepo-bench-")
    tools: list[Tool] = []
    for size in args.sizes.split(","):
        for level in args.levels.split(","):
            name = f"kyrorepo-{size}-z{level}"
            tools.append(Kyrorepo(name, os.path.join(work, name),
                                  ("--chunk-size", size, "--compression", f"zstd:{level}")))
    data, mutator = prepare(tools, args.data, work, args.mutate_cmd, stderr_log)
    results = Sequence(tools, data, work).run(mutator, ("first", "incremental"))
    print("| chunk size | zstd | first backup s | MB/s | CPU s | stored MB | incremental s | added MB | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in tools:
        first = next(r for r in results if r.tool == t.name and r.phase == "first")
        incr = next((r for r in results if r.tool == t.name and r.phase == "incremental"), None)
        _, size, level = t.name.split("-")
        print(f"| {size} | {level[1:]} | {first.wall:.2f} | {first.mb_s:.0f} | {first.cpu:.2f} | "
              f"{first.repo_bytes / 1e6:.1f} | " + (f"{incr.wall:.2f} | {incr.added_bytes / 1e6:.1f} | "
                                                    if incr else "- | - | ")
              + f"{max(first.maxrss_mib, incr.maxrss_mib if incr else 0):.0f} |")
    if not args.keep:
        cleanup(tools, work, created_work=not args.work)
    return 0
