"""Verify's check of WAL captures (``walcaps/``): each decodes, and every blob it references
is indexed with its type (content lists are opened and walked like a file's).

Captures are loaded from the repository itself, never from a local catalog. Damage to a
capture's data is recorded against the capture and the segment; point-in-time recovery
past that capture then stops at the gap it leaves.
"""

from __future__ import annotations

from kyrorepo.errors import IntegrityError, NotFoundError
from kyrorepo.format import BlobType
from kyrorepo.repository import Repository
from kyrorepo.tree import FILE, Node, unpackb
from kyrorepo.verify_backups import BackupChecker
from kyrorepo.verify_report import DamageLedger, reason_of
from kyrorepo.wal.capture import Capture


def check_captures(repo: Repository, backups: BackupChecker, ledger: DamageLedger) -> int:
    """Check every capture; return how many were read."""
    count = 0
    for name in repo.object_names(BlobType.WALCAP):
        obj = f"WAL capture walcaps/{name}"
        try:
            cap = Capture.from_obj(unpackb(repo.load_object(BlobType.WALCAP, name), obj), name)
        except NotFoundError:
            continue  # removed meanwhile (prune)
        except IntegrityError as exc:
            ledger.add_damage(obj, reason_of(exc, f"walcaps/{name}") + ": its WAL is lost for point-in-time "
                              "recovery; restore the object from a copy of the repository")
            continue
        count += 1
        for seg in cap.stored:
            node = Node(name=seg.scan.relpath.encode(), type=FILE, size=seg.data.size, digest=seg.data.digest,
                        chunks=seg.data.chunks, content=seg.data.content)
            idx = backups.file_damage(node)
            if idx is not None:
                ledger.add_damage(obj, f"segment {seg.scan.relpath} is unreadable "
                                  f"({ledger.report.damage[idx].message})")
    return count
