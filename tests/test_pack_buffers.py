"""Packs built in reused buffers: every pack saved is exactly the pack built, whatever came before.

The backup hands the backend a view of a pack buffer that the next pack reuses once the
save returned; a pack must never carry bytes of an earlier one, and a blob too large for
the buffer must still land whole in its pack.
"""

from __future__ import annotations

import os

from kyrorepo.backends import LocalBackend
from kyrorepo.blob import BlobCodec
from kyrorepo.crypto import MasterKey
from kyrorepo.format import BlobType
from kyrorepo.pack import PackBuffers, PackBuilder, pack_id_of, pack_name, parse_pack

KEYS = MasterKey.generate().keys()
CODEC = BlobCodec(KEYS, 3)


def build(buffers: PackBuffers, blobs: list[bytes]) -> PackBuilder:
    builder = PackBuilder(CODEC, buffers)
    for plain in blobs:
        bid = KEYS.blob_id(plain)
        builder.add(BlobType.DATA, bid, CODEC.encode(BlobType.DATA, bid, plain), len(plain))
    return builder


def check_saved(backend: LocalBackend, pack_id: bytes, blobs: list[bytes]) -> None:
    data = backend.load(pack_name(pack_id))
    assert pack_id_of(data) == pack_id
    entries = parse_pack(CODEC, data, "pack")
    assert [CODEC.decode(e.type, e.id, data[e.offset:e.offset + e.length], "blob") for e in entries] == blobs


def test_packs_built_one_after_another_in_two_buffers_are_saved_intact(tmp_path):
    backend = LocalBackend(str(tmp_path / "repo"))
    buffers = PackBuffers(capacity=256 * 1024)
    saved = []
    for n in range(5):
        # Shrinking packs: a reused buffer holds more old bytes than the new pack writes.
        blobs = [os.urandom(1000 * (5 - n)) + bytes(20_000) for _ in range(8 - n)]
        builder = build(buffers, blobs)
        pack_id, data, _ = builder.finish()
        with data:
            backend.save(pack_name(pack_id), data)
        builder.release()
        saved.append((pack_id, blobs))
    for pack_id, blobs in saved:
        check_saved(backend, pack_id, blobs)


def test_a_blob_larger_than_the_buffer_lands_whole_in_its_pack(tmp_path):
    backend = LocalBackend(str(tmp_path / "repo"))
    buffers = PackBuffers(capacity=64 * 1024)
    blobs = [os.urandom(40_000), os.urandom(300_000), os.urandom(10)]
    builder = build(buffers, blobs)
    pack_id, data, _ = builder.finish()
    backend.save(pack_name(pack_id), data)
    check_saved(backend, pack_id, blobs)
    data.release()
    builder.release()
    # The grown buffer serves the next pack as well.
    again = [os.urandom(200_000)]
    builder = build(buffers, again)
    pack_id, data, _ = builder.finish()
    backend.save(pack_name(pack_id), data)
    check_saved(backend, pack_id, again)


def test_a_builder_without_shared_buffers_keeps_its_pack_valid(tmp_path):
    blobs = [os.urandom(5000), bytes(70_000)]
    builder = PackBuilder(CODEC)
    for plain in blobs:
        bid = KEYS.blob_id(plain)
        builder.add(BlobType.DATA, bid, CODEC.encode(BlobType.DATA, bid, plain), len(plain))
    pack_id, data, entries = builder.finish()
    assert pack_id == pack_id_of(bytes(data)) and parse_pack(CODEC, bytes(data), "p") == entries
