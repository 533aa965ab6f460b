"""kyrorepo benchmarks: whole-tool comparisons against restic and borg, and micro-benchmarks.

Entry point (docs/performance.md has the measured tables and how to read them)::

    python -m bench compare --data DIR [--tools kyrorepo,restic,borg] [--work DIR]
                            [--mutate-cmd CMD] [--repeat N] [--drop-caches] [--json-out FILE]
    python -m bench scale --data DIR [--sizes-gib 0,8,32] [--work DIR]
    python -m bench chunksize --data DIR [--sizes 32K,64K] [--work DIR]

``compare`` copies DIR into the work directory (the user's data is never touched), then
runs every tool on that same copy, phase by phase: first backup, a mutation, the
incremental backup, a no-change backup, a restore of the latest backup and a full data
check. Each command runs in a fresh measuring process (``bench.child``) that reports the
command's wall time, CPU time and peak RSS. A tool that is not installed is skipped.

``scale`` repeats kyrorepo's phases against repositories pre-filled with N GiB, to show
that memory does not grow with the repository. ``chunksize`` measures the chunk size
trade-off (stored bytes after a mutation against first-backup throughput).

Micro-benchmarks (pytest-benchmark; not part of the main test suite)::

    pytest bench/ --benchmark-enable
"""
