"""The full data check of one pack, run in worker processes (kyrorepo.procpool) or threads.

A worker loads the whole pack, checks it against its name (unkeyed BLAKE3), reads its
trailer and opens, decompresses and re-hashes every indexed blob in it, then sends back
only what it found: counts, damage notes, and the indexed blobs the trailer does not
list. This module imports only what that needs, so worker processes stay small.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kyrorepo.errors import IntegrityError, KyroError, ObjectNotFoundError
from kyrorepo.format import PackEntry
from kyrorepo.pack import pack_id_of, pack_name, parse_pack
from kyrorepo.procpool import WorkerContext

Note = tuple[bytes, str, str]  # kyrorepo.audit_log.DamageNote: (blob id or b"", object, reason)


@dataclass(frozen=True)
class PackJob:
    pack_id: bytes
    size: int  # as listed
    entries: tuple[PackEntry, ...]  # the indexed blobs in it, in offset order


@dataclass
class PackFindings:
    """What checking a pack found; ``unlisted``: indexed blobs its trailer lacks (None: no trailer)."""

    blobs_ok: int = 0
    bytes_read: int = 0
    notes: list[Note] = field(default_factory=list)
    unlisted: tuple[PackEntry, ...] | None = None
    notice: str = ""


def reason_of(exc: KyroError, what: str) -> str:
    """An error's message without the object name it starts with (as kyrorepo.verify_report's)."""
    from kyrorepo.verify_report import reason_of as report_reason  # only on damage: a heavy import

    return report_reason(exc, what)


def scan_pack(ctx: WorkerContext, job: PackJob) -> PackFindings:
    """Read a whole pack: check it against its name, its trailer, and every blob in ``job.entries``."""
    name = pack_name(job.pack_id)
    obj = f"pack {name}"
    res = PackFindings()
    try:
        data = ctx.backend.load(name)
    except ObjectNotFoundError:
        res.notes.append((b"", obj, "is missing (it disappeared during verify)"))
        return res
    res.bytes_read = len(data)
    if len(data) != job.size:
        res.notes.append((b"", obj, f"has {len(data)} bytes, {job.size} were listed"))
    trailer: frozenset[PackEntry] | None = None
    try:
        trailer = frozenset(parse_pack(ctx.codec, data, name))
        res.unlisted = tuple(e for e in job.entries if e not in trailer)
    except IntegrityError as exc:
        res.notes.append((b"", obj, f"trailer is damaged ({reason_of(exc, name)})"))
    view = memoryview(data)
    for e in job.entries:
        what = f"{e.type.name.lower()} blob {e.id.hex()[:16]} in pack {name}"
        try:
            ctx.codec.decode(e.type, e.id, view[e.offset:e.offset + e.length], what)
            res.blobs_ok += 1
        except IntegrityError as exc:
            res.notes.append((e.id, what, reason_of(exc, what)))
    del view
    if pack_id_of(data) != job.pack_id and not res.notes:  # else the damage found explains it
        if trailer is not None and not trailer <= set(job.entries):
            res.notice = (f"{obj} does not match its name, but its damaged blobs are no longer indexed "
                          "('repair snapshots' dropped them): prune will remove it")
        else:
            res.notes.append((b"", obj, "content does not match its name, though every indexed blob in it "
                              "is intact: copy the pack from a copy of the repository"))
    return res
