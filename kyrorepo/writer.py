"""Blob writer: seals blobs into packs, uploads packs, then writes index segments.

Order of durability (a crash at any instant leaves only unreferenced extra data):
pack saved -> index segment listing it saved -> cache updated -> (caller) snapshot saved.
Blobs written in this run but not yet in a saved index segment are tracked in memory
(``pending``), bounded by ``INDEX_EVERY_PACKS`` packs' worth of entries.

Thread-safe: several worker threads may add blobs at once; compression and sealing
happen outside the lock, pack assembly inside, uploads outside again.

Two ways in:
* ``add`` / ``add_sealed``: one blob at a time, checked against the index.
* ``reserve`` then ``add_reserved``: the backup pipeline looks up a whole block of chunk
  ids in one index transaction and reserves the new ones, so a chunk seen twice in one
  run is sealed once; the sealing thread then appends a batch of sealed blobs under one
  lock acquisition. A reservation counts as known; one that will not be written must be
  given back with ``release`` (a failed backup does), or later callers would trust a
  blob that was never stored.

``background_uploads()`` moves pack finishing and saving (and the index segments that
follow them) to one upload thread with a bounded queue, so sealing threads never wait
for storage. A pack that fails to save takes its blobs out of ``pending`` again, and the
error is raised to the next caller that adds or flushes.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from kyrorepo.blob import BlobCodec
from kyrorepo.format import BlobType, PackInfo
from kyrorepo.index import IndexCache
from kyrorepo.pack import PackBuffers, PackBuilder

INDEX_EVERY_PACKS = 8
PACK_SLACK = 1024 * 1024  # room past the pack size for the blob that fills it, trailer and footer
# Pack buffers in use at once with background uploads: the pack being filled and the one
# being saved. A third would only let sealing run further ahead of a slow save, for 16
# MiB more RSS (docs/performance.md, "Memory").
PACK_BUFFERS = 2
UPLOAD_QUEUE = 0  # full packs waiting for the upload thread, besides the one it is saving

SealedItem = tuple[bytes, bytes, int]  # (blob id, sealed blob, raw length)


@dataclass
class WriteStats:
    blobs_added: int = 0
    raw_bytes_added: int = 0
    stored_bytes_added: int = 0
    packs_written: int = 0


class _Uploader:
    """One thread that finishes and saves full packs handed to it, in order."""

    def __init__(self, upload: Callable[[PackBuilder], None], drop: Callable[[PackBuilder], None],
                 queued: int) -> None:
        self._upload = upload
        self._drop = drop
        self._queue: queue.Queue[PackBuilder | None] = queue.Queue()
        self._slots = threading.Semaphore(queued + 1)  # waiting + being saved
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="upload", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            builder = self._queue.get()
            if builder is None:
                self._queue.task_done()
                return
            try:
                if self.error is not None:
                    self._drop(builder)
                else:
                    self._upload(builder)
            except BaseException as exc:  # noqa: BLE001 - handed to the producer
                self.error = exc
            finally:
                del builder  # do not hold a pack's memory while waiting for the next
                self._slots.release()
                self._queue.task_done()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, builder: PackBuilder) -> None:
        if self.error is not None:
            self._drop(builder)
            raise self.error
        self._slots.acquire()
        self._queue.put(builder)

    def wait(self) -> None:
        """Wait until every submitted pack is saved (or dropped after an error)."""
        self._queue.join()
        self.check()

    def close(self) -> None:
        self._slots.acquire()
        self._queue.put(None)
        self._thread.join()


class BlobWriter:
    def __init__(
        self,
        codec: BlobCodec,
        cache: IndexCache,
        pack_size: int,
        save_pack: Callable[[bytes, bytes | memoryview], None],
        save_index: Callable[[list[PackInfo]], str],
    ) -> None:
        self.codec = codec
        self.cache = cache
        self.pack_size = pack_size
        self._save_pack = save_pack
        self._save_index = save_index
        self._lock = threading.Lock()
        self._index_lock = threading.Lock()
        self._pending: dict[bytes, BlobType] = {}  # in a pack, not yet in the cache
        self._reserved: set[bytes] = set()  # promised by a caller, not yet in a pack
        self._buffers = PackBuffers(pack_size + PACK_SLACK)
        self._builder = PackBuilder(codec, self._buffers)
        self._unindexed: list[PackInfo] = []
        self._uploader: _Uploader | None = None
        self.stats = WriteStats()

    # --- lookups ------------------------------------------------------------------------

    def known(self, bid: bytes) -> bool:
        with self._lock:
            if bid in self._pending or bid in self._reserved:
                return True
        return self.cache.has(bid)

    def reserve(self, ids: Sequence[bytes]) -> list[bool]:
        """For each id: True when it is new and now reserved for the caller, else False.

        An id occurring twice in ``ids`` is reserved at most once. Every True must be
        followed by ``add_reserved`` or ``release`` of that id.
        """
        with self._lock:
            local = [bid in self._pending or bid in self._reserved for bid in ids]
        ask = [bid for bid, hit in zip(ids, local) if not hit]
        indexed = {bid for bid, loc in self.cache.lookup_many(ask) if loc is not None} if ask else set()
        out: list[bool] = []
        with self._lock:
            for bid, hit in zip(ids, local):
                new = not hit and bid not in indexed and bid not in self._pending and bid not in self._reserved
                if new:
                    self._reserved.add(bid)
                out.append(new)
        return out

    def release(self, ids: Iterable[bytes]) -> None:
        """Give back reservations that will not be written."""
        with self._lock:
            for bid in ids:
                self._reserved.discard(bid)

    # --- adding ---------------------------------------------------------------------------

    def add(self, btype: BlobType, data: bytes | memoryview, bid: bytes | None = None) -> tuple[bytes, bool]:
        """Store ``data`` unless the repository has it; return (id, newly stored)."""
        if bid is None:
            bid = self.codec.keys.blob_id(data)
        if self.known(bid):
            return bid, False
        sealed = self.codec.encode(btype, bid, data)
        return bid, self.add_sealed(btype, bid, sealed, len(data))

    def add_sealed(self, btype: BlobType, bid: bytes, sealed: bytes, raw_length: int) -> bool:
        """Add an already sealed blob (repack and copy move blobs without opening them)."""
        with self._lock:
            if bid in self._pending or bid in self._reserved:
                return False
        if self.cache.has(bid):
            return False
        full = None
        self._wait_for_buffer()
        with self._lock:
            if bid in self._pending or bid in self._reserved:
                return False
            self._append(btype, bid, sealed, raw_length)
            full = self._take_full()
        if full is not None:
            self._hand_over(full)
        return True

    def add_reserved(self, btype: BlobType, items: Sequence[SealedItem]) -> None:
        """Append sealed blobs whose ids the caller reserved, under one lock acquisition per pack.

        A batch that fills the open pack hands it over before the rest goes on: with
        background uploads that waits for the pack before it, so the rest lands in that
        pack's buffer rather than in a third one. If this raises, the caller releases
        the reservations of every item (those already appended are no longer reserved).
        """
        if self._uploader is not None:
            self._uploader.check()
        pos = 0
        while pos < len(items):
            self._wait_for_buffer()
            full = None
            with self._lock:
                while pos < len(items) and full is None:
                    bid, sealed, raw_length = items[pos]
                    pos += 1
                    self._reserved.discard(bid)
                    self._append(btype, bid, sealed, raw_length)
                    full = self._take_full()
            if full is not None:
                self._hand_over(full)

    def _wait_for_buffer(self) -> None:
        """With background uploads, wait (holding no lock) while ``PACK_BUFFERS`` packs hold a
        buffer and the open pack has none yet; the pack being saved gives its buffer back."""
        if self._uploader is not None:
            self._buffers.wait_for_room(PACK_BUFFERS, lambda: self._builder.holds_buffer)

    def _append(self, btype: BlobType, bid: bytes, sealed: bytes, raw_length: int) -> None:
        """Add one blob to the open pack; the caller holds the lock."""
        self._pending[bid] = btype
        self._builder.add(btype, bid, sealed, raw_length)
        self.stats.blobs_added += 1
        self.stats.raw_bytes_added += raw_length
        self.stats.stored_bytes_added += len(sealed)

    def _take_full(self) -> PackBuilder | None:
        """Swap out the open pack when it reached its size; the caller holds the lock."""
        if self._builder.size < self.pack_size:
            return None
        full, self._builder = self._builder, PackBuilder(self.codec, self._buffers)
        return full

    # --- uploading ------------------------------------------------------------------------

    def _hand_over(self, builder: PackBuilder) -> None:
        if self._uploader is not None:
            self._uploader.submit(builder)
        else:
            self._upload(builder)

    def _drop(self, builder: PackBuilder) -> None:
        """Forget the blobs of a pack that will never be saved."""
        builder.release()
        with self._lock:
            for e in builder.entries:
                self._pending.pop(e.id, None)

    def _upload(self, builder: PackBuilder) -> None:
        """Finish and save one pack; its buffer goes back to the pool once ``save_pack`` returned.

        ``save_pack`` gets a view of the pack buffer: like every backend's ``save``, it
        must be done with the bytes when it returns (it writes or copies them).
        """
        try:
            pack_id, data, entries = builder.finish()
            with data:
                self._save_pack(pack_id, data)
                length = len(data)
        except BaseException:
            self._drop(builder)
            raise
        builder.release()
        info = PackInfo(pack_id, length, entries)
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

    @contextlib.contextmanager
    def background_uploads(self, queued: int = UPLOAD_QUEUE) -> Iterator[None]:
        """Save full packs on an upload thread while the caller keeps adding blobs.

        On leaving, every pack handed over is saved (not the open one: ``flush`` does
        that); an upload error is raised unless another exception is on its way out.
        """
        if self._uploader is not None:
            yield
            return
        up = _Uploader(self._upload, self._drop, queued)
        self._uploader = up
        try:
            yield
        except BaseException:
            self._uploader = None
            with contextlib.suppress(BaseException):
                up.wait()
            up.close()
            raise
        self._uploader = None
        try:
            up.wait()
        finally:
            up.close()

    def flush(self) -> None:
        """Upload the open pack and index everything written so far."""
        with self._lock:
            builder, self._builder = self._builder, PackBuilder(self.codec, self._buffers)
        if len(builder):
            self._hand_over(builder)
        if self._uploader is not None:
            self._uploader.wait()
        self._write_index()
        self._buffers.clear()
