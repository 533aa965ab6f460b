"""Pack files: PACK_MAGIC | sealed blobs | sealed trailer | footer (docs/format.md, "Packs").

The pack id is the unkeyed BLAKE3 of the whole pack, so anybody holding the files can
check a pack against its name without the key. This module builds and parses bytes;
it does no I/O.
"""

from __future__ import annotations

from typing import Callable

import blake3

from kyrorepo.blob import BlobCodec
from kyrorepo.errors import IntegrityError
from kyrorepo.format import (
    PACK_FOOTER,
    PACK_MAGIC,
    BlobType,
    PackEntry,
    decode_footer,
    decode_trailer,
    encode_footer,
    encode_trailer,
)


def pack_name(pack_id: bytes) -> str:
    h = pack_id.hex()
    return f"data/{h[:2]}/{h}"


def pack_id_of(data: bytes | bytearray | memoryview) -> bytes:
    return blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest()


class PackBuilder:
    """Collects sealed blobs; ``finish`` appends the sealed trailer and footer."""

    def __init__(self, codec: BlobCodec) -> None:
        self.codec = codec
        self.buf = bytearray(PACK_MAGIC)
        self.entries: list[PackEntry] = []

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def size(self) -> int:
        return len(self.buf)

    def add(self, btype: BlobType, bid: bytes, sealed: bytes, raw_length: int) -> None:
        self.entries.append(PackEntry(bid, btype, len(self.buf), len(sealed), raw_length))
        self.buf += sealed

    def finish(self) -> tuple[bytes, bytes, tuple[PackEntry, ...]]:
        """Return (pack id, pack bytes, entries)."""
        plain = encode_trailer(self.entries)
        tid = self.codec.keys.blob_id(plain)
        sealed = self.codec.encode(BlobType.TRAILER, tid, plain)
        self.buf += sealed
        self.buf += encode_footer(tid, len(sealed))
        data = bytes(self.buf)
        return pack_id_of(data), data, tuple(self.entries)


TailLoader = Callable[[int, int], bytes]  # (offset, length) -> bytes


def read_trailer(codec: BlobCodec, pack_length: int, load: TailLoader, what: str) -> tuple[PackEntry, ...]:
    """Read and open a pack's trailer, loading only the pack's tail through ``load``."""
    if pack_length < len(PACK_MAGIC) + PACK_FOOTER.size:
        raise IntegrityError(f"{what} is too short ({pack_length} bytes) to be a pack")
    footer = load(pack_length - PACK_FOOTER.size, PACK_FOOTER.size)
    tid, tlen = decode_footer(footer, what)
    start = pack_length - PACK_FOOTER.size - tlen
    if start < len(PACK_MAGIC):
        raise IntegrityError(f"{what}: trailer length {tlen} does not fit the pack")
    plain = codec.decode(BlobType.TRAILER, tid, load(start, tlen), f"{what} trailer")
    entries = decode_trailer(plain, what)
    check_layout(entries, start, what)
    return entries


def check_layout(entries: tuple[PackEntry, ...], body_end: int, what: str) -> None:
    """Blobs must lie inside the pack body, in order, without overlapping."""
    pos = len(PACK_MAGIC)
    for e in entries:
        if e.offset < pos or e.offset + e.length > body_end:
            raise IntegrityError(f"{what}: blob {e.id.hex()[:16]} lies outside the pack body")
        pos = e.offset + e.length


def parse_pack(codec: BlobCodec, data: bytes, what: str) -> tuple[PackEntry, ...]:
    """Entries of a whole pack held in memory."""
    return read_trailer(codec, len(data), lambda off, n: data[off:off + n], what)
