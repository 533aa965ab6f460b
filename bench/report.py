"""Tables: per tool and phase, kyrorepo's ratio to each peer, and the issue's targets."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, fields

from bench.phases import PHASE_TITLES, PHASES, PhaseResult

RSS_LIMIT_MIB = 200.0
NUMERIC = [f.name for f in fields(PhaseResult) if f.name not in ("tool", "phase", "note")]


def median_results(runs: list[list[PhaseResult]]) -> list[PhaseResult]:
    """One result per (tool, phase): the median of every number over the runs."""
    groups: dict[tuple[str, str], list[PhaseResult]] = {}
    for run in runs:
        for r in run:
            groups.setdefault((r.tool, r.phase), []).append(r)
    out = []
    for (tool, phase), rs in groups.items():
        values = {n: statistics.median(getattr(r, n) for r in rs) for n in NUMERIC}
        notes = sorted({r.note for r in rs if r.note})
        out.append(PhaseResult(tool, phase, note="; ".join(notes), **values))  # type: ignore[arg-type]
    return out


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def results_table(results: list[PhaseResult]) -> str:
    head = ("| phase | tool | wall s | MB/s | CPU s | peak RSS MiB | peak anon MiB | repo MB | added MB | sync s |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = [head]
    for phase in PHASES:
        for r in (r for r in results if r.phase == phase):
            rows.append(f"| {PHASE_TITLES[phase]} | {r.tool} | {r.wall:.2f} | {r.mb_s:.0f} | {r.cpu:.2f} | "
                        f"{r.maxrss_mib:.0f} | {r.maxanon_mib:.0f} | {_mb(r.repo_bytes)} | {_mb(r.added_bytes)} | {r.sync_s:.2f} |")
    return "\n".join(rows)


def _find(results: list[PhaseResult], tool: str, phase: str) -> PhaseResult | None:
    return next((r for r in results if r.tool == tool and r.phase == phase), None)


def ratio_table(results: list[PhaseResult], ours: str = "kyrorepo") -> str:
    peers = sorted({r.tool for r in results} - {ours})
    if not peers or not any(r.tool == ours for r in results):
        return ""
    head = "| phase | " + " | ".join(f"speed vs {p}" for p in peers) + " |\n|---|" + "---:|" * len(peers)
    rows = [head]

    def row(title: str, phase: str, ratio: Callable[[PhaseResult, PhaseResult], float | None]) -> str:
        """``ratio(ours, the peer's)`` of one phase's results, for each peer ("-": not measured)."""
        cells = []
        for p in peers:
            m, t = _find(results, ours, phase), _find(results, p, phase)
            r = ratio(m, t) if m and t else None
            cells.append("-" if r is None else f"{r:.2f}x")
        return f"| {title} | " + " | ".join(cells) + " |"

    rows += [row(PHASE_TITLES[phase], phase, lambda m, t: t.wall / m.wall if m.wall > 0 else None)
             for phase in PHASES if _find(results, ours, phase)]
    rows.append(row("restore until on disk (wall + sync)", "restore",
                    lambda m, t: (t.wall + t.sync_s) / (m.wall + m.sync_s) if m.wall > 0 else None))
    rows.append(row("stored after first backup", "first",
                    lambda m, t: m.repo_bytes / t.repo_bytes if t.repo_bytes else None))
    rows.append(row("bytes added by the incremental", "incremental",
                    lambda m, t: m.added_bytes / t.added_bytes if t.added_bytes else None))
    rows.append("| peak RSS (max over phases) | " + " | ".join(
        f"{_max_rss(results, ours) / _max_rss(results, p):.2f}x" if _max_rss(results, p) else "-"
        for p in peers) + " |")
    return "\n".join(rows) + "\n\nspeed = peer wall time / kyrorepo wall time (above 1: kyrorepo is faster); " \
                             "until on disk adds the flush each restore left behind (kyrorepo syncs before it " \
                             "swaps, restic and borg do not); " \
                             "stored and added: kyrorepo / peer (below 1: kyrorepo stores less)."


def _max_rss(results: list[PhaseResult], tool: str) -> float:
    return max((r.maxrss_mib for r in results if r.tool == tool), default=0.0)


@dataclass(frozen=True)
class Target:
    text: str
    met: bool | None  # None: not measured
    detail: str


def targets(results: list[PhaseResult], ours: str = "kyrorepo", peer: str = "restic") -> list[Target]:
    """The issue's targets, judged on these results."""
    out: list[Target] = []

    def pair(phase: str) -> tuple[PhaseResult | None, PhaseResult | None]:
        return _find(results, ours, phase), _find(results, peer, phase)

    def speed(phase: str, factor: float, text: str) -> None:
        m, p = pair(phase)
        if m is None or p is None:
            out.append(Target(text, None, "not measured"))
            return
        ratio = p.wall / m.wall
        out.append(Target(text, ratio >= factor, f"{ratio:.2f}x ({m.wall:.2f} s vs {p.wall:.2f} s)"))

    speed("first", 2.0, f"first backup >= 2x {peer}'s throughput")
    m, p = pair("first")
    if m and p:
        r = m.repo_bytes / p.repo_bytes
        out.append(Target(f"stored size at most 10% above {peer}'s", r <= 1.10,
                          f"{r:.3f}x ({_mb(m.repo_bytes)} MB vs {_mb(p.repo_bytes)} MB)"))
    m, p = pair("incremental")
    if m and p:
        r = m.added_bytes / p.added_bytes if p.added_bytes else float("inf")
        out.append(Target(f"incremental stores <= 1/5 of {peer}'s added bytes", r <= 0.2,
                          f"1/{1 / r:.2f} ({_mb(m.added_bytes)} MB vs {_mb(p.added_bytes)} MB)"))
    speed("incremental", 1.0, f"incremental finishes faster than {peer}")
    speed("nochange", 1.0, f"no-change backup no slower than {peer}")
    speed("restore", 1.5, f"restore >= 1.5x {peer}")
    speed("check", 1.5, f"full check >= 1.5x {peer} (check --read-data)")
    worst = max((r for r in results if r.tool == ours), key=lambda r: r.maxrss_mib, default=None)
    if worst is not None:
        out.append(Target(f"peak RSS <= {RSS_LIMIT_MIB:.0f} MiB in every phase", worst.maxrss_mib <= RSS_LIMIT_MIB,
                          f"max {worst.maxrss_mib:.0f} MiB ({PHASE_TITLES[worst.phase]})"))
    return out


def targets_table(ts: list[Target]) -> str:
    rows = ["| target | met | measured |", "|---|---|---|"]
    for t in ts:
        met = "n/a" if t.met is None else ("yes" if t.met else "NO")
        rows.append(f"| {t.text} | {met} | {t.detail} |")
    return "\n".join(rows)
