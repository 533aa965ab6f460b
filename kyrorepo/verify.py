"""Integrity checks of a repository (docs/integrity.md): composes the verify modules.

* Structure (always, ``verify_structure`` and ``verify_backups``): key objects parse,
  every index segment decodes, every indexed pack exists with the size the index records,
  every backup's trees and content lists decode and every blob they reference is indexed
  with the right type; pack trailers (the pack tail only) list every blob the index claims.
* Data (``full_scan`` or ``subset``, ``verify_data``): whole packs are read and checked
  against their name (unkeyed BLAKE3), and every indexed blob in them is opened,
  decompressed and re-hashed. Each pack read is recorded in the audit log
  (kyrorepo.audit_log): subset audits read the least recently checked packs first, and an
  interrupted full scan resumes.
* Restore drill (``restore_test``, ``verify_restore``): restore into a temporary directory
  and compare every file with its recorded digest.

Every damaged object is reported with the backups and files that depend on it
(``verify_report``).

Memory does not grow with the repository: verify's own view of the index lives in a
throwaway LMDB environment (``verify_index``); only the damage found is held in Python.
Packs are read and checked by a small thread pool with a bounded number of packs in flight.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

from kyrorepo.audit_log import AuditLog, PackRecord, ScanRun, open_audit_log
from kyrorepo.procpool import Runner
from kyrorepo.errors import IntegrityError
from kyrorepo.repository import Repository
from kyrorepo.snapshot import Snapshot
from kyrorepo.verify_backups import BackupChecker
from kyrorepo.verify_data import (
    PackResult,
    coverage,
    forget_absent,
    full_scan_run,
    resumable,
    scan_packs,
    scan_runner,
    subset_packs,
)
from kyrorepo.verify_index import WorkIndex
from kyrorepo.verify_options import VerifyOptions
from kyrorepo.verify_report import DamageLedger, RestoreDrill, VerifyReport
from kyrorepo.verify_structure import (
    check_cache,
    check_dictionaries,
    check_keys,
    check_presence,
    check_trailers,
    compare_listings,
    list_packs,
    load_segments,
)

class Verifier:
    """Runs the checks; ``repair`` reuses its findings (``ledger``, ``backups``, ``work``)."""

    def __init__(self, repo: Repository, opts: VerifyOptions) -> None:
        self.repo = repo
        self.opts = opts.validate()
        self.report = VerifyReport(repo.config.repo_id, opts.mode)
        self.work = WorkIndex(repo.cache_root, repo.config.repo_id)
        self.ledger = DamageLedger(self.report, self.work)
        self.backups = BackupChecker(repo, self.work, self.ledger, opts.backup_ids, opts.source)
        self.audit: AuditLog | None = None
        self.pool = ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="verify")
        self.window = 2 * opts.workers
        self.runner: Runner | None = None
        if self.opts.reads_data:
            self.runner = scan_runner(repo, self.pool, self.window)
        self.good_segments: list[str] = []
        self.snapshots: list[Snapshot] = []
        self.started_ns = time.time_ns()

    def __enter__(self) -> "Verifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.work.close()
        if self.audit is not None:
            self.audit.close()

    def run(self) -> VerifyReport:
        t0 = time.monotonic()
        check_keys(self.repo, self.ledger)
        check_dictionaries(self.repo, self.report.notices, self.ledger)
        list_packs(self.repo, self.work, self.report.notices)
        self.good_segments = load_segments(self.repo, self.work, self.ledger)
        check_presence(self.work, self.ledger)
        self.snapshots = self.backups.load_backups()
        self.audit = open_audit_log(self.repo.cache_root, self.repo.config.repo_id)
        if self.opts.full_scan and not self.opts.backup_ids:
            # the scope is every pack: the workers start on the first packs while this
            # process walks the backups and checks its index cache
            self.scan_data(meanwhile=self.structure_rest)
        else:
            self.structure_rest()  # the scope of chosen backups is known once they are walked
            if not self.opts.full_scan:
                check_trailers(self.repo, self.work, self.ledger, self.pool, self.iter_scope(), 4 * self.window)
            if self.opts.reads_data:
                self.scan_data()
        if self.ledger.new_blob_damage:
            self.backups.reattribute(self.snapshots)
        if not self.opts.backup_ids:
            from kyrorepo.verify_captures import check_captures  # imported here: it brings the WAL modules

            n = check_captures(self.repo, self.backups, self.ledger)
            if n:
                self.report.notices.append(f"{n} WAL capture(s) checked")
        self.report.coverage = coverage(self.audit, self.iter_scope(), self.started_ns)
        if not self.opts.backup_ids:
            forget_absent(self.audit, self.work)
        if self.opts.restore_test:
            for snap in self.drill_targets():
                self.report.restore_tests.append(self.drill(snap))
        self.ledger.finish()
        self.report.duration = time.monotonic() - t0
        return self.report

    def structure_rest(self) -> None:
        """Which backups and files depend on the damage found so far, and the index cache check.

        Damage that reading the data finds later is attributed again at the end
        (``BackupChecker.reattribute``), so this may run while the first packs are read."""
        for snap in self.snapshots:
            self.backups.attribute_backup(snap)
        check_cache(self.repo, self.work, self.good_segments, self.report.notices)

    def iter_scope(self) -> Iterator[tuple[bytes, int]]:
        """(pack id, size) of every present pack in scope: all, or those the chosen backups use."""
        for pid, size in self.work.sizes(self.work.ok_packs):
            if not self.opts.backup_ids or self.work.get(self.work.needed, pid) is not None:
                yield pid, size

    # --- data ---------------------------------------------------------------------------------

    def scope_key(self) -> str:
        return "all" if not self.opts.backup_ids else ",".join(sorted(s.id for s in self.snapshots))

    def scan_data(self, meanwhile: Callable[[], None] | None = None) -> None:
        """Read the packs in scope; ``meanwhile`` runs once the workers have their first packs,
        before any result is taken."""
        assert self.audit is not None
        run: ScanRun | None = None
        if self.opts.full_scan:
            run, resuming = full_scan_run(self.audit, self.scope_key(), self.started_ns, self.opts.resume)
            if resuming:
                self.started_ns = run.started_ns
            elif self.opts.resume:
                self.report.notices.append("no interrupted full scan of these backups to resume: scanning all")
            packs: Iterator[tuple[bytes, int]] = resumable(self.audit, self.iter_scope(), run, self.resumed)
        else:
            assert self.opts.subset is not None
            packs = subset_packs(self.audit, self.work, self.iter_scope(), self.opts.subset)
        jobs = ((pid, size, self.work.job_listing(pid)) for pid, size in packs)
        assert self.runner is not None
        results = scan_packs(self.runner, jobs)
        if meanwhile is not None:
            first = next(results, None)  # the workers' queues are full when it comes
            meanwhile()
            if first is not None:
                self.take(first)
        for res in results:
            self.take(res)
        if run is not None:
            self.audit.finish_scan(run)

    def resumed(self, rec: PackRecord) -> None:
        """A pack the interrupted scan read: report what it found then."""
        self.report.packs_resumed += 1
        for note in rec.damage:
            self.ledger.add_note(note)

    def take(self, res: PackResult) -> None:
        assert self.audit is not None
        notes = list(res.notes)
        if res.trailer is not None and self.opts.full_scan:  # subset audits compared every trailer already
            notes += compare_listings(self.work, res.pack_id, res.trailer)
        for note in notes:
            self.ledger.add_note(note)
        if res.notice:
            self.report.notices.append(res.notice)
        self.audit.record(res.pack_id, not notes, notes, time.time_ns())
        self.report.packs_checked += 1
        self.report.blobs_checked += res.blobs_ok
        self.report.bytes_checked += res.bytes_read
        if self.opts.progress:
            self.opts.progress(res.bytes_read, 0)

    # --- restore drills --------------------------------------------------------------------------

    def drill_targets(self) -> list[Snapshot]:
        if self.opts.backup_ids:
            return self.snapshots
        return [s for s in self.snapshots if s.id in set(self.backups.latest([x.id for x in self.snapshots]))]

    def drill(self, snap: Snapshot) -> RestoreDrill:
        from kyrorepo.verify_restore import restore_and_compare  # imported here: it brings restore's modules

        obj = f"backup {snap.short_id}"
        try:
            result, problems = restore_and_compare(self.repo, snap, self.opts.workers, self.opts.restore_dir)
        except IntegrityError as exc:
            self.ledger.add_damage(obj, f"restore test failed: {exc.message}", backup=snap.id)
            return RestoreDrill(snap.id, 0, 0, False, exc.message)
        for path, problem in problems:
            idx = self.ledger.add_damage(obj, f"restore test: {path} {problem}", backup=snap.id)
            self.ledger.attribute(idx, snap.id, os.fsencode(path))
        return RestoreDrill(snap.id, result.files, result.bytes, not problems,
                            problems[0][1] if problems else "")


def run_verify(repo: Repository, opts: VerifyOptions) -> VerifyReport:
    """Verify ``repo``; the caller holds a shared lock."""
    with Verifier(repo, opts) as v:
        return v.run()
