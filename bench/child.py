"""The measuring process: runs one command and reports its wall time, CPU time and peak RSS.

Run as ``python -m bench.child SPEC OUT``. SPEC is a JSON file ``{"argv", "env", "cwd"}``;
OUT receives ``{"wall", "user", "sys", "maxrss_kib", "maxanon_kib", "returncode"}``. Being a
fresh process, its ``RUSAGE_CHILDREN`` counters cover exactly the command and the
processes it waited for; ``maxrss`` is that of the largest of them (Linux reports the
largest descendant, not a sum), which for restic, borg and kyrorepo is the tool's one
process. ``maxanon`` is the peak of the command's ``RssAnon`` (its own anonymous memory,
without file-backed pages such as a memory-mapped index), sampled every 10 ms.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

SAMPLE_EVERY = 0.01


def rss_anon_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def main(argv: list[str]) -> int:
    spec_path, out_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    started = time.perf_counter()
    proc = subprocess.Popen(spec["argv"], env=spec["env"], cwd=spec["cwd"])
    maxanon = 0
    while proc.poll() is None:
        maxanon = max(maxanon, rss_anon_kib(proc.pid))
        time.sleep(SAMPLE_EVERY)
    wall = time.perf_counter() - started
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out_path, "w") as f:
        json.dump({"wall": wall, "user": ru.ru_utime, "sys": ru.ru_stime, "maxrss_kib": ru.ru_maxrss,
                   "maxanon_kib": maxanon, "returncode": proc.returncode}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
