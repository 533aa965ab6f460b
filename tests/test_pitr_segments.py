"""restore-pitr with the segments codec: per file, the newest capture at or before T."""

from __future__ import annotations

import os

import pytest

from test_wal_capture import START, Kr

WAL = ["--wal", "segments:*.log"]


@pytest.fixture
def kr(repo_cli, capsys, monkeypatch) -> Kr:
    return Kr(repo_cli, capsys, monkeypatch)


def content(root) -> dict[str, bytes]:
    out = {}
    for name in os.listdir(root):
        with open(os.path.join(root, name), "rb") as f:
            out[name] = f.read()
    return out


def test_each_file_as_of_its_newest_capture(kr, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "config.ini").write_text("plain file, not a segment\n")
    (d / "a.log").write_text("a0\n")
    (d / "b.log").write_text("b0\n")
    states = {}

    def append(name: str, text: str) -> None:
        with open(d / name, "a") as f:
            f.write(text)

    def capture(t: int, *extra: str):
        states[t] = content(d)
        return kr.json("wal-archive", "--data-dir", str(d), "--source", "s", "--once", "--time", str(t), *WAL, *extra)

    kr("backup", "--data-dir", str(d), "--source", "s", "--time", str(START), *WAL)
    states[START] = content(d)
    append("a.log", "a1\n")
    capture(START + 10)
    append("b.log", "b1\n" * 1000)
    append("c.log", "c0\n")
    capture(START + 20)
    os.remove(d / "a.log")
    append("c.log", "c1\n")
    assert capture(START + 30)["gaps"] == []
    os.remove(d / "c.log")
    append("b.log", "b2\n")
    assert [g["kind"] for g in capture(START + 40)["gaps"]] == ["lost-newest"]

    out = tmp_path / "out"
    for t in range(START, START + 40, 3):
        kr("restore-pitr", "--timestamp", str(t), "--data-dir", str(out), "--allow-clear")
        assert content(out) == states[max(s for s in states if s <= t)], t
    _, err = kr("restore-pitr", "--timestamp", str(START + 40), "--data-dir", str(out), "--allow-clear", expect=14)
    assert "c.log" in err
    r = kr.json("restore-pitr", "--timestamp", str(START + 40), "--data-dir", str(out), "--allow-clear", "--allow-gap")
    assert r["timestamp"] == START + 39 and content(out) == states[START + 30]
    w = kr.json("pitr-window")[0]
    assert (w["codec"], w["earliest"], w["latest"], w["after_latest"]["from"]) == \
        ("segments", START, START + 39, START + 40)
