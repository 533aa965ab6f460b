"""``python -m bench compare``: kyrorepo, restic and borg on the same data in one run."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile

from bench.phases import PHASES, Sequence, cleanup, prepare, stderr_log
from bench.report import (
    median_results,
    ratio_table,
    results_table,
    targets,
    targets_table,
)
from bench.tools import TOOLS, Tool


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="Directory to back up (copied into the work directory first).")
    p.add_argument("--tools", default="kyrorepo,restic,borg", help="Comma-separated tools (missing ones are skipped).")
    p.add_argument("--work", help="Work directory (default: a new directory under the system temp dir).")
    p.add_argument("--mutate-cmd", help="Shell command that mutates the copy; {data} is replaced by its path.")
    p.add_argument("--repeat", type=int, default=1, help="Run the whole sequence N times; report medians.")
    p.add_argument("--phases", default=",".join(PHASES), help=f"Subset of {','.join(PHASES)}.")
    p.add_argument("--drop-caches", action="store_true", help="Drop the page cache before every command (root).")
    p.add_argument("--no-verify-restore", action="store_true", help="Do not compare restored trees with the data.")
    p.add_argument("--kyrorepo-init", default="", help="Extra 'kyrorepo init' arguments, e.g. '--chunk-size 32K'.")
    p.add_argument("--json-out", help="Write every run's raw results to this JSON file.")
    p.add_argument("--keep", action="store_true", help="Keep the work directory (it is deleted after the last run).")


def make_tools(names: list[str], home: str, kyrorepo_init: str = "") -> list[Tool]:
    tools = []
    for name in names:
        if name not in TOOLS:
            raise SystemExit(f"unknown tool {name!r}: choose from {', '.join(TOOLS)}")
        tool = TOOLS[name](name, os.path.join(home, name),
                           tuple(kyrorepo_init.split()) if name == "kyrorepo" else ())
        if not tool.available():
            stderr_log(f"{name} is not installed: skipped")
            continue
        tools.append(tool)
    return tools


def machine() -> str:
    return f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.platform()}"


def run(args: argparse.Namespace) -> int:
    work = args.work or tempfile.mkdtemp(prefix="kyrorepo-bench-")
    used: list[tuple[list[Tool], str]] = []
    phases = tuple(p for p in args.phases.split(",") if p)
    runs = []
    tools: list[Tool] = []
    names = [t for t in args.tools.split(",") if t]
    for i in range(args.repeat):
        home = os.path.join(work, f"run{i + 1}")
        tools = make_tools(names, home, args.kyrorepo_init)
        used.append((tools, home))
        if not tools:
            raise SystemExit("no tool to run")
        turn = tools[i % len(tools):] + tools[:i % len(tools)]  # rotate who goes first
        stderr_log(f"run {i + 1}/{args.repeat} in {home}: {', '.join(t.name for t in turn)}")
        data, mutator = prepare(turn, args.data, home, args.mutate_cmd, stderr_log)
        seq = Sequence(turn, data, home, args.drop_caches, not args.no_verify_restore)
        runs.append(seq.run(mutator, phases))
    if not args.keep:
        for run_tools, home in used:
            cleanup(run_tools, home, created_work=True)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    results = median_results(runs)
    print(f"machine: {machine()}")
    print("tools: " + "; ".join(t.version() for t in tools))
    print(f"data: {args.data}; runs: {args.repeat} (medians)\n")
    print(results_table(results) + "\n")
    ratios = ratio_table(results)
    if ratios:
        print(ratios + "\n")
    if any(r.tool == "restic" for r in results):
        print(targets_table(targets(results)))
    notes = sorted({f"{r.tool} {r.phase}: {r.note}" for r in results if r.note})
    for n in notes:
        print(n)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"machine": machine(), "tools": [t.version() for t in tools], "data": args.data,
                       "runs": [[r.to_obj() for r in run_] for run_ in runs],
                       "median": [r.to_obj() for r in results]}, f, indent=1)
    return 0
