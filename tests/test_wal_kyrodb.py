import io
import json
import os
import struct
import sys
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kyrorepo.errors import IntegrityError, PitrUnreachableError
from kyrorepo.wal.base import SegmentScan
from kyrorepo.wal.kyrodb import (
    HEADER,
    KyroDBCodec,
    Record,
    decode_record,
    encode_frame,
    encode_record,
    parse_manifest,
    segment_time,
    snapshot_time,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import make_kyrodb  # noqa: E402

codec = KyroDBCodec()
START = 1_700_000_000

GOLDEN_RECORD = Record(1, 2, (1.0, -0.5), (("k", "v"),), 7, START)
GOLDEN_FRAME = bytes.fromhex(
    "46000000"  # len 70
    "01000000"
    "0200000000000000"  # op, doc_id
    "0200000000000000"
    "0000803f"
    "000000bf"  # embedding [1.0, -0.5]
    "0100000000000000"  # 1 metadata entry
    "0100000000000000"
    "6b"
    "0100000000000000"
    "76"  # "k" -> "v"
    "0700000000000000"
    "00f1536500000000"  # seq_no 7, timestamp 1700000000
    "0d3c26e8"  # crc32(payload)
)

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
records = st.builds(
    Record,
    op=u32,
    doc_id=u64,
    embedding=st.lists(st.floats(width=32, allow_nan=False), max_size=6).map(tuple),
    metadata=st.lists(st.tuples(st.text(max_size=5), st.text(max_size=5)), max_size=3).map(tuple),
    seq_no=u64,
    timestamp=st.integers(0, 2**40),
)


def segment(recs):
    return HEADER + b"".join(encode_frame(encode_record(r)) for r in recs)


def rec(seq, ts):
    return Record(0, seq, (0.5,), (), seq, ts)


def test_golden_frame():
    assert HEADER == b"\x00LAW"
    assert encode_frame(encode_record(GOLDEN_RECORD)) == GOLDEN_FRAME
    payload = GOLDEN_FRAME[4:-4]
    assert decode_record(payload) == GOLDEN_RECORD
    assert make_kyrodb.encode_payload(1, 2, [1.0, -0.5], [("k", "v")], 7, START) == payload
    assert make_kyrodb.frame_bytes(payload) == GOLDEN_FRAME


@given(st.lists(records, max_size=8))
def test_round_trip(recs):
    data = segment(recs)
    frames = list(codec.iter_frames(data))
    assert [(f.ident, f.time) for f in frames] == [(r.seq_no, r.timestamp) for r in recs]
    assert all(f.time_ns == f.time * 10**9 for f in frames)
    for f, r in zip(frames, recs):
        assert decode_record(data[f.offset + 4 : f.end - 4]) == r
    assert codec.valid_length(data) == len(data)
    assert list(codec.iter_frames(io.BytesIO(data))) == frames


@settings(max_examples=60)
@given(st.lists(records, min_size=1, max_size=5), st.data())
def test_torn_tail_is_ignored(recs, data):
    whole = segment(recs)
    ends = [f.end for f in codec.iter_frames(whole)]
    cut = data.draw(st.integers(0, len(whole)))
    part = whole[:cut]
    kept = [e for e in ends if e <= cut]
    expected_len = kept[-1] if kept else min(cut, 4) if cut >= 4 else 0
    assert codec.valid_length(part) == expected_len
    assert len(list(codec.iter_frames(part))) == len(kept)
    s = codec.scan("wal_1.wal", part)
    assert s.count == len(kept) and s.torn_tail == (cut not in [4, *ends] and cut > 0)


def test_bad_crc_in_last_frame_is_a_torn_tail():
    data = bytearray(segment([rec(1, START), rec(2, START + 1)]))
    data[-1] ^= 0xFF
    assert [f.ident for f in codec.iter_frames(bytes(data))] == [1]
    assert codec.scan("wal_1.wal", bytes(data)).torn_tail


@pytest.mark.parametrize("where", ["payload", "crc", "length"])
def test_damage_in_the_middle_raises(where):
    data = bytearray(segment([rec(i, START + i) for i in range(1, 5)]))
    second = list(codec.iter_frames(bytes(data)))[1]
    pos = {"payload": second.offset + 10, "crc": second.end - 1, "length": second.offset}[where]
    data[pos] ^= 0x40 if where == "length" else 0xFF
    with pytest.raises(IntegrityError, match="damaged in the middle"):
        list(codec.iter_frames(bytes(data)))
    with pytest.raises(IntegrityError, match="wal_9.wal"):
        codec.scan("wal_9.wal", bytes(data))


def test_zero_padded_tail_and_bad_magic():
    data = segment([rec(1, START)])
    assert codec.valid_length(data + bytes(4096)) == len(data)
    assert codec.valid_length(b"") == 0 and codec.valid_length(HEADER[:2]) == 0
    with pytest.raises(IntegrityError, match="not a KyroDB WAL segment"):
        codec.valid_length(b"\x00\x00\x00\x01" + data[4:])


def test_cut_keeps_exactly_frames_up_to_t(tmp_path):
    root = str(tmp_path)
    make_kyrodb.create(root, start=START, frames=40, seconds_per_frame=0.4, frames_per_segment=7)
    names = parse_manifest((tmp_path / "MANIFEST").read_bytes()).wal_segments
    datas = [(tmp_path / n).read_bytes() for n in names]
    times = [f.time for d in datas for f in codec.iter_frames(d)]
    for t in range(START - 1, max(times) + 2):
        kept, stopped = [], False
        for d in datas:
            cp = codec.cut_point(d, t)
            out = codec.cut(d, t)
            assert out == d[: cp.length] and out[:4] == HEADER
            frames = list(codec.iter_frames(out))
            assert codec.valid_length(out) == len(out)
            assert len(frames) == cp.frames
            if stopped:
                assert cp.frames == 0
            kept += frames
            stopped = stopped or cp.stop
        assert [f.time for f in kept] == [x for x in times if x <= t]


def test_cut_is_a_prefix_when_times_go_backwards():
    data = segment([rec(1, START), rec(2, START + 5), rec(3, START + 1)])
    cp = codec.cut_point(data, START + 2)
    assert (cp.frames, cp.stop, cp.last_ident) == (1, True, 1)


def test_names():
    assert segment_time("wal/wal_1700000000123456.wal") == 1700000000123456
    assert segment_time("wal_000001.log") is None
    assert snapshot_time("snapshot_1700000001000000.snap") == 1700000001000000
    assert snapshot_time("snapshot_100") == 100
    assert codec.is_segment("x/wal_12.wal") and not codec.is_segment("wal_12.wal.bak")
    assert codec.is_metadata("MANIFEST") and codec.metadata_files() == ("MANIFEST",)


def test_base_usable():
    names = ["MANIFEST", "snapshot_1700000010999999.snap", "wal_1.wal"]
    assert codec.base_usable(names, START + 10)
    assert not codec.base_usable(names, START + 9)


def manifest(segs, snap="snapshot_1700000000000000.snap", seq=0, extra=None):
    m = {
        "version": 3,
        "latest_snapshot": snap,
        "latest_snapshot_wal_seq": seq,
        "wal_segments": segs,
        "last_updated": START,
        **(extra or {}),
    }
    return json.dumps(m).encode()


def test_fix_metadata_lists_exactly_restored_segments():
    snap = "snapshot_1700000000000000.snap"
    meta = {"MANIFEST": manifest(["wal_1.wal", "wal_2.wal", "wal_3.wal"], extra={"x": 1})}
    restored = ["wal_1.wal", "wal_2.wal", "wal_4.wal"]
    out = codec.fix_metadata(meta, restored, {snap, *restored, "MANIFEST"}, START + 5)
    obj = json.loads(out["MANIFEST"])
    assert obj["wal_segments"] == restored
    assert obj["last_updated"] == START + 5 and obj["x"] == 1 and obj["version"] == 3
    assert parse_manifest(out["MANIFEST"]).latest_snapshot == snap


def test_fix_metadata_in_subdirectories():
    snap = "snapshot_1700000000000000.snap"
    meta = {"db/MANIFEST": manifest(["wal_1.wal"])}
    out = codec.fix_metadata(meta, ["db/wal_1.wal", "db/wal_2.wal"], {"db/" + snap}, START)
    assert json.loads(out["db/MANIFEST"])["wal_segments"] == ["wal_1.wal", "wal_2.wal"]
    meta = {"MANIFEST": manifest(["wal/wal_1.wal"])}
    out = codec.fix_metadata(meta, ["wal/wal_1.wal"], {snap}, START)
    assert json.loads(out["MANIFEST"])["wal_segments"] == ["wal/wal_1.wal"]


def test_fix_metadata_refuses_a_missing_or_newer_snapshot():
    meta = {"MANIFEST": manifest(["wal_1.wal"])}
    with pytest.raises(PitrUnreachableError, match="lacks"):
        codec.fix_metadata(meta, ["wal_1.wal"], {"wal_1.wal"}, START)
    with pytest.raises(PitrUnreachableError, match="after the target"):
        codec.fix_metadata(meta, [], {"snapshot_1700000000000000.snap"}, START - 1)
    with pytest.raises(PitrUnreachableError):
        codec.fix_metadata({}, [], set(), START)
    with pytest.raises(IntegrityError):
        codec.fix_metadata({"MANIFEST": b"not json"}, [], set(), START)
    none = {"MANIFEST": manifest([], snap=None)}
    assert json.loads(codec.fix_metadata(none, [], set(), START)["MANIFEST"])["wal_segments"] == []


def scans_of(root):
    names = parse_manifest(Path(root, "MANIFEST").read_bytes()).wal_segments
    return [codec.scan(n, Path(root, n).read_bytes()) for n in names]


def test_gaps(tmp_path):
    root = str(tmp_path)
    make_kyrodb.create(root, start=START, frames=12, frames_per_segment=4)
    chain = scans_of(root)
    meta = {"MANIFEST": (tmp_path / "MANIFEST").read_bytes()}
    assert codec.find_gaps(chain, meta) == []
    assert codec.replay_order(reversed(chain)) == chain
    hole = codec.find_gaps([chain[0], chain[2]])
    assert [(g.kind, g.after_ident, g.before_ident, g.last_good_time) for g in hole] == [
        ("seq", 4, 9, START + 3)
    ]
    start = codec.find_gaps(chain[1:], meta)
    assert [(g.kind, g.after_ident, g.before_ident) for g in start] == [("start", 0, 5)]
    assert codec.find_gaps([chain[0], chain[0]]) == []  # same identity counted once
    # between captures: old segments dropped is fine, a never-seen one is a gap
    assert codec.capture_gaps(chain[:2], chain[1:]) == []
    assert [g.kind for g in codec.capture_gaps(chain[:1], chain[2:])] == ["seq"]


def test_internal_gap_and_shrink():
    data = segment([rec(1, START), rec(2, START), rec(5, START + 1)])
    s = codec.scan("wal_1.wal", data)
    assert s.internal_gap is not None and s.internal_gap.before_ident == 5
    assert [g.kind for g in codec.find_gaps([s])] == ["seq"]
    small = codec.scan("wal_1.wal", segment([rec(1, START)]))
    good = codec.scan("wal_1.wal", segment([rec(1, START), rec(2, START)]))
    assert [g.kind for g in codec.capture_gaps([good], [small])] == ["shrunk"]


def test_scan_serialises(tmp_path):
    make_kyrodb.create(str(tmp_path), frames=3)
    for s in scans_of(str(tmp_path)):
        d = json.loads(json.dumps(s.to_dict()))
        assert SegmentScan.from_dict(d) == s
    s = codec.scan("wal_1.wal", segment([rec(1, START), rec(3, START)]))
    assert SegmentScan.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_pitr_restore_of_a_generated_directory(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_kyrodb.create(str(src), start=START, frames=10, frames_per_segment=4)
    make_kyrodb.append(str(src), frames=6, torn_tail=True)
    t = START + 12
    chain = codec.replay_order(scans_of(src))
    dst.mkdir()
    restored = []
    for s in chain:
        cp = codec.cut_point((src / s.relpath).read_bytes(), t)
        if cp.frames or not cp.stop:
            (dst / s.relpath).write_bytes((src / s.relpath).read_bytes()[: cp.length])
            restored.append(s.relpath)
        if cp.stop:
            break
    snap = parse_manifest((src / "MANIFEST").read_bytes()).latest_snapshot
    (dst / snap).write_bytes((src / snap).read_bytes())
    meta = {"MANIFEST": (src / "MANIFEST").read_bytes()}
    for rel, content in codec.fix_metadata(meta, restored, set(os.listdir(dst)), t).items():
        (dst / rel).write_bytes(content)
    info = make_kyrodb.info(str(dst))
    assert set(info["manifest"]["wal_segments"]) == {
        n for n in os.listdir(dst) if n.startswith("wal_")
    }
    seqs = [
        x for seg in info["segments"] if seg["seq"] for x in range(seg["seq"][0], seg["seq"][1] + 1)
    ]
    assert seqs == list(range(1, 14)) and info["segments"][-1]["time"][1] == t
    assert all(seg["size"] == seg["valid_length"] for seg in info["segments"])


def test_generator_is_deterministic(tmp_path):
    for d in ("a", "b"):
        make_kyrodb.create(str(tmp_path / d), frames=5, seed=7)
        make_kyrodb.append(str(tmp_path / d), frames=3, seed=7)
    for name in os.listdir(tmp_path / "a"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_frame_checksum_matches_zlib():
    payload = encode_record(rec(1, START))
    frame = encode_frame(payload)
    assert struct.unpack("<I", frame[-4:])[0] == zlib.crc32(payload)


def test_gaps_relative_to_the_snapshot():
    seg = lambda name, seqs: codec.scan(name, segment([rec(i, START + i) for i in seqs]))  # noqa: E731
    a, b, c = seg("wal_1.wal", [1, 2]), seg("wal_2.wal", [5, 6]), seg("wal_3.wal", [7, 8])
    meta = {"MANIFEST": manifest([], seq=5)}
    assert codec.find_gaps([a, b, c], meta) == []  # the 2 -> 5 break is inside the snapshot
    assert [g.kind for g in codec.find_gaps([a, b, c])] == ["seq"]
    meta = {"MANIFEST": manifest([], seq=3)}
    assert [g.kind for g in codec.find_gaps([a, b, c], meta)] == ["seq"]
    assert [g.kind for g in codec.find_gaps([b, c], meta)] == ["start"]
    assert codec.find_gaps([a], meta) == []  # nothing after the snapshot yet


def test_replay_order_places_empty_segments_by_name():
    a = codec.scan("wal_100.wal", segment([rec(1, START)]))
    e = codec.scan("wal_150.wal", HEADER)
    b = codec.scan("wal_200.wal", segment([rec(2, START)]))
    assert codec.replay_order([b, e, a]) == [a, e, b]


def test_malformed_scan_record():
    with pytest.raises(IntegrityError):
        SegmentScan.from_dict({"relpath": "x", "identity": "x", "size": "big"})
