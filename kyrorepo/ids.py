"""Identifiers: 32-byte blob ids, pack ids, snapshot ids, shown as lowercase hex."""

from __future__ import annotations

from typing import NewType

ID_LEN = 32
SHORT_ID_LEN = 8

BlobId = NewType("BlobId", bytes)
PackId = NewType("PackId", bytes)
SnapshotId = NewType("SnapshotId", bytes)


def to_hex(ident: bytes) -> str:
    return ident.hex()


def short(ident: bytes) -> str:
    return ident.hex()[:SHORT_ID_LEN]


def from_hex(text: str) -> bytes:
    """Parse a full 64-hex id; raise ValueError on anything else."""
    raw = bytes.fromhex(text)
    if len(raw) != ID_LEN:
        raise ValueError(f"id {text!r} is not {ID_LEN * 2} hex digits")
    return raw


def is_hex_prefix(text: str) -> bool:
    return 0 < len(text) <= ID_LEN * 2 and all(c in "0123456789abcdef" for c in text)


def is_full_hex(text: str) -> bool:
    """Whether ``text`` is a whole id in lowercase hex (an object name)."""
    return len(text) == ID_LEN * 2 and is_hex_prefix(text)
