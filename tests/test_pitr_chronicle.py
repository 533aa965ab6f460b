"""restore-pitr of Chronicle data directories across rotation and deletion of segments."""

from __future__ import annotations

import os

import pytest

from test_wal_capture import START, Kr, make_chronicle

DB = "data.db"


@pytest.fixture
def kr(repo_cli, capsys, monkeypatch) -> Kr:
    return Kr(repo_cli, capsys, monkeypatch)


def frames_in(path: str) -> list[tuple[int, bytes]]:
    with open(path, "rb") as f:
        data = f.read()
    return [(ns // 10**9, data[off:end]) for off, end, ns in make_chronicle.read_frames(path)[0]]


class Log:
    """Every frame the database wrote, in order, including those of deleted segments."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.dropped: list[tuple[int, bytes]] = []

    def drop_oldest(self) -> None:
        self.dropped += frames_in(os.path.join(self.root, make_chronicle.segments(self.root)[0]))
        make_chronicle.drop_oldest(self.root)

    def frames(self) -> list[tuple[int, bytes]]:
        out = list(self.dropped)
        for name in make_chronicle.segments(self.root):
            out += frames_in(os.path.join(self.root, name))
        return out


def check_restored(out, log: list[tuple[int, bytes]], t: int, skip: int = 0) -> int:
    """The restored WAL holds exactly the frames up to ``t`` (but the first ``skip``, which
    the base backup's database file holds), byte for byte, in order, nothing torn."""
    names = make_chronicle.segments(str(out))
    assert set(os.listdir(out)) == {DB, *names}
    got = []
    for name in names:
        path = str(out / name)
        assert make_chronicle.read_frames(path)[1] == os.path.getsize(path)  # nothing torn
        got += frames_in(path)
    assert got == [f for f in log[skip:] if f[0] <= t]
    return len(got)


def test_restore_pitr_across_rotation_and_deletion(kr, tmp_path):
    d = str(tmp_path / "data")
    log = Log(d)

    def capture(t: int) -> None:
        kr("wal-archive", "--data-dir", d, "--source", "c", "--once", "--time", str(t))

    make_chronicle.create(d, frames=10)  # S..S+9
    kr.cli.run("backup", "--data-dir", d, "--source", "c", "--time", str(START + 9))
    make_chronicle.append(d, 10)  # S+10..19
    capture(START + 19)
    make_chronicle.rotate(d)
    make_chronicle.append(d, 10)  # S+20..29
    capture(START + 29)
    make_chronicle.rotate(d)
    make_chronicle.append(d, 5, torn_tail=True)  # S+30..34 and half a frame
    capture(START + 34)
    log.drop_oldest()
    make_chronicle.append(d, 5)  # S+35..39
    capture(START + 39)
    kr("backup", "--data-dir", d, "--source", "c", "--time", str(START + 40))
    make_chronicle.rotate(d)
    make_chronicle.append(d, 4)  # S+40..43
    capture(START + 44)
    full = log.frames()
    assert len(full) == 44

    out = tmp_path / "out"
    for t in range(START + 9, START + 45):
        r = kr.json("restore-pitr", "--timestamp", str(t), "--data-dir", str(out), "--allow-clear")
        n = check_restored(out, full, t, 20 if t >= START + 40 else 0)  # the second backup lacks A
        assert n == r["frames"] and r["codec"] == "chronicle"
        assert r["last_frame_timestamp"] == max(s for s, _ in full if s <= t)
    # segments keep the names they had at T: the active one of S+29 was rotated away after
    kr("restore-pitr", "--timestamp", str(START + 29), "--data-dir", str(out), "--allow-clear")
    assert make_chronicle.segments(str(out)) == ["data.db.wal.20231114T221339", "data.db.wal"]
    with open(tmp_path / "data" / DB, "rb") as a, open(out / DB, "rb") as b:
        assert a.read() == b.read()
    w = kr.json("pitr-window")[0]
    assert (w["earliest"], w["latest"], w["gaps"]) == (START + 9, START + 44, [])


def test_a_lost_segment_is_a_gap(kr, tmp_path):
    d = str(tmp_path / "data")
    log = Log(d)
    make_chronicle.create(d, frames=5)  # S..S+4
    kr("backup", "--data-dir", d, "--source", "c", "--time", str(START + 4))
    make_chronicle.append(d, 5)  # S+5..9
    kr("wal-archive", "--data-dir", d, "--source", "c", "--once", "--time", str(START + 9))
    make_chronicle.rotate(d)
    make_chronicle.append(d, 3)  # S+10..12, in a segment created and deleted between captures
    make_chronicle.rotate(d)
    make_chronicle.append(d, 3)  # S+13..15
    log.drop_oldest()
    log.drop_oldest()
    cap = kr.json("wal-archive", "--data-dir", d, "--source", "c", "--once", "--time", str(START + 15))
    assert [g["kind"] for g in cap["gaps"]] == ["lost-newest"]
    full = log.frames()

    out = tmp_path / "out"
    kr("restore-pitr", "--timestamp", str(START + 9), "--data-dir", str(out))
    check_restored(out, full, START + 9)
    _, err = kr("restore-pitr", "--timestamp", str(START + 12), "--data-dir", str(out), "--allow-clear", expect=14)
    assert "the newest segment of the previous capture is gone" in err and "--allow-gap" in err
    r = kr.json("restore-pitr", "--timestamp", str(START + 15), "--data-dir", str(out), "--allow-clear",
                "--allow-gap")
    assert r["timestamp"] == START + 9 and r["stopped_at_gap"]
    check_restored(out, full, START + 9)
    w = kr.json("pitr-window")[0]
    assert (w["earliest"], w["latest"], w["after_latest"]["from"]) == (START + 4, START + 9, START + 10)
