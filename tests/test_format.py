"""Format: golden vectors pin every persisted structure; property tests for encoders."""

from __future__ import annotations

import json
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kyrorepo.blob import BlobCodec
from kyrorepo.crypto import MasterKey
from kyrorepo.errors import IntegrityError, UnsupportedVersionError, WrongPasswordError
from kyrorepo.format import (
    BlobType,
    PackEntry,
    PackInfo,
    decode_index,
    decode_trailer,
    encode_index,
    encode_trailer,
    file_header,
    split_file,
)
from kyrorepo.keys import open_key_file
from kyrorepo.pack import PackBuilder, pack_id_of, parse_pack
from kyrorepo.tree import (
    DIR,
    FILE,
    SYMLINK,
    ContentListBuilder,
    Node,
    decode_content,
    decode_tree,
    encode_content,
    encode_tree,
    iter_chunk_refs,
)

GOLDEN = json.load(open(os.path.join(os.path.dirname(__file__), "golden", "v1.json")))
MASTER = MasterKey(bytes.fromhex(GOLDEN["master_key"]))
KEYS = MASTER.keys()
CODEC = BlobCodec(KEYS, 3)


def test_subkeys_are_pinned():
    assert KEYS.id_key.hex() == GOLDEN["id_key"]
    assert KEYS.seal_key.hex() == GOLDEN["seal_key"]
    assert KEYS.chunker_seed == GOLDEN["chunker_seed"]
    assert KEYS.chunker_seed < 2 ** 63


def test_blob_id_is_keyed_blake3():
    plain = bytes.fromhex(GOLDEN["chunk"]["plain"])
    assert KEYS.blob_id(plain).hex() == GOLDEN["chunk"]["id"]


@pytest.mark.parametrize("field", ["sealed_zstd", "sealed_raw"])
def test_sealed_blob_golden(field):
    c = GOLDEN["chunk"]
    plain, bid, salt = bytes.fromhex(c["plain"]), bytes.fromhex(c["id"]), bytes.fromhex(c["salt"])
    sealed = bytes.fromhex(c[field])
    assert CODEC.decode(BlobType.DATA, bid, sealed, "golden") == plain
    body = b"\x00" + plain if field == "sealed_raw" else None
    if body is not None:
        assert KEYS.seal(BlobType.DATA, bid, body, salt) == sealed


def test_sealed_blob_binds_type_and_id():
    c = GOLDEN["chunk"]
    bid, sealed = bytes.fromhex(c["id"]), bytes.fromhex(c["sealed_raw"])
    with pytest.raises(IntegrityError):
        CODEC.decode(BlobType.TREE, bid, sealed, "golden")
    with pytest.raises(IntegrityError):
        CODEC.decode(BlobType.DATA, bytes(32), sealed, "golden")


def test_tree_and_content_encodings_are_pinned():
    nodes = decode_tree(bytes.fromhex(GOLDEN["tree"]), "golden tree")
    assert [n.name for n in nodes] == [b"data.bin", b"link", b"sub\xff"]
    assert encode_tree(list(reversed(nodes))).hex() == GOLDEN["tree"]
    level, refs = decode_content(bytes.fromhex(GOLDEN["content"]), "golden content")
    assert level == 0 and len(refs) == 2
    assert encode_content(level, refs).hex() == GOLDEN["content"]


def test_trailer_and_index_are_pinned():
    entries = decode_trailer(bytes.fromhex(GOLDEN["trailer"]), "golden trailer")
    assert encode_trailer(entries).hex() == GOLDEN["trailer"]
    packs = list(decode_index(bytes.fromhex(GOLDEN["index"]), "golden index"))
    assert packs[0].pack_length == 4242 and packs[0].entries == entries
    assert encode_index(packs).hex() == GOLDEN["index"]
    assert file_header(BlobType.SNAPSHOT).hex() == GOLDEN["file_header_snapshot"]


def test_golden_pack_parses():
    data = bytes.fromhex(GOLDEN["pack"]["bytes"])
    assert pack_id_of(data).hex() == GOLDEN["pack"]["id"]
    entries = parse_pack(CODEC, data, "golden pack")
    assert [e.id.hex() for e in entries] == [GOLDEN["chunk"]["id"]]
    e = entries[0]
    assert CODEC.decode(e.type, e.id, data[e.offset:e.offset + e.length], "golden") == bytes.fromhex(GOLDEN["chunk"]["plain"])


def test_golden_key_file_opens():
    data = GOLDEN["key_file"].encode()
    assert open_key_file(data, "00" * 32, GOLDEN["password"].encode()).secret == MASTER.secret
    with pytest.raises(WrongPasswordError):
        open_key_file(data, "00" * 32, b"wrong")
    with pytest.raises((IntegrityError, WrongPasswordError)):
        open_key_file(data, "11" * 32, GOLDEN["password"].encode())  # renamed key file


def test_damaged_key_file_is_integrity_error_not_wrong_password():
    doc = json.loads(GOLDEN["key_file"])
    doc["sealed_master"] = doc["sealed_master"][:-4] + "AAA="
    with pytest.raises(IntegrityError):
        open_key_file(json.dumps(doc).encode(), "00" * 32, GOLDEN["password"].encode())


def test_unknown_version_refused():
    header = bytearray(file_header(BlobType.SNAPSHOT))
    header[4] = 99
    with pytest.raises(UnsupportedVersionError):
        split_file(bytes(header) + b"x" * 40, BlobType.SNAPSHOT, "snapshots/x")
    trailer = bytearray(bytes.fromhex(GOLDEN["trailer"]))
    trailer[0] = 2
    with pytest.raises(UnsupportedVersionError):
        decode_trailer(bytes(trailer), "t")


def test_file_header_type_checked():
    with pytest.raises(IntegrityError):
        split_file(file_header(BlobType.INDEX) + b"x" * 40, BlobType.SNAPSHOT, "snapshots/x")
    with pytest.raises(IntegrityError):
        split_file(b"NOPE" + b"x" * 40, BlobType.SNAPSHOT, "snapshots/x")


# --- property tests ---------------------------------------------------------------------

ids = st.binary(min_size=32, max_size=32)
u32 = st.integers(min_value=0, max_value=2 ** 32 - 1)
entry = st.builds(PackEntry, ids, st.sampled_from(list(BlobType)), u32, u32, u32)


@given(st.lists(entry, max_size=50))
def test_trailer_roundtrip(entries):
    assert decode_trailer(encode_trailer(entries), "t") == tuple(entries)


@given(st.lists(st.builds(PackInfo, ids, st.integers(0, 2 ** 64 - 1), st.lists(entry, max_size=10).map(tuple)), max_size=10))
def test_index_roundtrip(packs):
    assert list(decode_index(encode_index(packs), "i")) == packs


names = st.binary(min_size=1, max_size=40).filter(lambda b: b"/" not in b and b not in (b".", b".."))
node = st.builds(
    Node, name=names, type=st.sampled_from([FILE, DIR, SYMLINK]), mode=st.integers(0, 0o7777),
    uid=st.integers(0, 2 ** 32 - 1), gid=st.integers(0, 2 ** 32 - 1), mtime_ns=st.integers(-2 ** 62, 2 ** 62),
    size=st.integers(0, 2 ** 50), digest=st.none() | ids,
    chunks=st.none() | st.lists(st.tuples(ids, u32), max_size=8).map(tuple),
    subtree=st.none() | ids, target=st.none() | st.binary(max_size=50),
    links=st.none() | st.integers(1, 1000),
    xattrs=st.lists(st.tuples(st.binary(min_size=1, max_size=10), st.binary(max_size=20)), max_size=3).map(tuple),
)


@given(st.lists(node, max_size=20, unique_by=lambda n: n.name))
def test_tree_roundtrip_and_canonical(nodes):
    data = encode_tree(nodes)
    back = decode_tree(data, "t")
    assert back == sorted(nodes, key=lambda n: n.name)
    assert encode_tree(list(reversed(back))) == data


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([BlobType.DATA, BlobType.TREE, BlobType.CONTENT]), st.binary(max_size=3000)),
                min_size=1, max_size=10))
def test_pack_roundtrip(blobs):
    builder = PackBuilder(CODEC)
    expected = {}
    for btype, plain in blobs:
        bid = KEYS.blob_id(plain)
        if bid in expected:
            continue
        builder.add(btype, bid, CODEC.encode(btype, bid, plain), len(plain))
        expected[bid] = (btype, plain)
    pack_id, data, entries = builder.finish()
    assert pack_id == pack_id_of(data)
    assert parse_pack(CODEC, data, "p") == entries
    for e in entries:
        assert CODEC.decode(e.type, e.id, data[e.offset:e.offset + e.length], "b") == expected[e.id][1]
        assert e.type == expected[e.id][0] and e.raw_length == len(expected[e.id][1])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 5000), st.integers(0, 2 ** 32))
def test_content_list_tree_roundtrip(n, seed):
    rnd = random.Random(seed)
    refs = [(rnd.randbytes(32), rnd.randrange(1, 1 << 20)) for _ in range(n)]
    store: dict[bytes, bytes] = {}

    def put(data: bytes) -> bytes:
        bid = KEYS.blob_id(data)
        store[bid] = data
        return bid

    builder = ContentListBuilder(put)
    for r in refs:
        builder.add(r)
    chunks, content = builder.finish()
    node = Node(name=b"f", type=FILE, chunks=chunks, content=content)
    assert list(iter_chunk_refs(node, store.__getitem__)) == refs
    assert (content is None) == (n <= 8)
