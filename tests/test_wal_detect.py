import os
import struct
import sys
import zlib
from pathlib import Path

import pytest

from kyrorepo.errors import UsageError
from kyrorepo.wal import ChronicleCodec, KyroDBCodec, SegmentsCodec, WalCodec
from kyrorepo.wal.detect import codec_names, detect_codec, get_codec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import make_chronicle  # noqa: E402
import make_kyrodb  # noqa: E402


def bench_like(root: Path) -> None:
    """What the benchmark dataset looks like: wal/wal_NNNNNN.wal without KyroDB's magic,
    records `8 B timestamp | 4 B length | payload | 4 B crc32`, a text MANIFEST."""
    (root / "wal").mkdir(parents=True)
    recs = b""
    for i in range(5):
        payload = b"record %d " % i * 10
        recs += struct.pack("<QI", 1_700_000_000_000_000 + i, len(payload)) + payload
        recs += struct.pack("<I", zlib.crc32(payload))
    (root / "wal" / "wal_000001.wal").write_bytes(recs + bytes(1024))
    (root / "wal" / "wal_000002.wal").write_bytes(bytes(1024))
    (root / "MANIFEST").write_text("CONTROL 120\nwal/wal_000001.wal 1024\n")
    (root / "CONTROL").write_text('{"seed": 42}')


def test_kyrodb_detected(tmp_path):
    make_kyrodb.create(str(tmp_path), frames=3)
    assert detect_codec(str(tmp_path)).name == "kyrodb"


def test_kyrodb_without_wal_detected_by_manifest(tmp_path):
    make_kyrodb.create(str(tmp_path), frames=0)
    for n in os.listdir(tmp_path):
        if n.startswith("wal_"):
            os.remove(tmp_path / n)
    assert detect_codec(str(tmp_path)).name == "kyrodb"


def test_kyrodb_wal_in_subdirectory(tmp_path):
    make_kyrodb.create(str(tmp_path / "wal"), frames=2)
    os.rename(tmp_path / "wal" / "MANIFEST", tmp_path / "MANIFEST")
    assert isinstance(detect_codec(str(tmp_path)), KyroDBCodec)


def test_chronicle_detected(tmp_path):
    make_chronicle.create(str(tmp_path), frames=3)
    make_chronicle.rotate(str(tmp_path))
    assert detect_codec(str(tmp_path)).name == "chronicle"


def test_plain_and_empty_dirs_not_detected(tmp_path):
    assert detect_codec(str(tmp_path)) is None
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "notes.wal").write_bytes(b"just some text, no frames")
    (tmp_path / "MANIFEST").write_text("[1, 2, 3]")
    assert detect_codec(str(tmp_path)) is None


def test_benchmark_like_wal_is_not_kyrodb(tmp_path):
    bench_like(tmp_path)
    assert not KyroDBCodec().detect(str(tmp_path))
    assert not ChronicleCodec().detect(str(tmp_path))
    assert detect_codec(str(tmp_path)) is None


def test_kyrodb_refused_when_a_segment_lacks_the_magic(tmp_path):
    make_kyrodb.create(str(tmp_path), frames=2)
    (tmp_path / "wal_1.wal").write_bytes(b"\x01\x02\x03\x04 not kyrodb")
    assert not KyroDBCodec().detect(str(tmp_path))


def test_get_codec():
    assert codec_names() == ["chronicle", "kyrodb", "segments"]
    assert get_codec("kyrodb").name == "kyrodb"
    assert get_codec("segments", patterns=["*.log"]).patterns == ("*.log",)
    with pytest.raises(UsageError, match="chronicle, kyrodb, segments"):
        get_codec("oracle")
    with pytest.raises(UsageError, match="not available yet"):
        get_codec("postgres")
    with pytest.raises(UsageError, match="takes no options"):
        get_codec("kyrodb", patterns="*")
    with pytest.raises(UsageError, match="unknown option"):
        get_codec("segments", glob="*")


@pytest.mark.parametrize("codec", [KyroDBCodec(), ChronicleCodec(), SegmentsCodec()])
def test_every_codec_has_the_interface(codec: WalCodec):
    for attr in WalCodec.__annotations__.keys() | {
        n for n in vars(WalCodec) if not n.startswith("_")
    }:
        assert hasattr(codec, attr), attr
    assert codec.name in codec_names()
