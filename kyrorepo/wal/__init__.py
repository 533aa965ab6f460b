"""WAL codecs: pure readers of database write-ahead logs (see docs/wal-codecs.md)."""

from kyrorepo.wal.base import CutPoint, Frame, Gap, SegmentScan, Source, WalCodec
from kyrorepo.wal.chronicle import ChronicleCodec
from kyrorepo.wal.detect import codec_names, detect_codec, get_codec
from kyrorepo.wal.kyrodb import KyroDBCodec
from kyrorepo.wal.segments import SegmentsCodec

__all__ = [
    "ChronicleCodec",
    "CutPoint",
    "Frame",
    "Gap",
    "KyroDBCodec",
    "SegmentScan",
    "SegmentsCodec",
    "Source",
    "WalCodec",
    "codec_names",
    "detect_codec",
    "get_codec",
]
