"""AEAD sealing of blobs and derivation of subkeys from the master key.

Master key: 32 random bytes. Subkeys come from BLAKE3's key-derivation mode with fixed
context strings (docs/format.md, "Keys"):
* id key      — keyed BLAKE3 ids of blobs and whole-file digests;
* seal key    — from which every blob's own AES-256-GCM key is derived;
* chunker seed — the FastCDC gear seed (below 2**63).

Sealing a blob: a fresh random 16-byte salt; ``okm = BLAKE3(key=seal key, salt)[:44]``;
AES-256-GCM with key ``okm[:32]`` and nonce ``okm[32:44]``; associated data binds the
blob's type, the format version and its id (never its pack or offset, so a sealed blob
can move between packs and related repositories without being opened). Every blob has
its own key, so the GCM nonce limit of 2**32 messages per key does not apply; the bound
is a salt collision, 2**-32 after 2**48 blobs (docs/threat-model.md).
"""

from __future__ import annotations

import os
import struct
import threading
from dataclasses import dataclass

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kyrorepo.errors import IntegrityError
from kyrorepo.format import FORMAT_VERSION, BlobType

MASTER_KEY_LEN = 32
SALT_LEN = 16
TAG_LEN = 16
SEAL_OVERHEAD = SALT_LEN + TAG_LEN

CTX_ID = "kyrorepo 2026-11 blob id key"
CTX_SEAL = "kyrorepo 2026-11 blob seal key"
CTX_CHUNKER = "kyrorepo 2026-11 chunker gear seed"

_AD = struct.Struct("<4sBB32s")
SALT_BATCH = 256  # salts drawn from the OS at a time


class _SaltSource(threading.local):
    """Random salts drawn from ``os.urandom`` ``SALT_BATCH`` at a time, per thread.

    ``os.urandom`` is a system call that releases the GIL: one per blob made every
    sealing thread give the GIL up and wait for it again 27,000 times per GiB. The
    salts are the same OS randomness, only fetched in batches. A process forked from
    this one must never reuse its parent's salts (a repeated salt repeats a blob key
    and nonce), so a fork in the child discards every batch drawn before it.
    """

    generation = 0  # bumped in a forked child

    def __init__(self) -> None:
        self.batch = b""
        self.pos = 0
        self.drawn_in = -1

    def take(self) -> bytes:
        if self.pos >= len(self.batch) or self.drawn_in != _SaltSource.generation:
            self.batch = os.urandom(SALT_LEN * SALT_BATCH)
            self.pos = 0
            self.drawn_in = _SaltSource.generation
        start = self.pos
        self.pos = start + SALT_LEN
        return self.batch[start:self.pos]


def _forked() -> None:
    _SaltSource.generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)
_salts = _SaltSource()


def associated_data(btype: BlobType, bid: bytes) -> bytes:
    return _AD.pack(b"KYRO", FORMAT_VERSION, int(btype), bid)


@dataclass(frozen=True)
class MasterKey:
    secret: bytes

    @classmethod
    def generate(cls) -> "MasterKey":
        return cls(os.urandom(MASTER_KEY_LEN))

    def subkey(self, context: str) -> bytes:
        return blake3.blake3(self.secret, derive_key_context=context).digest()

    def keys(self) -> "BlobKeys":
        seed_bytes = self.subkey(CTX_CHUNKER)[:8]
        seed = int.from_bytes(seed_bytes, "little") & ((1 << 63) - 1)
        return BlobKeys(self.subkey(CTX_ID), self.subkey(CTX_SEAL), seed)


@dataclass(frozen=True)
class BlobKeys:
    id_key: bytes
    seal_key: bytes
    chunker_seed: int

    def blob_id(self, data: bytes | memoryview) -> bytes:
        """Keyed BLAKE3 of a blob's plaintext: its id."""
        return blake3.blake3(data, key=self.id_key).digest()

    def hasher(self) -> "blake3.blake3":
        """An incremental keyed hasher (whole-file digests)."""
        return blake3.blake3(key=self.id_key)

    def _aead(self, salt: bytes) -> tuple[AESGCM, bytes]:
        okm = blake3.blake3(salt, key=self.seal_key).digest(44)
        return AESGCM(okm[:32]), okm[32:]

    def seal(self, btype: BlobType, bid: bytes, plaintext: bytes, salt: bytes | None = None) -> bytes:
        """Seal ``plaintext``; ``salt`` is random unless given (golden vectors only)."""
        salt = _salts.take() if salt is None else salt
        aead, nonce = self._aead(salt)
        return salt + aead.encrypt(nonce, plaintext, associated_data(btype, bid))

    def open(self, btype: BlobType, bid: bytes, sealed: bytes | memoryview, what: str) -> bytes:
        if len(sealed) < SEAL_OVERHEAD:
            raise IntegrityError(f"{what} is truncated ({len(sealed)} bytes)")
        aead, nonce = self._aead(bytes(sealed[:SALT_LEN]))
        try:
            return aead.decrypt(nonce, memoryview(sealed)[SALT_LEN:], associated_data(btype, bid))  # no copy
        except InvalidTag:
            raise IntegrityError(
                f"{what} failed authentication: it is damaged, truncated or not the object its name says"
            ) from None
