"""BlobCodec.encode_many / decode_many: the batched forms seal and open exactly what
encode / decode do, blob by blob, and report each damaged blob on its own."""

from __future__ import annotations

import json
import os
import random

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from kyrorepo.backends import MemoryBackend
from kyrorepo.blob import COMP_RAW, COMP_ZSTD, COMP_ZSTD_DICT, BlobCodec, Dictionaries
from kyrorepo.crypto import MasterKey
from kyrorepo.errors import IntegrityError
from kyrorepo.format import BlobType

GOLDEN = json.load(open(os.path.join(os.path.dirname(__file__), "golden", "v1-dict.json")))
KEYS = MasterKey(bytes.fromhex(GOLDEN["master_key"])).keys()


def dict_codec() -> BlobCodec:
    backend = MemoryBackend()
    d = GOLDEN["dictionary"]
    backend.save(f"dicts/{d['id']}", bytes.fromhex(d["object"]))
    return BlobCodec(KEYS, 2, Dictionaries(backend, KEYS))


def chunks() -> list[bytes]:
    rng = random.Random(5)
    plain = bytes.fromhex(GOLDEN["chunk"]["plain"])
    return [plain, plain[::-1] * 3, rng.randbytes(20_000), b"a" * 50_000, plain[:100], rng.randbytes(7)]


def items_of(data: list[bytes]) -> list[tuple[bytes, bytes]]:
    return [(KEYS.blob_id(d), d) for d in data]


@pytest.mark.parametrize("with_dict", [True, False])
def test_encode_many_seals_what_encode_seals(with_dict):
    codec = dict_codec() if with_dict else BlobCodec(KEYS, 2)
    items = items_of(chunks())
    batch = codec.encode_many(BlobType.DATA, items)
    kinds = set()
    for (bid, data), sealed in zip(items, batch):
        body = KEYS.open(BlobType.DATA, bid, sealed, "batch")
        assert body == KEYS.open(BlobType.DATA, bid, codec.encode(BlobType.DATA, bid, data), "one")
        assert codec.decode(BlobType.DATA, bid, sealed, "batch") == data
        kinds.add(body[0])
    # compressible chunks are compressed (with the dictionary when there is one), random ones stay raw
    assert kinds == {COMP_ZSTD_DICT if with_dict else COMP_ZSTD, COMP_RAW}


def test_decode_many_opens_each_blob_and_names_each_damaged_one():
    codec = dict_codec()
    data = chunks()
    items = items_of(data)
    sealed = [bytearray(s) for s in codec.encode_many(BlobType.DATA, items)]
    sealed[1][40] ^= 1  # fails authentication
    other = KEYS.blob_id(b"something else")
    wrong = codec.encode(BlobType.DATA, other, data[3])  # sealed under another id: opens, does not match
    batch = [(bid, bytes(s)) for (bid, _), s in zip(items, sealed)] + [(other, wrong), (items[0][0], b"short")]
    names = [f"blob {i}" for i in range(len(batch))]
    got = codec.decode_many(BlobType.DATA, batch, lambda i: names[i])
    assert len(got) == len(batch)
    for i, (bid, blob) in enumerate(batch):
        try:
            expected: bytes | str = codec.decode(BlobType.DATA, bid, blob, names[i])
        except IntegrityError as exc:
            expected = exc.message
        if isinstance(expected, str):
            assert isinstance(got[i], IntegrityError) and got[i].message == expected, i
        else:
            assert bytes(got[i]) == expected, i  # type: ignore[arg-type]
    assert [i for i, g in enumerate(got) if isinstance(g, IntegrityError)] == [1, 6, 7]
    assert "authentication" in got[1].message and "does not match its id" in got[6].message  # type: ignore[union-attr]


def test_open_many_opens_what_decode_opens_and_names_the_first_damaged_blob():
    """Restore's loop: each blob's plaintext, without the re-hash (a blob sealed under another id
    opens); the first blob that does not open raises decode's error, naming it, and a name is
    made only for that blob."""
    codec = dict_codec()
    data = chunks()
    items = items_of(data)
    sealed = codec.encode_many(BlobType.DATA, items)
    batch = [(bid, memoryview(s)) for (bid, _), s in zip(items, sealed)]
    asked: list[int] = []

    def what(i: int) -> str:
        asked.append(i)
        return f"blob {i}"

    assert [bytes(p) for p in codec.open_many(BlobType.DATA, batch, what)] == data and not asked
    plain = BlobCodec(KEYS, 2)  # no dictionary: zstd frames of their own
    unboxed = [(bid, s) for (bid, _), s in zip(items, plain.encode_many(BlobType.DATA, items))]
    assert {KEYS.open(BlobType.DATA, bid, s, "x")[0] for bid, s in unboxed} == {COMP_ZSTD, COMP_RAW}
    assert plain.open_many(BlobType.DATA, unboxed, what) == data and not asked
    other = KEYS.blob_id(b"something else")
    assert codec.open_many(BlobType.DATA, [(other, codec.encode(BlobType.DATA, other, data[3]))], what) == [data[3]]
    flipped = sealed[0][:-1] + bytes([sealed[0][-1] ^ 1])
    for bad in (codec.encode(BlobType.DATA, other, data[0]), flipped, b"short"):
        with pytest.raises(IntegrityError) as info:
            codec.open_many(BlobType.DATA, [*batch[:2], (items[0][0], bad), *batch[2:]], what)
        with pytest.raises(IntegrityError) as alone:
            codec.decode(BlobType.DATA, items[0][0], bad, "blob 2", check_id=False)
        assert info.value.message == alone.value.message and asked == [2]
        asked.clear()
    assert any(KEYS.open(BlobType.DATA, bid, s, "x")[0] == COMP_ZSTD_DICT for (bid, _), s in zip(items, sealed))
    with pytest.raises(IntegrityError, match="^blob 0 was compressed with a dictionary, which only a repository"):
        BlobCodec(KEYS, 2).open_many(BlobType.DATA, batch, what)


def test_open_many_opens_each_blob_as_the_type_it_was_sealed_as():
    """A chunk stored as a tree (a tree with the same plaintext came first: docs/format.md, "Blob
    ids and types") is opened as one when ``types`` says so, and fails authentication if not."""
    codec = dict_codec()
    data = chunks()
    items = items_of(data)
    sealed = [codec.encode(BlobType.TREE if i == 1 else BlobType.DATA, bid, d) for i, (bid, d) in enumerate(items)]
    batch = list(zip((bid for bid, _ in items), sealed))
    assert codec.open_many(BlobType.DATA, batch, str, {1: BlobType.TREE}) == data
    with pytest.raises(IntegrityError, match="^1 failed authentication"):
        codec.open_many(BlobType.DATA, batch, str)


def test_decode_many_without_the_dictionary_fails_only_the_blobs_that_need_it():
    items = items_of(chunks())
    sealed = dict_codec().encode_many(BlobType.DATA, items)
    got = BlobCodec(KEYS, 2).decode_many(BlobType.DATA, [(bid, s) for (bid, _), s in zip(items, sealed)],
                                          lambda i: f"chunk {i}")
    for (bid, data), s, g in zip(items, sealed, got):
        if KEYS.open(BlobType.DATA, bid, s, "x")[0] == COMP_ZSTD_DICT:
            assert isinstance(g, IntegrityError) and "dictionary" in g.message
        else:
            assert bytes(g) == data  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=3000), st.text(max_size=2000).map(str.encode)), max_size=12))
def test_batches_round_trip(data):
    codec = dict_codec()
    items = items_of(data)
    sealed = codec.encode_many(BlobType.DATA, items)
    got = codec.decode_many(BlobType.DATA, [(bid, s) for (bid, _), s in zip(items, sealed)], str)
    assert [bytes(g) for g in got] == data  # type: ignore[arg-type]


def random_literal_chunks(rng: random.Random, n: int) -> list[bytes]:
    """Chunks whose matches are long repeats and whose literals are random bytes: Huffman
    coding the literals gains nothing."""
    out = []
    for _ in range(n):
        blocks = [rng.randbytes(48) for _ in range(256)]
        out.append(b"".join(b + b for b in blocks))
    return out


def text_chunks(rng: random.Random, n: int) -> list[bytes]:
    """Chunks of text-like literals (few distinct letters, frequent ones first): coding pays."""
    return [bytes(rng.choices(b"etaoin shrdlu", weights=range(13, 0, -1), k=24_000)) for _ in range(n)]


@pytest.mark.parametrize("with_dict", [True, False])
def test_literals_stay_raw_only_while_coding_them_does_not_pay(with_dict):
    codec = dict_codec() if with_dict else BlobCodec(KEYS, 2)
    literals = codec.literals
    assert literals is not None and not literals.raw  # starts coded
    rng = random.Random(9)

    def batches(make, count):
        for _ in range(count):
            items = items_of(make(rng, 4))
            sealed = codec.encode_many(BlobType.DATA, items)
            for (bid, data), s in zip(items, sealed):  # every frame, coded or raw, opens
                assert codec.decode(BlobType.DATA, bid, s, "chunk") == data

    batches(random_literal_chunks, 3)
    assert not literals.raw  # not before all the first probes agree
    batches(random_literal_chunks, 1)
    assert literals.raw
    if not with_dict:  # a frame with raw literals is an ordinary zstd frame: any decoder reads it
        items = items_of(random_literal_chunks(rng, 2))
        body = KEYS.open(BlobType.DATA, items[0][0], codec.encode_many(BlobType.DATA, items)[0], "x")
        assert body[0] == COMP_ZSTD and zstandard.ZstdDecompressor().decompress(body[1:]) == items[0][1]
    batches(text_chunks, 4)  # the next probe finds that coding pays: back to coded
    assert not literals.raw


def test_literals_are_always_coded_above_the_fast_levels():
    assert BlobCodec(KEYS, 3).literals is None and BlobCodec(KEYS, 1).literals is not None
