#!/usr/bin/env python3
"""Write tests/golden/v1.json: byte vectors that pin the on-disk format (docs/format.md).

Run once per format version; the file is committed and never regenerated for an
existing version (old versions must stay readable). Usage: python tools/make_golden.py OUT
"""

from __future__ import annotations

import json
import sys

import zstandard

from kyrorepo.blob import BlobCodec
from kyrorepo.crypto import MasterKey
from kyrorepo.format import BlobType, PackEntry, PackInfo, encode_index, encode_trailer, file_header
from kyrorepo.keys import KdfParams, make_key_file
from kyrorepo.pack import PackBuilder
from kyrorepo.tree import FILE, DIR, SYMLINK, Node, encode_content, encode_tree

MASTER = bytes(range(32))
PASSWORD = b"golden passphrase"
SALT = bytes(range(100, 116))


def main(out: str) -> None:
    master = MasterKey(MASTER)
    keys = master.keys()
    codec = BlobCodec(keys, 3)
    v: dict[str, object] = {"format_version": 1, "master_key": MASTER.hex(), "password": PASSWORD.decode()}
    v["id_key"] = keys.id_key.hex()
    v["seal_key"] = keys.seal_key.hex()
    v["chunker_seed"] = keys.chunker_seed

    chunk = b"kyrorepo golden chunk " * 100
    cid = keys.blob_id(chunk)
    v["chunk"] = {"plain": chunk.hex(), "id": cid.hex(), "salt": SALT.hex(),
                  "sealed_zstd": keys.seal(BlobType.DATA, cid, b"\x01" + zstandard.ZstdCompressor(level=3, write_content_size=True).compress(chunk), SALT).hex(),
                  "sealed_raw": keys.seal(BlobType.DATA, cid, b"\x00" + chunk, SALT).hex()}

    file_node = Node(name=b"data.bin", type=FILE, mode=0o640, uid=1000, gid=1000, mtime_ns=1_700_000_000_123_456_789,
                     size=len(chunk), digest=keys.blob_id(chunk), chunks=((cid, len(chunk)),))
    link = Node(name=b"link", type=SYMLINK, mode=0o777, mtime_ns=1_700_000_000_000_000_000, target=b"data.bin")
    sub = Node(name=b"sub\xff", type=DIR, mode=0o755, mtime_ns=1, subtree=bytes(32), xattrs=((b"user.k", b"v"),))
    v["tree"] = encode_tree([sub, link, file_node]).hex()
    v["content"] = encode_content(0, [(cid, len(chunk)), (bytes(32), 7)]).hex()

    entries = [PackEntry(cid, BlobType.DATA, 8, 100, len(chunk)), PackEntry(bytes(32), BlobType.TREE, 108, 50, 60)]
    v["trailer"] = encode_trailer(entries).hex()
    v["index"] = encode_index([PackInfo(bytes([7]) * 32, 4242, tuple(entries))]).hex()
    v["file_header_snapshot"] = file_header(BlobType.SNAPSHOT).hex()

    builder = PackBuilder(codec)
    builder.add(BlobType.DATA, cid, keys.seal(BlobType.DATA, cid, b"\x00" + chunk, SALT), len(chunk))
    pack_id, pack, _ = builder.finish()
    v["pack"] = {"id": pack_id.hex(), "bytes": pack.hex()}

    v["key_file"] = make_key_file(master, PASSWORD, "00" * 32, KdfParams(1024, 1, 1)).decode()
    with open(out, "w") as f:
        json.dump(v, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/golden/v1.json")
