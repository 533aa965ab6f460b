"""Choosing a WAL codec: by name (``--wal NAME``) or by looking at a data directory.

Detection reads content, never names alone: a directory of ``wal_000001.wal`` files
without KyroDB's magic is no KyroDB directory and is backed up as plain files.
"""

from __future__ import annotations

from collections.abc import Callable

from kyrorepo.errors import UsageError
from kyrorepo.wal.base import WalCodec
from kyrorepo.wal.chronicle import ChronicleCodec
from kyrorepo.wal.kyrodb import KyroDBCodec
from kyrorepo.wal.segments import SegmentsCodec


def _kyrodb(**opts: object) -> WalCodec:
    _no_options("kyrodb", opts)
    return KyroDBCodec()


def _chronicle(**opts: object) -> WalCodec:
    _no_options("chronicle", opts)
    return ChronicleCodec()


def _segments(**opts: object) -> WalCodec:
    unknown = set(opts) - {"patterns"}
    if unknown:
        raise UsageError(f"--wal segments: unknown option(s) {', '.join(sorted(unknown))}")
    patterns = opts.get("patterns")
    if patterns is None:
        return SegmentsCodec()
    if isinstance(patterns, str):
        return SegmentsCodec(patterns)
    if isinstance(patterns, (list, tuple)) and all(isinstance(p, str) for p in patterns):
        return SegmentsCodec(tuple(patterns))
    raise UsageError("--wal segments: patterns must be a glob or a list of globs")


CODECS: dict[str, Callable[..., WalCodec]] = {
    "kyrodb": _kyrodb,
    "chronicle": _chronicle,
    "segments": _segments,
}
"""Codec constructors by ``--wal`` name."""

DETECTION_ORDER: tuple[str, ...] = ("kyrodb", "chronicle")
PLANNED = ("postgres",)


def codec_names() -> list[str]:
    return sorted(CODECS)


def get_codec(name: str, **opts: object) -> WalCodec:
    """The codec called ``name``; UsageError naming the known codecs otherwise."""
    make = CODECS.get(name)
    if make is None:
        known = ", ".join(codec_names())
        if name in PLANNED:
            raise UsageError(f"--wal {name} is not available yet; known codecs: {known}")
        raise UsageError(f"unknown WAL codec {name!r}; known codecs: {known}")
    return make(**opts)


def detect_codec(root: str) -> WalCodec | None:
    """The first codec (kyrodb, then chronicle) whose content check accepts ``root``;
    None for a directory of plain files."""
    for name in DETECTION_ORDER:
        codec = CODECS[name]()
        if codec.detect(root):
            return codec
    return None


def _no_options(name: str, opts: dict[str, object]) -> None:
    if opts:
        raise UsageError(f"--wal {name} takes no options (got {', '.join(sorted(opts))})")
