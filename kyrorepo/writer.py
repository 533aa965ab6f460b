"""Blob writer: seals blobs into packs, uploads packs, then writes index segments.

Order of durability (a crash at any instant leaves only unreferenced extra data):
pack saved -> index segment listing it saved -> cache updated -> (caller) snapshot saved.
Blobs written in this run but not yet in a saved index segment are tracked in memory
(``pending``), bounded by ``INDEX_EVERY_PACKS`` packs' worth of entries.

Thread-safe: several worker threads may call ``add`` at once; compression and sealing
happen outside the lock, pack assembly inside, uploads outside again.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from kyrorepo.blob import BlobCodec
from kyrorepo.format import BlobType, PackInfo
from kyrorepo.index import IndexCache
from kyrorepo.pack import PackBuilder

INDEX_EVERY_PACKS = 8


@dataclass
class WriteStats:
    blobs_added: int = 0
    raw_bytes_added: int = 0
    stored_bytes_added: int = 0
    packs_written: int = 0


class BlobWriter:
    def __init__(
        self,
        codec: BlobCodec,
        cache: IndexCache,
        pack_size: int,
        save_pack: Callable[[bytes, bytes], None],
        save_index: Callable[[list[PackInfo]], str],
    ) -> None:
        self.codec = codec
        self.cache = cache
        self.pack_size = pack_size
        self._save_pack = save_pack
        self._save_index = save_index
        self._lock = threading.Lock()
        self._index_lock = threading.Lock()
        self._pending: dict[bytes, BlobType] = {}
        self._builder = PackBuilder(codec)
        self._unindexed: list[PackInfo] = []
        self.stats = WriteStats()

    def known(self, bid: bytes) -> bool:
        with self._lock:
            if bid in self._pending:
                return True
        return self.cache.has(bid)

    def add(self, btype: BlobType, data: bytes, bid: bytes | None = None) -> tuple[bytes, bool]:
        """Store ``data`` unless the repository has it; return (id, newly stored)."""
        if bid is None:
            bid = self.codec.keys.blob_id(data)
        if self.known(bid):
            return bid, False
        sealed = self.codec.encode(btype, bid, data)
        return bid, self.add_sealed(btype, bid, sealed, len(data))

    def add_sealed(self, btype: BlobType, bid: bytes, sealed: bytes, raw_length: int) -> bool:
        """Add an already sealed blob (repack and copy move blobs without opening them)."""
        full = None
        with self._lock:
            if bid in self._pending or self.cache.has(bid):
                return False
            self._pending[bid] = btype
            self._builder.add(btype, bid, sealed, raw_length)
            self.stats.blobs_added += 1
            self.stats.raw_bytes_added += raw_length
            self.stats.stored_bytes_added += len(sealed)
            if self._builder.size >= self.pack_size:
                full, self._builder = self._builder, PackBuilder(self.codec)
        if full is not None:
            self._upload(full)
        return True

    def _upload(self, builder: PackBuilder) -> None:
        pack_id, data, entries = builder.finish()
        self._save_pack(pack_id, data)
        info = PackInfo(pack_id, len(data), entries)
        with self._lock:
            self.stats.packs_written += 1
            self._unindexed.append(info)
            due = len(self._unindexed) >= INDEX_EVERY_PACKS
        if due:
            self._write_index()

    def _write_index(self) -> None:
        with self._index_lock:
            with self._lock:
                packs, self._unindexed = self._unindexed, []
            if not packs:
                return
            name = self._save_index(packs)
            self.cache.add_segment(name, packs)
            with self._lock:
                for p in packs:
                    for e in p.entries:
                        self._pending.pop(e.id, None)

    def flush(self) -> None:
        """Upload the open pack and index everything written so far."""
        with self._lock:
            builder, self._builder = self._builder, PackBuilder(self.codec)
        if len(builder):
            self._upload(builder)
        self._write_index()

