"""What verify found: the report, its damage records, and the ledger that fills them.

Every damaged object is one ``Damage`` record, listed with the backups and files that
depend on it (at most ``FILES_CAP`` files each). Damaged blob ids live in the work index
(``WorkIndex.damaged``), pointing at their record, so memory holds only the damage found.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable

from kyrorepo.audit_log import DamageNote
from kyrorepo.errors import IntegrityError, KyroError
from kyrorepo.verify_index import WorkIndex

FILES_CAP = 1000  # affected files listed per damaged object (and remembered per tree)


@dataclass(frozen=True)
class RestoreDrill:
    """What the restore drill of one backup found (kyrorepo.verify_restore)."""

    backup_id: str
    files: int
    bytes: int
    ok: bool
    error: str = ""


@dataclass
class Damage:
    object: str
    reason: str
    blobs: int = 0  # blobs lost with it
    index_level: bool = False  # 'repair index' fixes it
    reference: bool = False  # references that are wrong (the blob they name is sound): 'repair snapshots' drops them
    pinned: bool = False  # its backups are known up front (a damaged backup object)
    backups: set[str] = field(default_factory=set)
    files: list[tuple[str, str]] = field(default_factory=list)  # (backup id, path), at most FILES_CAP
    files_total: int = 0

    @property
    def message(self) -> str:
        return f"{self.object}: {self.reason}"


@dataclass(frozen=True)
class Coverage:
    packs_total: int
    packs_covered: int
    bytes_total: int
    bytes_covered: int
    oldest_unchecked_pack: str | None
    oldest_unchecked_age: int | None  # seconds since it was last read (or first seen)

    @property
    def percent(self) -> float:
        return 100.0 if not self.packs_total else 100.0 * self.packs_covered / self.packs_total


@dataclass
class VerifyReport:
    repo_id: str
    mode: str
    keys: int = 0
    index_segments: int = 0
    packs: int = 0
    pack_bytes: int = 0
    unindexed_packs: int = 0
    backups: int = 0
    packs_checked: int = 0
    packs_resumed: int = 0
    blobs_checked: int = 0
    bytes_checked: int = 0
    damage: list[Damage] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    coverage: Coverage | None = None
    restore_tests: list[RestoreDrill] = field(default_factory=list)
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.damage

    def affected_backups(self) -> list[str]:
        return sorted({b for d in self.damage for b in d.backups})

    def affected_files(self) -> list[tuple[str, str]]:
        return sorted({f for d in self.damage for f in d.files})

    def hint(self) -> str:
        if any(d.index_level for d in self.damage):
            return "run 'kyrorepo repair index', then verify again"
        if any((d.blobs or d.reference) and d.backups for d in self.damage):
            return "run 'kyrorepo repair snapshots --dry-run' to see what a repair would drop"
        return "restore the damaged objects from a copy of the repository"

    def error(self) -> IntegrityError:
        first = self.damage[0].message
        return IntegrityError(
            f"verify found {len(self.damage)} damaged object(s) (first: {first}); "
            f"{len(self.affected_backups())} backup(s) and {len(self.affected_files())} file(s) affected: {self.hint()}"
        )


def reason_of(exc: KyroError, what: str) -> str:
    """An error's message without the object name it starts with."""
    msg = exc.message
    return msg[len(what):].lstrip(": ") if msg.startswith(what) else msg


def shown_path(p: bytes) -> str:
    return "/" if not p else os.fsdecode(p)


class DamageLedger:
    """Records damage in the report; remembers which blobs each record makes unreadable."""

    def __init__(self, report: VerifyReport, work: WorkIndex) -> None:
        self.report = report
        self.work = work
        self.new_blob_damage = False  # blob damage found by reading data (not by walking the backups)
        self._unindexed: int | None = None

    def add_damage(self, obj: str, reason: str, blobs: Iterable[bytes] = (), index_level: bool = False,
                   backup: str | None = None, reference: bool = False) -> int:
        idx = len(self.report.damage)
        d = Damage(obj, reason, index_level=index_level, pinned=backup is not None, reference=reference)
        if backup is not None:
            d.backups.add(backup)
        self.report.damage.append(d)
        for bid in blobs:
            if self.work.damage_of(bid) is None:
                self.work.set_damage(bid, idx)
                d.blobs += 1
        return idx

    def add_note(self, note: DamageNote) -> int:
        bid, obj, reason = note
        if bid:
            known = self.blob_damage(bid)
            if known is not None:
                return known  # already found reading trees and content lists
            self.new_blob_damage = True
        return self.add_damage(obj, reason, [bid] if bid else (), index_level=obj.startswith("index segment"))

    def add_unindexed(self, bid: bytes) -> int:
        """A referenced blob that no readable index segment lists."""
        if self._unindexed is None:
            # Only the index's fault when some packs are unindexed; else the data is gone.
            self._unindexed = self.add_damage("referenced blobs", "", index_level=self.report.unindexed_packs > 0)
        self.work.set_damage(bid, self._unindexed)
        self.report.damage[self._unindexed].blobs += 1
        return self._unindexed

    def blob_damage(self, bid: bytes) -> int | None:
        return self.work.damage_of(bid)

    def attribute(self, idx: int, backup: str, path: bytes) -> None:
        d = self.report.damage[idx]
        d.backups.add(backup)
        d.files_total += 1
        if len(d.files) < FILES_CAP:
            d.files.append((backup, shown_path(path)))

    def finish(self) -> None:
        """Word the unindexed-blobs record once their count is known."""
        if self._unindexed is not None:
            d = self.report.damage[self._unindexed]
            d.reason = (f"{d.blobs} blob(s) that backups reference are in no readable index segment: "
                        "'kyrorepo repair index' finds them if their packs exist, else they are lost")
