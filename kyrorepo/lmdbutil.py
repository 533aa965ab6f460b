"""LMDB helpers shared by the local caches (index cache, audit log)."""

from __future__ import annotations

import os
import struct

LMDB_MAGIC = 0xBEEFC0DE
_META = struct.Struct("<II16x4s92xQQ")  # magic, version, page size (free db pad), last page, txn id
_META_OFFSET = 16  # after the page header


def lmdb_file_intact(path: str) -> bool:
    """False when the LMDB environment in ``path`` is shorter than its newest meta page says.

    LMDB maps the file: opening a truncated one crashes the process with SIGBUS instead of
    raising, so a cache is checked with this before it is opened.
    """
    try:
        with open(os.path.join(path, "data.mdb"), "rb") as f:
            head = f.read(_META_OFFSET + _META.size)
            if len(head) < _META_OFFSET + _META.size:
                return not head
            magic, _, psize_raw, last, txnid = _META.unpack_from(head, _META_OFFSET)
            psize = int.from_bytes(psize_raw, "little")
            if magic != LMDB_MAGIC or psize < 512 or psize & (psize - 1):
                return False
            f.seek(psize)
            other = f.read(_META_OFFSET + _META.size)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return True
    if len(other) == _META_OFFSET + _META.size:
        magic2, _, _, last2, txnid2 = _META.unpack_from(other, _META_OFFSET)
        if magic2 == LMDB_MAGIC and txnid2 > txnid:
            last = last2
    return size >= (last + 1) * psize
