"""The full data check of one pack, run in worker processes (kyrorepo.procpool) or threads.

A worker reads the whole pack in pieces, checks it against its name (unkeyed BLAKE3),
reads its trailer and opens, decompresses and re-hashes every indexed blob in it, then sends back
only what it found: counts, damage notes, and the indexed blobs the trailer does not
list. This module imports only what that needs, so worker processes stay small.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from kyrorepo.backends.base import load_view
from kyrorepo.errors import IntegrityError, KyroError, ObjectNotFoundError
from kyrorepo.format import PackEntry, decode_trailer
from kyrorepo.pack import pack_hasher, pack_name, read_trailer
from kyrorepo.procpool import WorkerContext

PIECE = 2 * 1024 * 1024  # bytes of a pack read at a time (a worker thread holds about two)
BATCH = 16  # blobs opened in one BlobCodec.decode_many call: their plaintexts are held together
Note = tuple[bytes, str, str]  # kyrorepo.audit_log.DamageNote: (blob id or b"", object, reason)


@dataclass(frozen=True)
class PackJob:
    pack_id: bytes
    size: int  # as listed
    listing: bytes  # the indexed blobs in it, encoded as a trailer (kyrorepo.format.encode_trailer)

    @cached_property
    def entries(self) -> tuple[PackEntry, ...]:
        """The indexed blobs, in offset order (decoded here: bytes cross the process boundary
        much faster than hundreds of pickled entries)."""
        return tuple(sorted(decode_trailer(self.listing, "verify job"), key=lambda e: e.offset))


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
    """Read a whole pack, ``PIECE`` bytes at a time: check it against its name, its trailer, and
    every blob in ``job.entries``.

    Memory does not grow with the pack size: a blob is opened as soon as its last byte is
    read, and only the bytes of blobs that straddle a piece boundary are carried over.
    """
    name = pack_name(job.pack_id)
    obj = f"pack {name}"
    missing = (b"", obj, "is missing (it disappeared during verify)")
    res = PackFindings()
    whole = pack_hasher(threads=False)  # the workers already keep every core busy
    entries = job.entries
    nxt = 0  # entries[nxt:] start beyond what was read so far
    open_: list[PackEntry] = []  # started, not complete
    carry = b""  # the pack's bytes from carry_at on, for the entries in open_
    carry_at = 0
    pos = 0  # pack offset of the next piece
    last: bytes | memoryview = b""  # the last piece read (from last_at on): the trailer is usually in it
    last_at = 0
    while True:
        try:
            piece = load_view(ctx.backend, name, pos, PIECE)  # valid until the next load_view
        except ObjectNotFoundError:
            res.notes.append(missing)
            return res
        if not piece:
            break
        whole.update(piece)
        view = memoryview(piece)
        end = pos + len(piece)
        while nxt < len(entries) and entries[nxt].offset < end:
            open_.append(entries[nxt])
            nxt += 1
        still: list[PackEntry] = []
        ready: list[tuple[PackEntry, bytes | memoryview]] = []
        for e in open_:
            if e.offset + e.length > end:
                still.append(e)
            elif e.offset >= pos:
                ready.append((e, view[e.offset - pos:e.offset + e.length - pos]))
            else:
                ready.append((e, carry[e.offset - carry_at:] + view[:e.offset + e.length - pos]))
        _check_blobs(ctx, res, ready, name)
        del ready
        open_ = still
        if open_:
            first = min(e.offset for e in open_)
            kept = carry[first - carry_at:] if first < pos else b""
            carry, carry_at = kept + bytes(view[max(first, pos) - pos:]), first
        else:
            carry, carry_at = b"", end
        del view
        last, last_at = piece, pos
        pos = end
        if len(piece) < PIECE:
            break
    res.bytes_read = pos
    # these reach beyond the end of the pack: opening them fails
    _check_blobs(ctx, res, [(e, carry[e.offset - carry_at:] if carry_at <= e.offset < pos else b"")
                            for e in [*open_, *entries[nxt:]]], name)
    if pos != job.size:
        res.notes.append((b"", obj, f"has {pos} bytes, {job.size} were listed"))
    trailer: frozenset[PackEntry] | None = None

    def tail(offset: int, length: int) -> bytes:
        if last_at <= offset and offset + length <= last_at + len(last):
            return bytes(last[offset - last_at:offset - last_at + length])
        return ctx.backend.load(name, offset, length)

    try:
        trailer = frozenset(read_trailer(ctx.codec, pos, tail, name))
        res.unlisted = tuple(e for e in job.entries if e not in trailer)
    except IntegrityError as exc:
        res.notes.append((b"", obj, f"trailer is damaged ({reason_of(exc, name)})"))
    except ObjectNotFoundError:
        res.notes.append(missing)
    if whole.digest() != job.pack_id and not res.notes:  # else the damage found explains it
        if trailer is not None and not trailer <= set(job.entries):
            res.notice = (f"{obj} does not match its name, but its damaged blobs are no longer indexed "
                          "('repair snapshots' dropped them): prune will remove it")
        else:
            res.notes.append((b"", obj, "content does not match its name, though every indexed blob in it "
                              "is intact: copy the pack from a copy of the repository"))
    return res


def _check_blobs(ctx: WorkerContext, res: PackFindings, ready: list[tuple[PackEntry, bytes | memoryview]],
                 name: str) -> None:
    """Open, decompress and re-hash the blobs in ``ready`` (every one of one type: packs hold
    one type of blob; a mixed list is checked type by type)."""
    def what(i: int) -> str:
        e = ready[i][0]
        return f"{e.type.name.lower()} blob {e.id.hex()[:16]} in pack {name}"

    for btype in dict.fromkeys(e.type for e, _ in ready):
        of_type = [i for i, (e, _) in enumerate(ready) if e.type == btype]
        for at in range(0, len(of_type), BATCH):
            idx = of_type[at:at + BATCH]
            found = ctx.codec.decode_many(btype, [(ready[i][0].id, ready[i][1]) for i in idx],
                                          lambda k: what(idx[k]))
            for k, got in zip(idx, found):
                if isinstance(got, IntegrityError):
                    res.notes.append((ready[k][0].id, what(k), reason_of(got, what(k))))
                else:
                    res.blobs_ok += 1
