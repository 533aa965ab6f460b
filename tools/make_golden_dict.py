#!/usr/bin/env python3
"""Write tests/golden/v1-dict.json: byte vectors for compression dictionaries (docs/format.md).

The 2026-11-21 addition to format version 1 (compression type 2, ``dicts/`` objects,
blob type 10) has its own golden file so that v1.json stays as it was made. Run once;
the file is committed and never regenerated. Usage: python tools/make_golden_dict.py OUT
"""

from __future__ import annotations

import json
import random
import sys

import zstandard

from kyrorepo.crypto import MasterKey
from kyrorepo.format import BlobType, file_header

MASTER = bytes(range(32))  # the master key of v1.json
SALT_DICT = bytes(range(120, 136))
SALT_CHUNK = bytes(range(140, 156))


def samples() -> list[bytes]:
    """Deterministic text-like records: enough for zstd to train a small dictionary."""
    rng = random.Random(2026)
    words = [("w%03d" % i).encode() for i in range(300)] + [b"status=active", b"NULL", b"|", b"\n"]
    return [b" ".join(rng.choices(words, k=800)) for _ in range(64)]


def main(out: str) -> None:
    keys = MasterKey(MASTER).keys()
    raw_dict = zstandard.train_dictionary(4096, samples(), k=200, d=8).as_bytes()
    did = keys.blob_id(raw_dict)
    dict_object = file_header(BlobType.DICT) + keys.seal(BlobType.DICT, did, b"\x00" + raw_dict, SALT_DICT)
    chunk = samples()[0]
    cid = keys.blob_id(chunk)
    zc = zstandard.ZstdCompressor(level=2, dict_data=zstandard.ZstdCompressionDict(raw_dict), write_content_size=True,
                                  write_dict_id=False)
    sealed = keys.seal(BlobType.DATA, cid, b"\x02" + did + zc.compress(chunk), SALT_CHUNK)
    v = {"format_version": 1, "master_key": MASTER.hex(),
         "dictionary": {"raw": raw_dict.hex(), "id": did.hex(), "object": dict_object.hex()},
         "chunk": {"plain": chunk.hex(), "id": cid.hex(), "sealed_dict": sealed.hex()}}
    with open(out, "w") as f:
        json.dump(v, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/golden/v1-dict.json")
