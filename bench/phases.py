"""The measured sequence: first backup, mutation, incremental, no-change, restore, check.

Tools take turns within each phase, on the same copy of the data, so that every tool
sees the same bytes and the same machine state (a noisy neighbour hurts all of them in
the same phase); with ``--repeat`` the order rotates from run to run. Between measured
commands dirty pages are flushed (``settle``); nothing is deleted until a run is over.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

from bench.dataset import Mutator, copy_data, find_mutator, logical_bytes, same_tree
from bench.measure import Command, Measurement, run_measured, run_quiet, settle
from bench.tools import Tool

PHASES = ("first", "incremental", "nochange", "restore", "check")
PHASE_TITLES = {
    "first": "first backup",
    "incremental": "incremental after mutate",
    "nochange": "no-change backup",
    "restore": "restore latest",
    "check": "full data check",
}

Log = Callable[[str], None]


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class PhaseResult:
    tool: str
    phase: str
    wall: float
    cpu: float
    maxrss_mib: float
    maxanon_mib: float  # peak anonymous RSS, without file-backed pages (the mapped index)
    data_bytes: int  # logical bytes of the data the phase covers (for MB/s)
    repo_bytes: int  # repository size after the phase
    added_bytes: int  # repository growth during the phase
    sync_s: float  # flushing the writes the command left in the page cache
    note: str = ""

    @property
    def mb_s(self) -> float:
        return self.data_bytes / 1e6 / self.wall if self.wall > 0 else 0.0

    def to_obj(self) -> dict[str, object]:
        d = asdict(self)
        d["mb_s"] = round(self.mb_s, 1)
        return d


@dataclass
class Sequence:
    tools: list[Tool]
    data: str  # the private copy
    work: str
    drop_caches: bool = False
    verify_restore: bool = True
    log: Log = stderr_log

    def measure(self, tool: Tool, phase: str, cmd: Command, data_bytes: int) -> PhaseResult:
        before = tool.repo_bytes()
        self.log(f"  {tool.name:9s} {PHASE_TITLES[phase]} ...")
        m: Measurement = run_measured(cmd)
        sync_s = settle(self.drop_caches)
        after = tool.repo_bytes()
        r = PhaseResult(tool.name, phase, m.wall, m.cpu, m.maxrss_mib, m.maxanon_mib, data_bytes, after, after - before,
                        sync_s)
        self.log(f"  {tool.name:9s} {PHASE_TITLES[phase]}: {m.wall:.2f} s ({r.mb_s:.0f} MB/s), cpu {m.cpu:.2f} s, "
                 f"rss {m.maxrss_mib:.0f} MiB (anon {m.maxanon_mib:.0f}), repo {after / 1e6:.1f} MB (+{(after - before) / 1e6:.1f})")
        return r

    def backups(self, phase: str) -> list[PhaseResult]:
        size = logical_bytes(self.data)
        return [self.measure(t, phase, t.backup(self.data), size) for t in self.tools]

    def restores(self) -> list[PhaseResult]:
        out = []
        size = logical_bytes(self.data)
        for t in self.tools:
            target = os.path.join(self.work, f"restore-{t.name}")
            if os.path.lexists(target):
                shutil.rmtree(target)
            if t.name == "borg":
                os.makedirs(target)
            r = self.measure(t, "restore", t.restore(target, self.data), size)
            if self.verify_restore:
                diff = same_tree(self.data, t.restored_root(target, self.data))
                r.note = "restored copy identical" if diff is None else f"RESTORED COPY DIFFERS: {diff}"
                self.log(f"  {t.name:9s} {r.note}")
            # Restored trees stay until the run is over: deleting thousands of files just
            # before the next tool's restore bills it for the file system's clean-up (on
            # ext4 with online discard, block allocation stalls behind freed blocks).
            settle(self.drop_caches)
            out.append(r)
        return out

    def checks(self) -> list[PhaseResult]:
        out = []
        size = logical_bytes(self.data)
        for t in self.tools:
            cmd = t.check()
            if cmd is None:
                self.log(f"  {t.name:9s} has no full data check: skipped")
                continue
            out.append(self.measure(t, "check", cmd, size))
        return out

    def run(self, mutator: Mutator | None, phases: tuple[str, ...] = PHASES) -> list[PhaseResult]:
        results: list[PhaseResult] = []
        settle(self.drop_caches)
        self.log("first backup")
        results += self.backups("first")
        if "incremental" in phases:
            if mutator is None:
                self.log("no way to mutate this data (give --mutate-cmd): incremental phase skipped")
            else:
                self.log(f"mutating the copy: {mutator.description}")
                mutator.run(self.data)
                settle(self.drop_caches)
                results += self.backups("incremental")
        if "nochange" in phases:
            self.log("no-change backup")
            results += self.backups("nochange")
        if "restore" in phases:
            self.log("restore")
            results += self.restores()
        if "check" in phases:
            self.log("full data check")
            results += self.checks()
        return results


def cleanup(tools: list[Tool], work: str, created_work: bool) -> None:
    """Remove what the bench created: the tools' homes, the data copy, restored trees."""
    for t in tools:
        shutil.rmtree(t.home, ignore_errors=True)
        shutil.rmtree(os.path.join(work, f"restore-{t.name}"), ignore_errors=True)
    shutil.rmtree(os.path.join(work, "data"), ignore_errors=True)
    if created_work:
        shutil.rmtree(work, ignore_errors=True)


def prepare(tools: list[Tool], src: str, work: str, mutate_cmd: str | None, log: Log) -> tuple[str, Mutator | None]:
    """Copy ``src`` into ``work``, create every tool's repository; return (copy, mutator)."""
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, "data")
    log(f"copying {src} to {data}")
    copy_data(src, data)
    for t in tools:
        if os.path.lexists(t.home):
            shutil.rmtree(t.home)
        os.makedirs(t.home)
        run_quiet(t.init())
    return data, find_mutator(data, mutate_cmd)
