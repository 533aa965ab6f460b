"""restore-pitr of KyroDB data directories: exact to the second, gaps refused, window."""

from __future__ import annotations

import json
import os

import pytest

from conftest import Cli
from test_wal_capture import START, Kr, make_kyrodb


@pytest.fixture
def kr(repo_cli, capsys, monkeypatch) -> Kr:
    return Kr(repo_cli, capsys, monkeypatch)


def frames_of(root) -> dict[int, tuple[int, bytes]]:
    """seq_no -> (timestamp, frame bytes) of every valid frame in the segments of ``root``."""
    out = {}
    for name in os.listdir(root):
        if name.startswith("wal_") and name.endswith(".wal"):
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                data = f.read()
            for off, end, seq, ts in make_kyrodb.read_frames(path)[0]:
                out[seq] = (ts, data[off:end])
    return out


def check_restored(out, written: dict[int, tuple[int, bytes]], t: int, first_seq: int) -> int:
    """The restored WAL holds exactly the frames up to ``t`` (from ``first_seq``), byte for
    byte, in MANIFEST order, no torn bytes; the MANIFEST lists exactly the segments."""
    m = json.loads((out / "MANIFEST").read_text())
    on_disk = sorted(n for n in os.listdir(out) if n.startswith("wal_"))
    assert sorted(m["wal_segments"]) == on_disk
    assert m["last_updated"] == t and (out / m["latest_snapshot"]).exists()
    seqs = []
    for name in m["wal_segments"]:
        frames, valid = make_kyrodb.read_frames(str(out / name))
        assert valid == os.path.getsize(out / name)  # checksums hold to the end: nothing torn
        seqs += [seq for _, _, seq, _ in frames]
    want = sorted(s for s, (ts, _) in written.items() if ts <= t and s >= first_seq)
    assert seqs == want
    got = frames_of(out)
    assert all(got[s] == written[s] for s in want)
    return len(seqs)


def test_restore_pitr_is_exact_to_every_second(kr, tmp_path):
    d = str(tmp_path / "data")
    written: dict[int, tuple[int, bytes]] = {}

    def step(capture_at: int | None = None) -> None:
        written.update(frames_of(d))
        if capture_at is not None:
            kr("wal-archive", "--data-dir", d, "--source", "k", "--once", "--time", str(capture_at))

    make_kyrodb.create(d, frames=10, frames_per_segment=4)  # t = S..S+9, snapshot at S
    step()
    b1 = json.loads(kr.cli.run("create-full", "--data-dir", d, "--source", "k", "--time", str(START + 9),
                               "--json").stdout)
    make_kyrodb.append(d, 10, frames_per_segment=4)
    step(START + 19)
    make_kyrodb.append(d, 6, frames_per_segment=4, torn_tail=True)
    step(START + 25)
    make_kyrodb.snapshot(d)  # at S+25; the old snapshot goes
    make_kyrodb.drop_oldest(d)
    make_kyrodb.append(d, 4, frames_per_segment=4)
    step(START + 29)
    b2 = kr.json("backup", "--data-dir", d, "--source", "k", "--time", str(START + 29))["id"]
    make_kyrodb.append(d, 5, frames_per_segment=4)
    step(START + 34)
    make_kyrodb.snapshot(d)  # at S+34, yet backed up as of S+33: unusable before S+34
    b3 = kr.json("backup", "--data-dir", d, "--source", "k", "--time", str(START + 33))["id"]
    written.update(frames_of(d))

    out = tmp_path / "out"
    bases = {}
    for t in range(START + 9, START + 35):
        plan = kr.json("restore-pitr", "--timestamp", str(t), "--data-dir", str(out), "--allow-clear")
        assert plan["timestamp"] == t and plan["stopped_at_gap"] is None
        bases[t] = plan["base"]["id"]
        n = check_restored(out, written, t, 1 if t < START + 29 else 5)
        assert n == plan["frames"]
    assert {bases[START + 9], bases[START + 28]} == {b1["id"]}
    assert bases[START + 29] == bases[START + 33] == b2 and bases[START + 34] == b3

    # the seed form, ISO time, dry-run plan, and the unreachable ends
    seed = kr.cli.run("restore-pitr", "--timestamp", str(START + 21), "--data-dir", str(out),
                      "--backup-dir", kr.cli.repo, "--allow-clear", repo=False)
    assert "every file verified" in seed.stdout
    check_restored(out, written, START + 21, 1)
    dry = kr("restore-pitr", "--timestamp", "2023-11-14T22:13:42Z", "--data-dir", str(out), "--dry-run")[0]
    assert "DRY-RUN" in dry and "would be refused" in dry and "last frame 2023-11-14T22:13:42Z" in dry
    check_restored(out, written, START + 21, 1)  # untouched
    _, err = kr("restore-pitr", "--timestamp", str(START + 8), "--data-dir", str(out), "--allow-clear", expect=14)
    assert "no backup of source k finished at or before" in err and err.count("\n") == 1
    _, err = kr("restore-pitr", "--timestamp", str(START + 35), "--data-dir", str(out), "--allow-clear", expect=14)
    assert "after the newest backup or capture" in err
    kr("restore-pitr", "--timestamp", str(START + 20), "--data-dir", str(out), expect=15)
    window = kr.json("pitr-window", "--source", "k")[0]
    assert (window["earliest"], window["latest"], window["gaps"]) == (START + 9, START + 34, [])
    assert window["backups"] == 3 and window["captures"] == 4
    assert len(kr.json("list")) == 3


def test_a_gap_in_the_captured_wal_is_refused_or_restored_up_to(kr, tmp_path):
    d = str(tmp_path / "data")
    make_kyrodb.create(d, frames=10, frames_per_segment=4)
    kr("backup", "--data-dir", d, "--source", "g", "--time", str(START + 9))
    make_kyrodb.append(d, 4, frames_per_segment=4)
    kr("wal-archive", "--data-dir", d, "--source", "g", "--once", "--time", str(START + 13))
    make_kyrodb.rotate(d)
    make_kyrodb.append(d, 3)  # S+14..16 into a segment no capture will see
    make_kyrodb.rotate(d)
    make_kyrodb.append(d, 3)  # S+17..19
    written = frames_of(d)
    make_kyrodb.snapshot(d)  # KyroDB snapshots at S+19, then removes the segments it covers
    while len(make_kyrodb.read_manifest(d)["wal_segments"]) > 1:
        make_kyrodb.drop_oldest(d)
    cap = kr.json("wal-archive", "--data-dir", d, "--source", "g", "--once", "--time", str(START + 19))
    assert [g["kind"] for g in cap["gaps"]] == ["seq"]

    out = tmp_path / "out"
    kr("restore-pitr", "--timestamp", str(START + 13), "--data-dir", str(out))
    check_restored(out, written, START + 13, 1)
    _, err = kr("restore-pitr", "--timestamp", str(START + 16), "--data-dir", str(out), "--allow-clear", expect=14)
    assert "gap" in err and f"latest reachable second is 2023-11-14T22:13:33Z ({START + 13})" in err
    check_restored(out, written, START + 13, 1)  # left untouched
    r = kr.json("restore-pitr", "--timestamp", str(START + 19), "--data-dir", str(out), "--allow-clear",
                "--allow-gap")
    assert r["timestamp"] == START + 13 and r["requested_timestamp"] == START + 19 and r["stopped_at_gap"]
    check_restored(out, written, START + 13, 1)
    w = kr.json("pitr-window")[0]
    assert (w["earliest"], w["latest"]) == (START + 9, START + 13) and w["after_latest"]["from"] == START + 14

    # a new backup after the gap makes the later seconds reachable again
    kr("backup", "--data-dir", d, "--source", "g", "--time", str(START + 19))
    w = kr.json("pitr-window")[0]
    assert (w["earliest"], w["latest"]) == (START + 9, START + 19)
    assert [(g["from"], g["to"]) for g in w["gaps"]] == [(START + 14, START + 18)]
    kr("restore-pitr", "--timestamp", str(START + 19), "--data-dir", str(out), "--allow-clear")
    check_restored(out, written, START + 19, 18)


def test_prune_keeps_what_the_window_needs(kr, tmp_path):
    d = str(tmp_path / "data")
    make_kyrodb.create(d, frames=10, frames_per_segment=4)  # S..S+9
    kr("backup", "--data-dir", d, "--source", "p", "--time", str(START + 9))
    make_kyrodb.append(d, 5, frames_per_segment=4)
    kr("wal-archive", "--data-dir", d, "--source", "p", "--once", "--time", str(START + 14))  # before b2: droppable
    make_kyrodb.append(d, 5, frames_per_segment=4)
    b2 = kr.json("backup", "--data-dir", d, "--source", "p", "--time", str(START + 19))["id"]
    make_kyrodb.append(d, 5, frames_per_segment=4)
    kr("wal-archive", "--data-dir", d, "--source", "p", "--once", "--time", str(START + 24))
    make_kyrodb.append(d, 5, frames_per_segment=4)
    kr("wal-archive", "--data-dir", d, "--source", "p", "--once", "--time", str(START + 29))
    written = frames_of(d)
    assert kr.captures() == 3

    dry = kr.json("prune", "--keep-last", "1", "--dry-run")
    assert len(dry["wal_captures_dropped"]) == 1 and kr.captures() == 3
    res = kr.json("prune", "--keep-last", "1", "--unindexed-grace", "0")
    assert len(res["wal_captures_dropped"]) == 1 and kr.captures() == 2
    assert [b["id"] for b in kr.json("list")] == [b2]
    window = kr.json("pitr-window", "--source", "p")[0]
    assert (window["earliest"], window["latest"], window["gaps"]) == (START + 19, START + 29, [])
    kr("verify", "--full-scan")
    out = tmp_path / "out"
    for t in (START + 19, START + 22, START + 27, START + 29):
        kr("restore-pitr", "--timestamp", str(t), "--data-dir", str(out), "--allow-clear", "--source", "p")
        check_restored(out, written, t, 1)
    kr("restore-pitr", "--timestamp", str(START + 15), "--data-dir", str(out), "--allow-clear", "--source", "p",
       expect=14)


def test_verify_checks_wal_captures(kr, tmp_path):
    d = str(tmp_path / "data")
    make_kyrodb.create(d, frames=10, frames_per_segment=4)
    kr("backup", "--data-dir", d, "--source", "v", "--time", str(START + 9))
    make_kyrodb.append(d, 40, frames_per_segment=100)
    kr("wal-archive", "--data-dir", d, "--source", "v", "--once", "--time", str(START + 49))
    assert "1 WAL capture(s) checked" in kr("verify")[0]
    # Damage the capture's own data: the newest pack holds only what the capture stored.
    packs = [os.path.join(dp, n) for dp, _, ns in os.walk(os.path.join(kr.cli.repo, "data")) for n in ns]
    newest = max(packs, key=os.path.getmtime)
    with open(newest, "r+b") as f:
        f.seek(20)
        b = f.read(1)
        f.seek(20)
        f.write(bytes([b[0] ^ 1]))
    _, err = kr("verify", "--full-scan", expect=13)
    out = kr.json("verify", "--full-scan", expect=13)
    assert any("WAL capture walcaps/" in d["object"] for d in out["damaged"]), out["damaged"]


def test_copy_carries_the_wal_captures(kr, tmp_path):
    d = str(tmp_path / "data")
    make_kyrodb.create(d, frames=10, frames_per_segment=4)
    kr("backup", "--data-dir", d, "--source", "c", "--time", str(START + 9))
    make_kyrodb.append(d, 10, frames_per_segment=4)
    kr("wal-archive", "--data-dir", d, "--source", "c", "--once", "--time", str(START + 19))
    written = frames_of(d)
    offsite = str(tmp_path / "offsite")
    res = kr.json("copy", "--to", offsite, "--kdf-memory-kib", "1024", "--kdf-iterations", "1")
    assert res["wal_captures"] == 1
    other = Kr(Cli(offsite, kr.cli.cache), kr.capsys, pytest.MonkeyPatch())
    out = tmp_path / "out"
    other("restore-pitr", "--timestamp", str(START + 16), "--data-dir", str(out), "--source", "c")
    check_restored(out, written, START + 16, 1)
    other("verify", "--full-scan")
