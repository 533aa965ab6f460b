"""The backups verify checks, and what in them depends on damage.

Backup objects are loaded once each; their trees and content lists are loaded through
verify's own view of the index (never the local cache) and decoded; every blob they
reference must be indexed, as any type (docs/format.md, "Blob ids and types"). Each
tree's and content list's result is remembered in the work index (``memo``), so trees
shared by several backups are walked once. Damage found is attributed to the backups and
files that depend on it. ``repair snapshots`` reuses these findings to rewrite damaged
backups.
"""

from __future__ import annotations

import msgpack

from kyrorepo.errors import IntegrityError, NotFoundError, ObjectNotFoundError
from kyrorepo.format import BlobType
from kyrorepo.pack import pack_name
from kyrorepo.repository import Repository
from kyrorepo.snapshot import Snapshot, load_snapshot
from kyrorepo.tree import DIR, FILE, Node, decode_content, decode_tree
from kyrorepo.verify_index import U32, WorkIndex
from kyrorepo.verify_report import FILES_CAP, DamageLedger, reason_of


class Lost(Exception):
    """A blob cannot be read; ``idx`` is the damage record it belongs to."""

    def __init__(self, idx: int) -> None:
        super().__init__(idx)
        self.idx = idx


def _age_key(s: Snapshot) -> tuple[int, int, str]:
    return s.time, s.end_time, s.id


class BackupChecker:
    """Loads the chosen backups and finds the damage below their trees."""

    def __init__(self, repo: Repository, work: WorkIndex, ledger: DamageLedger, backup_ids: tuple[str, ...],
                 source: str | None) -> None:
        self.repo = repo
        self.work = work
        self.ledger = ledger
        self.backup_ids = backup_ids
        self.source = source
        self._loaded: dict[str, Snapshot | None] = {}
        self._misread: dict[bytes, int] = {}  # see ``misread``
        self._record_needed = True
        self._last_needed = b""  # the pack last recorded as needed

    # --- backup objects -------------------------------------------------------------------

    def load_one(self, name: str) -> Snapshot | None:
        if name not in self._loaded:
            what = f"backup object snapshots/{name}"
            try:
                self._loaded[name] = load_snapshot(self.repo, name)
            except NotFoundError:
                self._loaded[name] = None
            except IntegrityError as exc:
                self._loaded[name] = None
                self.ledger.add_damage(what, reason_of(exc, f"snapshots/{name}") + ": the whole backup is "
                                       "unreadable; restore the object from a copy of the repository", backup=name)
        return self._loaded[name]

    def latest(self, names: list[str]) -> list[str]:
        newest: dict[str, Snapshot] = {}
        for name in names:
            s = self.load_one(name)
            if s is None or self.source not in (None, s.source):
                continue
            if s.source not in newest or _age_key(s) > _age_key(newest[s.source]):
                newest[s.source] = s
        if not newest:
            raise NotFoundError("no readable backups to choose 'latest' from: run 'kyrorepo list'")
        return [s.id for s in newest.values()]

    def load_backups(self) -> list[Snapshot]:
        """The chosen backups (all without ``backup_ids``) that can be read."""
        names = self.repo.object_names(BlobType.SNAPSHOT)
        chosen: list[str] = []
        for ref in self.backup_ids or ():
            chosen += self.latest(names) if ref == "latest" else [
                self.repo.resolve_object(BlobType.SNAPSHOT, ref, "backup")]
        snaps = [self.load_one(n) for n in (dict.fromkeys(chosen) if self.backup_ids else names)]
        self.ledger.report.backups = len(snaps)
        return [s for s in snaps if s is not None]

    # --- attribution ------------------------------------------------------------------------

    def attribute_backup(self, snap: Snapshot) -> None:
        for path, idx in self.tree_damage(snap.tree):
            self.ledger.attribute(idx, snap.id, path)

    def reattribute(self, snaps: list[Snapshot]) -> None:
        """Blob damage found by reading data: walk the backups again to find who depends on it."""
        self.work.clear(self.work.memo)
        for d in self.ledger.report.damage:
            if not d.pinned:
                d.backups.clear()
                d.files.clear()
                d.files_total = 0
        self._record_needed = False
        for snap in snaps:
            self.attribute_backup(snap)

    # --- trees and content lists ----------------------------------------------------------------

    def ref_damage(self, bid: bytes) -> int | None:
        """The damage a referenced blob belongs to, or None when it is indexed. Its indexed type
        may differ from the reference's: a chunk, a tree and a content list with the same
        plaintext have the same id and are stored once (docs/format.md, "Blob ids and types")."""
        idx = self.ledger.blob_damage(bid)
        if idx is not None:
            return idx
        pack_id = self.work.pack_of(bid)
        if pack_id is None:
            return self.ledger.add_unindexed(bid)
        self._need(pack_id)
        return None

    def _need(self, pack_id: bytes) -> None:
        """Record that the chosen backups need ``pack_id`` (a file's chunks share packs)."""
        if self._record_needed and pack_id != self._last_needed:
            self.work.put(self.work.needed, pack_id, b"")
            self._last_needed = pack_id

    def chunks_damage(self, bids: list[bytes]) -> int | None:
        """``ref_damage`` of every data chunk in ``bids`` (each damaged one is recorded): the first
        damage, or None. While no damage is known, the chunks are looked up together and only
        those not indexed take ``ref_damage``'s way (which records them)."""
        if self.work.any_damage:
            damage = [self.ref_damage(bid) for bid in bids]
            return next((i for i in damage if i is not None), None)
        first = None
        for bid, pack_id in zip(bids, self.work.packs_of(bids)):
            if pack_id is not None:
                self._need(pack_id)
                continue
            idx = self.ref_damage(bid)
            first = idx if first is None else first
        return first

    def load_meta(self, bid: bytes, btype: BlobType) -> bytes:
        """Load a tree or content-list blob through verify's own index; raise Lost."""
        idx = self.ref_damage(bid)
        if idx is not None:
            raise Lost(idx)
        loc = self.work.location(bid)
        assert loc is not None
        name = pack_name(loc.pack_id)
        what = f"{btype.name.lower()} blob {bid.hex()[:16]} in pack {name}"
        try:
            sealed = self.repo.backend.load(name, loc.offset, loc.length)
        except ObjectNotFoundError:
            raise Lost(self.ledger.add_damage(f"pack {name}", "is missing", [bid])) from None
        if len(sealed) != loc.length:
            raise Lost(self.ledger.add_damage(what, "is cut short: its pack is truncated", [bid]))
        try:
            return self.repo.codec.decode(loc.type, bid, sealed, what)
        except IntegrityError as exc:
            raise Lost(self.ledger.add_damage(what, reason_of(exc, what), [bid])) from None

    def misread(self, key: bytes, obj: str, reason: str) -> int:
        """Damage of references to a blob that opens and matches its id but is not what they
        take it for (it does not decode as a tree, or as a content list of their level).
        Recorded once per ``key`` (what the reference takes the blob for), and not against the
        blob: other references may rightly use it as what it is (docs/format.md, "Blob ids
        and types"), and 'repair snapshots' drops the references, never the blob."""
        idx = self._misread.get(key)
        if idx is None:
            idx = self._misread[key] = self.ledger.add_damage(obj, reason, reference=True)
        return idx

    def load_tree(self, tid: bytes) -> list[Node]:
        """A tree's nodes, loaded through verify's own index; raise Lost or IntegrityError."""
        return decode_tree(self.load_meta(tid, BlobType.TREE), f"tree {tid.hex()[:16]}")

    def tree_damage(self, tid: bytes) -> list[tuple[bytes, int]]:
        """Damaged paths below a tree, relative (b"" = the tree itself; "dir/" = a whole directory)."""
        key = b"t" + tid
        raw = self.work.get(self.work.memo, key)
        if raw is not None:
            return [(bytes(p), int(i)) for p, i in msgpack.unpackb(raw)]
        what = f"tree {tid.hex()[:16]}"
        pairs: list[tuple[bytes, int]] = []
        try:
            nodes = self.load_tree(tid)
        except Lost as lost:
            pairs = [(b"", lost.idx)]
        except IntegrityError as exc:
            pairs = [(b"", self.misread(key, f"tree blob {tid.hex()[:16]}", reason_of(exc, what)))]
        else:
            for node in nodes:
                if node.type == DIR and node.subtree is not None:
                    pairs += [(node.name + b"/" + p, i) for p, i in self.tree_damage(node.subtree)]
                elif node.type == FILE:
                    i = self.file_damage(node)
                    if i is not None:
                        pairs.append((node.name, i))
                del pairs[FILES_CAP:]
        self.work.put(self.work.memo, key, msgpack.packb(pairs))
        return pairs

    def file_damage(self, node: Node) -> int | None:
        """The damage the first unreadable part of a file belongs to, or None."""
        if node.chunks is not None:
            return self.chunks_damage([bid for bid, _ in node.chunks])
        if node.content is None:
            return None
        key = b"c%d:" % node.content[1] + node.content[0]
        raw = self.work.get(self.work.memo, key)
        if raw is not None:
            return U32.unpack(raw)[0] if raw else None
        idx = self.content_damage(node.content[0], node.content[1])
        self.work.put(self.work.memo, key, b"" if idx is None else U32.pack(idx))
        return idx

    def content_damage(self, bid: bytes, level: int) -> int | None:
        """Like ``tree.iter_chunk_refs``, but every ref is checked (each damaged part is recorded)."""
        what = f"content list {bid.hex()[:16]}"
        key = b"c%d:" % level + bid
        try:
            got, refs = decode_content(self.load_meta(bid, BlobType.CONTENT), what)
        except Lost as lost:
            return lost.idx
        except IntegrityError as exc:
            return self.misread(key, what, reason_of(exc, what))
        if got != level:
            return self.misread(key, what, f"is level {got}, referenced as level {level}")
        if level == 0:
            return self.chunks_damage([c for c, _ in refs])
        found = [self.content_damage(c, level - 1) for c, _ in refs]
        return next((i for i in found if i is not None), None)
