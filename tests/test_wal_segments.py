import io

import pytest

from kyrorepo.errors import KyroError, UsageError
from kyrorepo.wal.detect import get_codec
from kyrorepo.wal.segments import SegmentsCodec

START = 1_700_000_000
NS = 10**9


def test_patterns():
    c = SegmentsCodec()
    assert c.is_segment("wal/wal_000001.wal") and c.is_segment("a.wal")
    assert not c.is_segment("a.wal.1") and not c.is_segment("tables/t_0001.dat")
    c = SegmentsCodec(["pg_wal/*", "*.log"])
    assert c.is_segment("pg_wal/000000010000000000000001") and c.is_segment("x/y.log")
    assert not c.is_segment("other/000000010000000000000001")
    assert get_codec("segments", patterns="*.log").is_segment("a.log")
    with pytest.raises(UsageError):
        SegmentsCodec([])


def test_one_pseudo_frame_per_capture():
    c = SegmentsCodec()
    ns = START * NS + 123
    [f] = list(c.iter_frames(b"abc", capture_time_ns=ns))
    assert (f.offset, f.end, f.time, f.time_ns, f.ident) == (0, 3, START, ns, None)
    assert list(c.iter_frames(io.BytesIO(b""), capture_time_ns=ns)) == []
    s = c.scan("a.wal", b"abc", capture_time_ns=ns)
    assert (s.identity, s.count, s.end_of_valid, s.torn_tail) == ("a.wal", 1, 3, False)
    assert c.valid_length(b"abc\x00\x00") == 5
    with pytest.raises(KyroError, match="capture time"):
        list(c.iter_frames(b"abc"))


def test_cut_keeps_a_capture_whole_or_not_at_all():
    c = SegmentsCodec()
    ns = START * NS + 999_999_999
    assert c.cut(b"abc", START, capture_time_ns=ns) == b"abc"
    assert c.cut(b"abc", START - 1, capture_time_ns=ns) == b""
    cp = c.cut_point(b"abc", START - 1, capture_time_ns=ns)
    assert (cp.length, cp.frames, cp.stop) == (0, 0, False)


def test_gaps():
    c = SegmentsCodec()
    ns = START * NS
    a1 = c.scan("wal_1.wal", b"aaaa", capture_time_ns=ns)
    b1 = c.scan("wal_2.wal", b"bb", capture_time_ns=ns)
    b2 = c.scan("wal_2.wal", b"bbbb", capture_time_ns=ns + NS)
    c2 = c.scan("wal_3.wal", b"c", capture_time_ns=ns + NS)
    assert c.find_gaps([a1, b1]) == []
    assert c.capture_gaps([a1, b1], [b2, c2]) == []  # the oldest may go
    assert [g.kind for g in c.capture_gaps([a1, b1], [a1, c2])] == ["lost-newest"]
    short = c.scan("wal_2.wal", b"b", capture_time_ns=ns + NS)
    assert [g.kind for g in c.capture_gaps([b2], [short])] == ["shrunk"]
    assert c.fix_metadata({}, [], set(), START) == {} and c.base_usable([], 0)
    assert not c.detect("/nonexistent")
