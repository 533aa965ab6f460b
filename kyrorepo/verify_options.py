"""What a check is asked to do: ``VerifyOptions`` and ``--read-data-subset``'s ``Subset``.

Kept apart from the verify modules so the CLI can check its arguments before the passphrase
is stretched and import those modules while it is (``kyrorepo.opening``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from kyrorepo.errors import UsageError

DEFAULT_WORKERS = 4

Progress = Callable[[int, int], None]  # (bytes read delta, files delta: always 0 here)


@dataclass(frozen=True)
class Subset:
    """``percent`` of the packs (least recently checked first), or group n of m (by pack id)."""

    percent: float | None = None
    group: tuple[int, int] | None = None


def parse_subset(text: str) -> Subset:
    t = text.strip()
    try:
        if t.endswith("%"):
            pct = float(t[:-1])
            if 0 < pct <= 100:
                return Subset(percent=pct)
        elif "/" in t:
            n, m = (int(x) for x in t.split("/", 1))
            if 1 <= n <= m:
                return Subset(group=(n, m))
    except ValueError:
        pass
    raise UsageError(f"read-data-subset {text!r} is not understood: use N% (0 < N <= 100) or N/M (1 <= N <= M)")


@dataclass
class VerifyOptions:
    backup_ids: tuple[str, ...] = ()
    source: str | None = None
    full_scan: bool = False
    subset: Subset | None = None
    resume: bool = False
    restore_test: bool = False
    restore_dir: str | None = None
    workers: int = DEFAULT_WORKERS
    progress: Progress | None = None

    def validate(self) -> "VerifyOptions":
        if self.subset is not None and (self.full_scan or self.resume):
            raise UsageError("--read-data-subset audits part of the data: do not combine it with --full-scan or --resume")
        if self.resume:
            self.full_scan = True
        if self.workers < 1:
            raise UsageError(f"--workers {self.workers} must be at least 1")
        return self

    @property
    def reads_data(self) -> bool:
        """Whether packs are read (a full scan or a subset audit), by worker processes when the
        backend can be reopened in them."""
        return self.full_scan or self.subset is not None

    @property
    def mode(self) -> str:
        return "full-scan" if self.full_scan else "subset" if self.subset is not None else "structure"
