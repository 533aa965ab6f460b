"""Copy backups between related repositories without opening the data.

Related repositories share the master key (so blob ids, sealing keys and chunker
parameters) but each has its own repository id. Sealed blobs travel as they are: read
from the source pack, appended to the destination's packs, never decrypted, never
re-chunked; trees and content lists are opened in the source only to learn which blobs a
backup needs. Blobs the destination has are not sent. The snapshot object is copied last,
byte for byte, so an interrupted copy leaves no half backup and resumes by skipping every
blob already indexed at the destination.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from kyrorepo.backends.base import Backend
from kyrorepo.blob import Dictionaries, missing_objects
from kyrorepo.errors import IntegrityError, ObjectNotFoundError, UsageError
from kyrorepo.format import BlobType
from kyrorepo.index import BlobLocation
from kyrorepo.keys import KdfParams
from kyrorepo.opening import unlock_master
from kyrorepo.pack import pack_name
from kyrorepo.repository import OBJECT_DIRS, Repository
from kyrorepo.snapshot import Snapshot
from kyrorepo.tree import DIR, FILE, Node, load_content, unpackb
from kyrorepo.wal.capture import Capture
from kyrorepo.walk import load_tree

BATCH = 50_000
MAX_RANGE = 8 * 1024 * 1024


@dataclass
class CopyResult:
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already at the destination
    blobs_sent: int = 0
    bytes_sent: int = 0
    created: bool = False
    captures: int = 0  # WAL captures present at the destination after the copy


def open_or_create_related(src: Repository, backend: Backend, password: bytes, cache_root: str,
                           kdf: KdfParams) -> tuple[Repository, bool]:
    """Open DEST, checking it shares SRC's master key, or create it as a related repository."""
    try:
        backend.stat("config")
    except ObjectNotFoundError:
        cfg = src.config
        dest = Repository.create(backend, password, cache_root, chunk_size=cfg.chunker_avg,
                                 compression_level=cfg.compression_level, pack_size=cfg.pack_size,
                                 kdf=kdf, master=src.master)
        return dest, True
    master = unlock_master(backend, password)
    if master.secret != src.master.secret:
        raise UsageError(f"repository {backend.describe()} is not related to {src.backend.describe()} "
                         "(different keys): copy into an empty location to create a related one")
    return Repository.open(backend, password, cache_root), False


def needed_blobs(repo: Repository, snap: Snapshot) -> Iterator[tuple[bytes, BlobType]]:
    """Every blob a backup references: trees, content lists and chunks (repeats possible)."""
    stack = [snap.tree]
    yield snap.tree, BlobType.TREE
    while stack:
        tree_id = stack.pop()
        for node in load_tree(repo, tree_id):
            if node.type == DIR and node.subtree is not None:
                yield node.subtree, BlobType.TREE
                stack.append(node.subtree)
            elif node.type == FILE:
                yield from _content_blobs(repo, node)


def _content_blobs(repo: Repository, node: Node) -> Iterator[tuple[bytes, BlobType]]:
    if node.chunks is not None:
        for bid, _ in node.chunks:
            yield bid, BlobType.DATA
    elif node.content is not None:
        yield from _content_tree(repo, node.content[0], node.content[1])


def _content_tree(repo: Repository, bid: bytes, level: int) -> Iterator[tuple[bytes, BlobType]]:
    yield bid, BlobType.CONTENT
    for child, _ in load_content(bid, level, lambda b: repo.load_blob(b, BlobType.CONTENT)):
        if level == 0:
            yield child, BlobType.DATA
        else:
            yield from _content_tree(repo, child, level - 1)


def _missing(dest: Repository, src: Repository, ids: Iterable[tuple[bytes, BlobType]]) -> Iterator[tuple[bytes, BlobLocation]]:
    seen: set[bytes] = set()
    for bid, _ in ids:
        if bid in seen:
            continue
        seen.add(bid)
        if len(seen) > BATCH * 4:
            seen.clear()  # bound memory; the destination's index catches repeats
        if dest.has_blob(bid):
            continue
        loc = src.lookup(bid)
        if loc is None:
            raise IntegrityError(f"blob {bid.hex()[:16]} is not in the source index: run 'kyrorepo verify' on the source")
        yield bid, loc


def _transfer(src: Repository, dest: Repository, batch: list[tuple[bytes, BlobLocation]], result: CopyResult) -> None:
    """Send a batch of sealed blobs, reading coalesced ranges of each source pack."""
    batch.sort(key=lambda x: (x[1].pack_id, x[1].offset))
    i = 0
    while i < len(batch):
        j = i + 1
        first = batch[i][1]
        while (j < len(batch) and batch[j][1].pack_id == first.pack_id
               and batch[j][1].offset + batch[j][1].length - first.offset <= MAX_RANGE):
            j += 1
        last = batch[j - 1][1]
        name = pack_name(first.pack_id)
        data = src.backend.load(name, first.offset, last.offset + last.length - first.offset)
        for bid, loc in batch[i:j]:
            sealed = data[loc.offset - first.offset:loc.offset - first.offset + loc.length]
            if len(sealed) != loc.length:
                raise IntegrityError(f"pack {name} is truncated: run 'kyrorepo verify' on the source")
            if dest.writer.add_sealed(loc.type, bid, sealed, loc.raw_length):
                result.blobs_sent += 1
                result.bytes_sent += loc.length
        i = j


def copy_snapshot(src: Repository, dest: Repository, snap: Snapshot, result: CopyResult) -> None:
    name = f"{OBJECT_DIRS[BlobType.SNAPSHOT]}/{snap.id}"
    with contextlib.suppress(ObjectNotFoundError):
        dest.backend.stat(name)
        result.skipped.append(snap.id)
        return
    batch: list[tuple[bytes, BlobLocation]] = []
    for item in _missing(dest, src, needed_blobs(src, snap)):
        batch.append(item)
        if len(batch) >= BATCH:
            _transfer(src, dest, batch, result)
            batch = []
    if batch:
        _transfer(src, dest, batch, result)
    dest.flush()
    dest.backend.save(name, src.backend.load(name))
    result.copied.append(snap.id)


def copy_objects(src: Repository, dest: Repository, btype: BlobType, names: Iterable[str],
                 blobs_of: Callable[[str], Iterable[tuple[bytes, BlobType]]], result: CopyResult) -> None:
    """Copy standalone objects (WAL captures, dictionaries) and the blobs they reference."""
    for obj in names:
        path = f"{OBJECT_DIRS[btype]}/{obj}"
        with contextlib.suppress(ObjectNotFoundError):
            dest.backend.stat(path)
            continue
        batch = list(_missing(dest, src, blobs_of(obj)))
        if batch:
            _transfer(src, dest, batch, result)
        dest.flush()
        dest.backend.save(path, src.backend.load(path))


def copy_dictionaries(src: Repository, dest: Repository) -> None:
    """Give DEST both objects of every compression dictionary SRC has (dicts/<id> and
    dictcopies/<id>): the sealed bytes of the first of SRC's two that opens, saved as is."""
    dicts = Dictionaries(src.backend, src.keys)
    present = Dictionaries(dest.backend, dest.keys).objects()
    for did in dicts.ids():
        missing = missing_objects(did, present)
        if missing:
            sealed = dicts.intact(did)[0]  # IntegrityError when neither of SRC's objects opens
            for path in missing:
                dest.backend.save(path, sealed)


def capture_blobs(repo: Repository, name: str) -> Iterator[tuple[bytes, BlobType]]:
    """Every blob a WAL capture references (the stored segment versions' data)."""
    cap = Capture.from_obj(unpackb(repo.load_object(BlobType.WALCAP, name), f"WAL capture {name[:8]}"), name)
    for seg in cap.stored:
        node = Node(name=b"", type=FILE, chunks=seg.data.chunks, content=seg.data.content)
        yield from _content_blobs(repo, node)


def captures_of(repo: Repository, sources: set[str]) -> list[str]:
    """Names of the WAL captures of ``sources``, oldest first."""
    caps = []
    for name in repo.object_names(BlobType.WALCAP):
        cap = Capture.from_obj(unpackb(repo.load_object(BlobType.WALCAP, name), f"WAL capture {name[:8]}"), name)
        if cap.source in sources:
            caps.append((cap.time_ns, name))
    return [name for _, name in sorted(caps)]


def check_at_destination(dest: Repository, snap: Snapshot) -> int:
    """Read back and open every blob the backup needs from DEST; return the count."""
    dest.sync_index(force=True)
    count = 0
    seen: set[bytes] = set()
    for bid, btype in needed_blobs(dest, snap):
        if bid in seen:
            continue
        if len(seen) > BATCH * 4:
            seen.clear()  # bounded memory: a repeat is only checked twice
        seen.add(bid)
        dest.load_blob(bid, btype)
        count += 1
    return count
