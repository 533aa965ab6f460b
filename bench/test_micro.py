"""Micro-benchmarks of the hot paths (pytest-benchmark).

Not collected by the main suite (``testpaths = tests``). The project's pytest options
disable timing by default, so::

    pytest bench/ --benchmark-enable              # time them
    pytest bench/                                  # run each once, as a smoke test

Each benchmark works on data shaped like the reference dataset: 8 KiB pages, half
text-like, half random (zstd-3 stores about 0.8 of it).
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Iterator

import pytest

from kyrorepo.backends import MemoryBackend
from kyrorepo.blob import BlobCodec
from kyrorepo.chunker import Chunker, ChunkerParams
from kyrorepo.crypto import MasterKey
from kyrorepo.format import BlobType, PackEntry, PackInfo
from kyrorepo.index import IndexCache
from kyrorepo.keys import KdfParams
from kyrorepo.repository import Repository

MiB = 1024 * 1024
WORDS = [bytes(random.Random(i).choice(b"bcdfghjklmnprstvwz") for _ in range(1 + i % 7)) for i in range(3000)]


def pages(nbytes: int, seed: int = 1) -> bytes:
    rnd = random.Random(seed)
    out = bytearray()
    while len(out) < nbytes:
        text = b" ".join(rnd.choice(WORDS) for _ in range(900))[:4096].ljust(4096, b" ")
        out += text + rnd.randbytes(4096)
    return bytes(out[:nbytes])


@pytest.fixture(scope="module")
def keys():  # type: ignore[no-untyped-def]
    return MasterKey(bytes(range(32))).keys()


@pytest.fixture(scope="module")
def data16() -> bytes:
    return pages(16 * MiB)


@pytest.fixture(scope="module")
def chunks(keys, data16) -> list[tuple[bytes, bytes]]:  # type: ignore[no-untyped-def]
    chunker = Chunker(ChunkerParams.for_average(32 * 1024, keys.chunker_seed))
    return [(keys.blob_id(c), c) for c in chunker.chunks_of_bytes(data16)]


def test_chunk_and_hash_16mib(benchmark, keys, data16):  # type: ignore[no-untyped-def]
    """Read blocks, cut with FastCDC and hash every chunk: the reading thread's work."""
    chunker = Chunker(ChunkerParams.for_average(32 * 1024, keys.chunker_seed))

    def run() -> int:
        n = 0
        for block in chunker.blocks_of_stream(io.BytesIO(data16)):
            start = 0
            for end in block.cuts:
                keys.blob_id(block.data[start:end])
                start = end
                n += 1
        return n

    assert benchmark(run) > 300


@pytest.mark.parametrize("level", [1, 3])
def test_seal_chunk(benchmark, keys, chunks, level):  # type: ignore[no-untyped-def]
    """Compress and seal one ~39 KiB chunk (a sealing thread's work per chunk)."""
    codec = BlobCodec(keys, level)
    it: Iterator[tuple[bytes, bytes]] = iter(chunks * 1000)

    def run() -> bytes:
        bid, data = next(it)
        return codec.encode(BlobType.DATA, bid, data)

    assert benchmark(run)


def test_open_chunk(benchmark, keys, chunks):  # type: ignore[no-untyped-def]
    """Open, decompress and re-hash one chunk (restore and verify per chunk)."""
    codec = BlobCodec(keys, 3)
    sealed = [(bid, codec.encode(BlobType.DATA, bid, data)) for bid, data in chunks[:64]]
    it = iter(sealed * 100000)

    def run() -> bytes:
        bid, s = next(it)
        return codec.decode(BlobType.DATA, bid, s, "chunk")

    assert benchmark(run)


def test_pack_16mib(benchmark, tmp_path, keys, chunks):  # type: ignore[no-untyped-def]
    """Append 16 MiB of sealed blobs as reserved batches, finish and save the pack, index it."""
    repo = Repository.create(MemoryBackend(), b"pw", str(tmp_path / "cache"), kdf=KdfParams(1024, 1))
    codec = BlobCodec(repo.keys, 0)
    body = [codec.encode(BlobType.DATA, bid, data) for bid, data in chunks]
    counter = iter(range(1 << 30))

    def run() -> None:
        base = next(counter).to_bytes(8, "little")
        items = [(base + bid[8:], sealed, len(sealed)) for bid, sealed in zip((b for b, _ in chunks), body)]
        assert all(repo.writer.reserve([i[0] for i in items]))
        for k in range(0, len(items), 32):
            repo.writer.add_reserved(BlobType.DATA, items[k:k + 32])
        repo.writer.flush()

    benchmark(run)
    assert repo.writer.stats.packs_written >= 1


def test_index_lookup_1000_of_200k(benchmark, tmp_path):  # type: ignore[no-untyped-def]
    """Look up 1000 ids (half present) in an index of 200k blobs, in one transaction."""
    cache = IndexCache(str(tmp_path / "lmdb"))
    rnd = random.Random(2)
    ids = [rnd.randbytes(32) for _ in range(200_000)]
    for s in range(0, len(ids), 10_000):
        entries = tuple(PackEntry(bid, BlobType.DATA, 8 + 40_000 * i, 40_000, 50_000) for i, bid in enumerate(ids[s:s + 10_000]))
        cache.add_segment(f"seg{s}", [PackInfo(os.urandom(32), 400_000_000, entries)])
    probe = rnd.sample(ids, 500) + [rnd.randbytes(32) for _ in range(500)]

    def run() -> int:
        return sum(loc is not None for _, loc in cache.lookup_many(probe))

    assert benchmark(run) == 500
    cache.close()
