"""Repairs: rebuild the index from pack trailers; rewrite backups whose data is damaged.

``repair_index``: every pack in ``data/`` is listed by its trailer (read from the pack's
tail); new index segments covering every readable pack are written first, the old ones
removed after, then the local cache is rebuilt. A kill at any instant leaves every pack
listed by an old or a new segment (a pack listed twice is harmless). A pack whose trailer
is unreadable keeps its listing from an old readable segment when there is one. First,
a compression dictionary object that is missing or damaged is stored again from its
intact twin (``dicts/<id>`` and ``dictcopies/<id>``, kyrorepo.blob.Dictionaries).

``repair_snapshots``: runs a verify (reading the data the backups need, unless
``structure_only``), then for every backup that depends on damaged data writes a new
tree without the damaged files and directories, saves the new backup with what was lost
in its ``lost`` field, and removes the old one. Finally the damaged blobs are dropped
from the index (replacement segments first, old ones removed after) so the next backup
stores that data again instead of deduplicating against the damaged copy. It refuses to
run while the index itself is damaged: 'repair index' comes first, or it would drop data
that is only unindexed.

Both expect the caller to hold the exclusive lock.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Iterator

import lmdb

from kyrorepo.blob import Dictionaries, dictionary_paths
from kyrorepo.errors import IntegrityError, KyroError, NotFoundError, RefusedError
from kyrorepo.format import BlobType, PackInfo, encode_index
from kyrorepo.pack import pack_name
from kyrorepo.repository import Repository
from kyrorepo.snapshot import Snapshot, save_snapshot
from kyrorepo.tree import DIR, FILE, Node, encode_tree
from kyrorepo.verify import Verifier
from kyrorepo.verify_options import DEFAULT_WORKERS, VerifyOptions
from kyrorepo.verify_backups import Lost
from kyrorepo.verify_data import bounded_map, pack_id_from_name, read_trailer
from kyrorepo.verify_report import VerifyReport

SEGMENT_PACKS = 64  # packs per index segment written by 'repair index'


def rebuild_cache(repo: Repository) -> None:
    """Empty the local index cache and load it again from the repository's segments."""
    try:
        repo.cache.clear_index()
    except lmdb.Error:
        repo.reset_cache()
    repo.sync_index(force=True)


# --- repair index ----------------------------------------------------------------------


@dataclass
class IndexRepair:
    packs: int = 0
    blobs: int = 0
    written: list[str] = field(default_factory=list)
    removed: int = 0
    carried: list[str] = field(default_factory=list)  # trailer unreadable, listing kept from an old segment
    unreadable: list[str] = field(default_factory=list)  # could not be indexed at all
    dicts_stored: list[str] = field(default_factory=list)  # dictionary objects stored again from their twin
    dicts_lost: list[str] = field(default_factory=list)  # dictionaries neither of whose objects opens


def mend_dictionaries(repo: Repository, res: IndexRepair) -> None:
    """Store every dictionary object that is missing or damaged again, from its twin that opens."""
    dicts = Dictionaries(repo.backend, repo.keys)  # not the codec's: read what storage holds now
    for did in dicts.ids():
        raw, failed = dicts.check(did)
        if raw is None:
            res.dicts_lost.append(dictionary_paths(did)[0])
            continue
        for path in failed:
            repo.backend.save(path, dicts.sealed(did, raw))  # replaces a damaged object atomically
            res.dicts_stored.append(path)


def _listed_packs(repo: Repository) -> Iterator[tuple[bytes, int]]:
    for name, size in repo.backend.list("data/"):
        pid = pack_id_from_name(name)
        if pid is not None:
            yield pid, size


def _carry_over(repo: Repository, old: set[str], failed: dict[bytes, int]) -> Iterator[PackInfo]:
    """Listings of packs with unreadable trailers, from old segments that still decode."""
    for name in sorted(old):
        try:
            packs = repo.load_index_segment(name)
        except (IntegrityError, NotFoundError):
            continue
        for p in packs:
            if failed.get(p.pack_id) == p.pack_length:
                del failed[p.pack_id]
                yield p


def repair_index(repo: Repository, workers: int = DEFAULT_WORKERS) -> IndexRepair:
    old = set(repo.object_names(BlobType.INDEX))
    res = IndexRepair()
    mend_dictionaries(repo, res)
    batch: list[PackInfo] = []
    failed: dict[bytes, int] = {}

    def flush() -> None:
        if batch:
            res.written.append(repo.save_object(BlobType.INDEX, encode_index(batch)))
            batch.clear()

    def add(info: PackInfo) -> None:
        batch.append(info)
        res.packs += 1
        res.blobs += len(info.entries)
        if len(batch) >= SEGMENT_PACKS:
            flush()

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="repair") as pool:
        for (pid, size), result in bounded_map(pool, lambda job: read_trailer(repo, *job), _listed_packs(repo),
                                               4 * workers):
            if isinstance(result, KyroError):
                failed[pid] = size
            else:
                add(PackInfo(pid, size, result))
    if failed:
        for info in _carry_over(repo, old, failed):
            res.carried.append(pack_name(info.pack_id))
            add(info)
        res.unreadable = sorted(pack_name(pid) for pid in failed)
    flush()
    for name in sorted(old - set(res.written)):
        repo.remove_object(BlobType.INDEX, name)
        res.removed += 1
    rebuild_cache(repo)
    return res


# --- repair snapshots --------------------------------------------------------------------


@dataclass
class BackupFix:
    old_id: str
    source: str
    lost: list[str] = field(default_factory=list)  # "path: what is damaged"
    files_lost: int = 0
    bytes_lost: int = 0
    new_id: str = ""


@dataclass
class SnapshotRepair:
    report: VerifyReport
    fixes: list[BackupFix]
    not_repaired: list[str]  # damage this repair cannot fix (unreadable backup objects, keys, pack tails)
    segments: list[str]  # index segments that list damaged blobs (rewritten when applied)
    applied: bool


class _Rewriter:
    """Builds a backup's tree without its damaged parts (stores nothing on a dry run)."""

    def __init__(self, v: Verifier, apply: bool) -> None:
        self.v = v
        self.apply = apply

    def store(self, nodes: list[Node]) -> bytes:
        data = encode_tree(nodes)
        return self.v.repo.add_blob(BlobType.TREE, data)[0] if self.apply else self.v.repo.keys.blob_id(data)

    def lose(self, fix: BackupFix, path: bytes, idx: int, size: int = 0) -> None:
        shown = path.decode(errors="replace") or "/"
        fix.lost.append(f"{shown}: {self.v.report.damage[idx].message}")
        fix.files_lost += 1
        fix.bytes_lost += size

    def unreadable(self, tid: bytes) -> int | None:
        pairs = self.v.backups.tree_damage(tid)
        return pairs[0][1] if pairs and pairs[0][0] == b"" else None

    def tree(self, tid: bytes, prefix: bytes, fix: BackupFix) -> bytes:
        """The id of the tree ``tid`` without its damaged entries (``tid`` itself is readable)."""
        if not self.v.backups.tree_damage(tid):
            return tid
        try:
            nodes = self.v.backups.load_tree(tid)
        except (Lost, IntegrityError):
            raise AssertionError("tree_damage said this tree is readable") from None
        kept: list[Node] = []
        for node in nodes:
            path = prefix + node.name
            if node.type == DIR and node.subtree is not None:
                idx = self.unreadable(node.subtree)
                if idx is not None:
                    self.lose(fix, path + b"/", idx)
                    continue
                sub = self.tree(node.subtree, path + b"/", fix)
                kept.append(node if sub == node.subtree else replace(node, subtree=sub))
            elif node.type == FILE and (idx := self.v.backups.file_damage(node)) is not None:
                self.lose(fix, path, idx, node.size)
            else:
                kept.append(node)
        return self.store(kept)

    def backup(self, snap: Snapshot) -> tuple[BackupFix, bytes] | None:
        if not self.v.backups.tree_damage(snap.tree):
            return None
        fix = BackupFix(snap.id, snap.source)
        idx = self.unreadable(snap.tree)
        if idx is not None:
            self.lose(fix, b"", idx, snap.stats.get("logical_bytes", 0))
            return fix, self.store([])
        return fix, self.tree(snap.tree, b"", fix)


def _blocking(report: VerifyReport) -> list[str]:
    return [d.message for d in report.damage if d.index_level]


def _segments_with_damage(v: Verifier) -> list[str]:
    names: dict[str, None] = {}
    for pid, listings in v.work.iter_listings():
        missing = v.work.get(v.work.listed, pid) is None
        for seg, _, entries in listings:
            if missing or any(v.ledger.blob_damage(e.id) is not None for e in entries):
                names[seg.hex()] = None
    return list(names)


def _drop_from_index(v: Verifier, names: list[str]) -> None:
    """Replace each segment by one without the damaged blobs, then remove it."""
    repo = v.repo
    for name in names:
        kept: list[PackInfo] = []
        for p in repo.load_index_segment(name):
            if v.work.get(v.work.listed, p.pack_id) is None:
                continue
            entries = tuple(e for e in p.entries if v.ledger.blob_damage(e.id) is None)
            if entries:
                kept.append(PackInfo(p.pack_id, p.pack_length, entries))
        new = repo.save_object(BlobType.INDEX, encode_index(kept)) if kept else ""
        if new != name:
            repo.remove_object(BlobType.INDEX, name)


def _repaired(snap: Snapshot, fix: BackupFix, tree: bytes) -> Snapshot:
    stats = dict(snap.stats)
    stats["file_count"] = max(0, stats.get("file_count", 0) - fix.files_lost)
    stats["logical_bytes"] = max(0, stats.get("logical_bytes", 0) - fix.bytes_lost)
    stats["lost_files"] = stats.get("lost_files", 0) + fix.files_lost
    return replace(snap, root=replace(snap.root, subtree=tree), lost=snap.lost + tuple(fix.lost), stats=stats, id="")


def repair_snapshots(repo: Repository, opts: VerifyOptions, apply: bool) -> SnapshotRepair:
    with Verifier(repo, opts) as v:
        report = v.run()
        blocking = _blocking(report)
        if blocking:
            raise RefusedError(f"the index is damaged ({blocking[0]}): run 'kyrorepo repair index' first, "
                               "then 'kyrorepo repair snapshots'; nothing was changed")
        rewriter = _Rewriter(v, apply)
        planned = [(snap, found) for snap in v.snapshots if (found := rewriter.backup(snap)) is not None]
        segments = _segments_with_damage(v)
        not_repaired = [d.message for d in report.damage if d.pinned or (not d.blobs and not d.backups)]
        if apply:
            repo.flush()
            for snap, (fix, tree) in planned:
                fix.new_id = save_snapshot(repo, _repaired(snap, fix, tree)).id
                if fix.new_id != snap.id:
                    repo.remove_object(BlobType.SNAPSHOT, snap.id)
            _drop_from_index(v, segments)
            rebuild_cache(repo)
        return SnapshotRepair(report, [fix for _, (fix, _) in planned], not_repaired, segments, apply)
