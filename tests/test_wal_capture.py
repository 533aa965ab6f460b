"""WAL capture through the CLI: WAL-aware backups, wal-archive, wal-push/fetch, retention."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kyrorepo.cli.main import main
from kyrorepo.wal.base import SegmentScan
from kyrorepo.wal.capture import Capture, ContentRef, Present, StoredSegment
from kyrorepo.walretention import plan_wal_retention

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import make_chronicle  # noqa: E402
import make_kyrodb  # noqa: E402

START = 1_700_000_000


class Kr:
    """The kyrorepo CLI entry point run in-process against ``repo_cli``'s repository (fast);
    ``cli.run`` runs the same command as a subprocess."""

    def __init__(self, cli, capsys, monkeypatch) -> None:
        self.cli = cli
        self.capsys = capsys
        monkeypatch.setenv("KYROREPO_PASSWORD", "test-pass")
        monkeypatch.setenv("KYROREPO_CACHE_DIR", cli.cache)
        for var in ("BACKUP_ALLOW_CLEAR", "KYROREPO_REPO"):
            monkeypatch.delenv(var, raising=False)

    def __call__(self, *args: str, expect: int = 0) -> tuple[str, str]:
        self.capsys.readouterr()
        code = main([*args, "--repo", self.cli.repo])
        out = self.capsys.readouterr()
        assert code == expect, f"kyrorepo {' '.join(args)} exited {code}, expected {expect}\n{out.out}\n{out.err}"
        return out.out, out.err

    def json(self, *args: str, expect: int = 0):
        return json.loads(self(*args, "--json", expect=expect)[0])

    def captures(self) -> int:
        d = os.path.join(self.cli.repo, "walcaps")
        return len(os.listdir(d)) if os.path.isdir(d) else 0


@pytest.fixture
def kr(repo_cli, capsys, monkeypatch) -> Kr:
    return Kr(repo_cli, capsys, monkeypatch)


def test_backup_records_the_wal_and_reads_segments_up_to_their_last_frame(kr, tmp_path):
    data = tmp_path / "data"
    make_kyrodb.create(str(data), frames=6, frames_per_segment=4)
    make_kyrodb.append(str(data), 3, torn_tail=True)
    segs = make_kyrodb.info(str(data))["segments"]
    last = segs[-1]
    assert last["size"] > last["valid_length"]
    b = json.loads(kr.cli.run("backup", "--data-dir", str(data), "--json", "--source", "db").stdout)
    assert b["wal"] == {"codec": "kyrodb", "segments": len(segs)} and b["incomplete"] is False
    ls = {x["path"]: x["size"] for x in kr.json("ls", b["id"])}
    assert ls[last["name"]] == last["valid_length"]  # the torn tail is not backed up
    # --wal none: plain files, read whole
    plain = kr.json("backup", "--data-dir", str(data), "--wal", "none", "--full", "--source", "plain")
    assert plain["wal"] is None
    assert {x["path"]: x["size"] for x in kr.json("ls", plain["id"])}[last["name"]] == last["size"]
    # wal_*.wal files without KyroDB's magic (the benchmark data set) are plain files
    bench = tmp_path / "bench"
    (bench / "wal").mkdir(parents=True)
    (bench / "wal" / "wal_000001.wal").write_bytes(os.urandom(5000))
    assert kr.json("backup", "--data-dir", str(bench), "--source", "bench")["wal"] is None


def test_archive_saves_only_changes_and_list_never_shows_captures(kr, tmp_path):
    data = tmp_path / "data"
    make_chronicle.create(str(data), frames=5)
    kr("backup", "--data-dir", str(data), "--source", "c", "--time", str(START + 4))
    first = kr.json("wal-archive", "--data-dir", str(data), "--source", "c", "--once", "--time", str(START + 4))
    assert first["capture"] and first["segments_present"] == 1
    out, _ = kr("wal-archive", "--data-dir", str(data), "--source", "c", "--once")
    assert "nothing changed" in out and kr.captures() == 1
    make_chronicle.append(str(data), 3, torn_tail=True)
    grown = kr.json("wal-archive", "--data-dir", str(data), "--source", "c", "--once", "--time", str(START + 7))
    assert grown["segments_stored"] == 1 and 0 < grown["added_bytes"] < 2000
    # a torn tail growing further is no change; a rename (rotation) is
    with open(data / "data.db.wal", "ab") as f:
        f.write(b"\x01")
    assert kr.json("wal-archive", "--data-dir", str(data), "--source", "c", "--once")["capture"] is None
    make_chronicle.rotate(str(data))
    rot = kr.json("wal-archive", "--data-dir", str(data), "--source", "c", "--once", "--time", str(START + 8))
    assert rot["capture"] and rot["segments_present"] == 2 and rot["segments_stored"] == 1  # the new empty one
    assert kr.captures() == 3
    listed = kr.json("list")
    assert len(listed) == 1 and listed[0]["type"] == "full"
    window = kr.json("pitr-window")
    assert window[0]["captures"] == 3 and window[0]["backups"] == 1


def test_archive_loop_captures_growth_and_stops_cleanly_on_sigterm(repo_cli, tmp_path):
    data = tmp_path / "data"
    make_kyrodb.create(str(data), frames=3)
    proc = repo_cli.popen("wal-archive", "--data-dir", str(data), "--source", "loop", "--interval", "200ms")
    walcaps = Path(repo_cli.repo) / "walcaps"
    try:
        deadline = time.monotonic() + 60
        while not (walcaps.is_dir() and len(os.listdir(walcaps)) == 1) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.6)  # idle loop turns: no new object
        assert len(os.listdir(walcaps)) == 1
        make_kyrodb.append(str(data), 2)
        while len(os.listdir(walcaps)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(os.listdir(walcaps)) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.count("capture ") == 2
    assert not os.listdir(Path(repo_cli.repo) / "locks")


def test_wal_push_is_idempotent_and_refuses_a_different_file(kr, tmp_path, monkeypatch):
    pg = tmp_path / "pgdata"
    (pg / "pg_wal").mkdir(parents=True)
    seg = pg / "pg_wal" / "000000010000000000000001"
    seg.write_bytes(os.urandom(300_000))
    monkeypatch.chdir(pg)
    before = kr.captures()
    r = subprocess.run([sys.executable, "-m", "kyrorepo", "wal-push", "pg_wal/000000010000000000000001",
                        "--repo", kr.cli.repo], env=kr.cli.env, cwd=pg, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert kr.captures() == before + 1
    again = kr.json("wal-push", "pg_wal/000000010000000000000001")
    assert again["already_pushed"] is True and kr.captures() == before + 1
    seg.write_bytes(os.urandom(300_000))
    _, err = kr("wal-push", "pg_wal/000000010000000000000001", expect=1)
    assert "a different file named 000000010000000000000001 was already pushed" in err
    assert err.count("\n") == 1 and kr.captures() == before + 1
    # wal-fetch, the restore_command counterpart
    dest = tmp_path / "fetched"
    kr("wal-fetch", "000000010000000000000001", str(dest))
    assert dest.read_bytes() != seg.read_bytes() and len(dest.read_bytes()) == 300_000
    kr("wal-fetch", "000000010000000000000009", str(tmp_path / "nope"), expect=1)
    assert not (tmp_path / "nope").exists()
    assert kr.json("list") == []


def _cap(cid: str, source: str, t: int, ident: str, end: int, stored: bool) -> Capture:
    scan = SegmentScan(ident, ident, end, 0, end)
    data = ContentRef(end, bytes([len(cid)]) * 32, chunks=((cid.encode().ljust(32, b"\0"), end),))
    return Capture(source, "h", "archive", t, t * 10**9, "segments", {}, (Present(ident, ident, end),),
                   (StoredSegment(scan, data),) if stored else (), id=cid)


class _Kept:
    def __init__(self, source: str, t: int, wal: bool = True) -> None:
        self.source, self.time, self.end_time = source, t, t
        self.wal = {"codec": "segments"} if wal else None


def test_wal_retention_keeps_the_captures_from_the_anchor_backup_on():
    caps = [_cap("c1", "a", 100, "x", 10, True), _cap("c2", "a", 200, "x", 20, True),
            _cap("c3", "a", 300, "x", 20, False), _cap("c4", "a", 400, "x", 30, True),
            _cap("d1", "b", 100, "y", 5, True)]
    kept = [_Kept("a", 150), _Kept("a", 350), _Kept("a", 50, wal=False)]
    plan = plan_wal_retention(kept, caps)
    assert [c.id for c in plan.keep] == ["c2", "c3", "c4", "d1"]  # source b has no kept backup
    assert [c.id for c in plan.drop] == ["c1"]
    assert len(plan.blobs) == 3 and plan.contents == ()
    bounded = plan_wal_retention(kept, caps, since=380)  # from the kept backup at 350 on
    assert [c.id for c in bounded.keep] == ["c4"]
    assert [c.id for c in plan_wal_retention(kept, caps, since=120).keep] == ["c2", "c3", "c4"]
