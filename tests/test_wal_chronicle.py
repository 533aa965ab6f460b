import io
import json
import os
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kyrorepo.errors import IntegrityError
from kyrorepo.wal.base import SegmentScan
from kyrorepo.wal.chronicle import (
    ChronicleCodec,
    Point,
    db_of,
    decode_points,
    encode_frame,
    encode_points,
    newest_timestamp,
    rotated_name,
    rotation_time,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import make_chronicle  # noqa: E402

codec = ChronicleCodec()
START = 1_700_000_000
NS = 10**9

GOLDEN_POINT = Point("cpu", (("host", "a"),), 1.5, 1_700_000_000_123_456_789)
GOLDEN_FRAME = bytes.fromhex(
    "2c000000"
    "e1745b35"  # len 44, crc32(payload)
    "01000000"  # 1 point
    "03000000"
    "637075"  # metric "cpu"
    "01000000"
    "04000000"
    "686f7374"
    "01000000"
    "61"  # tags {host: a}
    "000000000000f83f"  # value 1.5
    "15cd853dfe9c9717"  # timestamp ns
)

points = st.builds(
    Point,
    metric=st.text(max_size=6),
    tags=st.lists(st.tuples(st.text(max_size=4), st.text(max_size=4)), max_size=3).map(tuple),
    value=st.floats(allow_nan=False),
    timestamp_ns=st.integers(0, 2**62),
)
batches = st.lists(st.lists(points, max_size=4), max_size=6)


def segment(batches):
    return b"".join(encode_frame(encode_points(b)) for b in batches)


def batch(second, n=2):
    return [Point("m", (), float(i), second * NS + i * 1000) for i in range(n)]


def test_golden_frame():
    assert encode_frame(encode_points([GOLDEN_POINT])) == GOLDEN_FRAME
    assert decode_points(GOLDEN_FRAME[8:]) == [GOLDEN_POINT]
    raw = [(p.metric, list(p.tags), p.value, p.timestamp_ns) for p in [GOLDEN_POINT]]
    assert make_chronicle.frame_bytes(make_chronicle.encode_points(raw)) == GOLDEN_FRAME


@given(batches)
def test_round_trip(bs):
    data = segment(bs)
    frames = list(codec.iter_frames(data))
    assert len(frames) == len(bs)
    last = 0
    for f, b in zip(frames, bs):
        assert decode_points(data[f.offset + 8 : f.end]) == b
        last = max(p.timestamp_ns for p in b) if b else last
        assert (f.time_ns, f.time, f.ident) == (last, last // NS, None)
    assert codec.valid_length(data) == len(data)
    assert list(codec.iter_frames(io.BytesIO(data))) == frames


@settings(max_examples=60)
@given(st.lists(st.lists(points, min_size=1, max_size=3), min_size=1, max_size=4), st.data())
def test_torn_tail_is_ignored(bs, data):
    whole = segment(bs)
    ends = [f.end for f in codec.iter_frames(whole)]
    cut = data.draw(st.integers(0, len(whole)))
    kept = [e for e in ends if e <= cut]
    assert codec.valid_length(whole[:cut]) == (kept[-1] if kept else 0)
    assert codec.scan("data.db.wal", whole[:cut]).torn_tail == (cut not in [0, *ends])


@pytest.mark.parametrize("where", ["payload", "crc", "length"])
def test_damage_in_the_middle_raises(where):
    data = bytearray(segment([batch(START + i) for i in range(4)]))
    second = list(codec.iter_frames(bytes(data)))[1]
    pos = {"payload": second.offset + 12, "crc": second.offset + 4, "length": second.offset}[where]
    data[pos] ^= 0x10
    with pytest.raises(IntegrityError, match="damaged in the middle"):
        codec.valid_length(bytes(data))


def test_bad_crc_in_last_frame_is_a_torn_tail():
    data = bytearray(segment([batch(START), batch(START + 1)]))
    data[-1] ^= 0xFF
    assert len(list(codec.iter_frames(bytes(data)))) == 1


def test_valid_crc_but_broken_payload_raises():
    bad = encode_frame(b"\x05\x00\x00\x00")  # claims 5 points, has none
    with pytest.raises(IntegrityError, match="does not decode"):
        list(codec.iter_frames(bad))


def test_empty_frame_takes_previous_time():
    data = segment([[], batch(START + 3), []])
    assert [f.time for f in codec.iter_frames(data)] == [0, START + 3, START + 3]
    assert newest_timestamp(encode_points([])) is None


def test_names():
    assert db_of("data.db.wal") == "data.db" and db_of("x/data.wal.20240101T000000") == "data"
    assert db_of("data.db") is None and db_of("data.wal.2024") is None
    assert rotation_time("data.db.wal.19700101T000010") == 10
    assert rotation_time("data.db.wal") is None
    assert rotated_name("data.db.wal", START) == "data.db.wal.20231114T221320"
    assert codec.is_segment("data.db.wal.20231114T221320") and not codec.is_segment("data.db")
    assert codec.metadata_files() == () and codec.base_usable(["data.db"], 0)
    assert codec.fix_metadata({}, ["data.db.wal"], {"data.db.wal"}, START) == {}


def scans(root):
    return [codec.scan(n, Path(root, n).read_bytes()) for n in make_chronicle.segments(root)]


def test_identity_survives_rotation(tmp_path):
    root = str(tmp_path)
    make_chronicle.create(root, start=START, frames=5)
    before = codec.scan("data.db.wal", (tmp_path / "data.db.wal").read_bytes())
    rotated = make_chronicle.rotate(root)
    after = codec.scan(rotated, (tmp_path / rotated).read_bytes())
    assert before.identity == after.identity and before.identity.startswith("data.db.wal@")
    empty = codec.scan("data.db.wal", (tmp_path / "data.db.wal").read_bytes())
    assert empty.identity == "data.db.wal#empty" and empty.count == 0
    make_chronicle.append(root, frames=2)
    grown = codec.scan("data.db.wal", (tmp_path / "data.db.wal").read_bytes())
    assert grown.identity not in (before.identity, empty.identity)
    make_chronicle.append(root, frames=2)
    assert (
        codec.scan("data.db.wal", (tmp_path / "data.db.wal").read_bytes()).identity
        == grown.identity
    )


def test_cut_keeps_exactly_frames_up_to_t(tmp_path):
    root = str(tmp_path)
    make_chronicle.create(root, start=START, frames=12, seconds_per_frame=0.5)
    make_chronicle.rotate(root)
    make_chronicle.append(root, frames=12, seconds_per_frame=0.5, torn_tail=True)
    chain = codec.replay_order(scans(root))
    assert chain[-1].relpath == "data.db.wal" and chain[-1].torn_tail
    datas = [(tmp_path / s.relpath).read_bytes() for s in chain]
    times = [f.time for d in datas for f in codec.iter_frames(d)]
    assert times == sorted(times)
    for t in range(START - 1, times[-1] + 2):
        kept, stopped = [], False
        for d in datas:
            cp = codec.cut_point(d, t)
            out = codec.cut(d, t)
            frames = list(codec.iter_frames(out))
            assert len(frames) == cp.frames and codec.valid_length(out) == len(out)
            assert not (stopped and frames)
            kept += frames
            stopped = stopped or cp.stop
        assert [f.time for f in kept] == [x for x in times if x <= t]


def test_replay_order_across_captures(tmp_path):
    root = str(tmp_path)
    make_chronicle.create(root, start=START, frames=3)
    first = scans(root)  # only data.db.wal
    make_chronicle.rotate(root)
    make_chronicle.append(root, frames=3)
    make_chronicle.rotate(root)
    make_chronicle.append(root, frames=1)
    second = scans(root)
    from_first = first[0]  # the same segment, then still active
    merged = codec.replay_order([from_first] + second[1:])
    assert [s.first_time for s in merged] == [START, START + 3, START + 6]


def test_capture_gaps(tmp_path):
    root = str(tmp_path)
    make_chronicle.create(root, start=START, frames=3)
    c1 = scans(root)
    make_chronicle.rotate(root)
    make_chronicle.append(root, frames=2)
    c2 = scans(root)
    assert codec.capture_gaps(c1, c2) == [] and codec.find_gaps(c2) == []
    make_chronicle.rotate(root)
    make_chronicle.append(root, frames=2)
    make_chronicle.drop_oldest(root)
    make_chronicle.drop_oldest(root)
    c3 = scans(root)
    gaps = codec.capture_gaps(c2, c3)
    assert [g.kind for g in gaps] == ["lost-newest"] and gaps[0].last_good_time == START + 4
    shrunk = codec.scan(c2[-1].relpath, (tmp_path / c3[-1].relpath).read_bytes()[:0])
    assert codec.capture_gaps([c2[-1]], [shrunk])  # empty now: identity lost
    grown = codec.scan("data.db.wal", segment([batch(START), batch(START + 1)]))
    cut = codec.scan("data.db.wal", segment([batch(START)]))
    assert [g.kind for g in codec.capture_gaps([grown], [cut])] == ["shrunk"]


def test_scan_serialises(tmp_path):
    make_chronicle.create(str(tmp_path), frames=3)
    for s in scans(str(tmp_path)):
        assert SegmentScan.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_generator_is_deterministic(tmp_path):
    for d in ("a", "b"):
        make_chronicle.create(str(tmp_path / d), frames=4, seed=3)
        make_chronicle.rotate(str(tmp_path / d))
        make_chronicle.append(str(tmp_path / d), frames=2, seed=3)
    assert sorted(os.listdir(tmp_path / "a")) == sorted(os.listdir(tmp_path / "b"))
    for name in os.listdir(tmp_path / "a"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
