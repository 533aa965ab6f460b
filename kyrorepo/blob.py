"""Blob codec: compress (zstd, stored raw when it does not shrink), then seal.

Sealed plaintext layout: compression u8 (0 = raw, 1 = zstd frame) | payload.
"""

from __future__ import annotations

import threading

import zstandard

from kyrorepo.crypto import BlobKeys
from kyrorepo.errors import IntegrityError
from kyrorepo.format import BlobType

COMP_RAW = 0
COMP_ZSTD = 1
MAX_BLOB = 64 * 1024 * 1024


def codec_for(backend: object, keys: BlobKeys, level: int) -> "BlobCodec":
    """The codec of a repository opened on ``backend``: what ``Repository`` uses, and what a
    worker process that reopened the backend itself must use to open the same blobs."""
    return BlobCodec(keys, level)


class BlobCodec:
    def __init__(self, keys: BlobKeys, level: int = 3) -> None:
        self.keys = keys
        self.level = level
        self._local = threading.local()

    def _zc(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "zc", None)
        if c is None:
            c = self._local.zc = zstandard.ZstdCompressor(level=self.level, write_content_size=True)
        return c

    def _zd(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "zd", None)
        if d is None:
            d = self._local.zd = zstandard.ZstdDecompressor()
        return d

    def encode(self, btype: BlobType, bid: bytes, data: bytes | memoryview) -> bytes:
        """Return the sealed blob for ``data`` (whose id ``bid`` the caller computed).

        zstd releases the GIL while it compresses, so several threads encode in parallel.
        """
        packed = self._zc().compress(data) if self.level > 0 and len(data) else b""
        if packed and len(packed) < len(data):
            body = b"\x01" + packed
        else:
            body = b"".join((b"\x00", data))
        return self.keys.seal(btype, bid, body)

    def decode(self, btype: BlobType, bid: bytes, sealed: bytes | memoryview, what: str, check_id: bool = True) -> bytes:
        """Open, decompress and (by default) re-hash a sealed blob."""
        body = self.keys.open(btype, bid, sealed, what)  # type: ignore[arg-type]  # open() slices a view as well
        if not body:
            raise IntegrityError(f"{what}: empty plaintext")
        if body[0] == COMP_RAW:
            data = body[1:]
        elif body[0] == COMP_ZSTD:
            try:
                data = self._zd().decompress(memoryview(body)[1:], max_output_size=MAX_BLOB)
            except zstandard.ZstdError as exc:
                raise IntegrityError(f"{what}: compressed data is damaged ({exc})") from None
        else:
            raise IntegrityError(f"{what}: unknown compression type {body[0]}")
        if check_id and self.keys.blob_id(data) != bid:
            raise IntegrityError(f"{what}: content does not match its id")
        return data
