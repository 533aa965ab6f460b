"""backup / list / ls / restore through the real CLI, with the seed guides' safeguards."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time

import pytest

from treeutil import make_rich_tree, snapshot_tree, start_restore_over_old_content


def backup_json(cli, data, *extra):
    return json.loads(cli.run("backup", "--data-dir", str(data), "--json", *extra).stdout)


def test_roundtrip_every_kind_of_entry(repo_cli, tmp_path):
    data = tmp_path / "data"
    make_rich_tree(str(data))
    before = snapshot_tree(str(data))
    b = backup_json(repo_cli, data)
    assert b["type"] == "full" and b["files_new"] == 7 and b["incomplete"] is False
    out = tmp_path / "out"
    repo_cli.run("restore", "--backup-id", b["id"], "--data-dir", str(out))
    assert snapshot_tree(str(out)) == before
    assert oct(os.stat(out / "sub" / "deeper").st_mode & 0o777) == oct(0o700)
    if os.geteuid() == 0:
        st = os.stat(out / "plain.txt")
        assert (st.st_uid, st.st_gid) == (1234, 5678)
    # hard link restored as a hard link
    assert os.stat(out / "plain.txt").st_ino == os.stat(out / "sub" / "hardlink.txt").st_ino


def test_unchanged_second_backup_adds_almost_nothing(repo_cli, tmp_path):
    data = tmp_path / "data"
    make_rich_tree(str(data))
    first = backup_json(repo_cli, data)
    second = backup_json(repo_cli, data)
    assert second["type"] == "incremental" and second["parent_id"] == first["id"]
    assert second["files_unmodified"] == first["file_count"] and second["files_new"] == 0
    assert second["added_bytes"] == 0
    full = backup_json(repo_cli, data, "--full")
    assert full["type"] == "full" and full["files_unmodified"] == 0 and full["added_bytes"] == 0


def test_one_percent_page_rewrite_adds_a_tenth_or_less(repo_cli, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    page, npages = 8192, 8192  # 64 MiB table file
    rnd = random.Random(7)
    path = data / "table.dat"
    with open(path, "wb") as f:
        for _ in range(npages):
            f.write(rnd.randbytes(page // 2) + b"row text " * (page // 18) + b"\0" * (page // 2 - 9 * (page // 18)))
    backup_json(repo_cli, data)
    with open(path, "r+b") as f:
        for p in rnd.sample(range(npages), npages // 100):
            f.seek(p * page)
            f.write(rnd.randbytes(page))
    second = backup_json(repo_cli, data)
    assert second["files_changed"] == 1
    # ~82 scattered 8 KiB pages each renew one or two ~40 KiB chunks: "about a tenth".
    # The gear seed comes from each repository's random key, so chunk boundaries and the
    # figure vary from run to run: 10-12.5% measured on this data, hence the 15% bound.
    assert 0 < second["added_bytes"] <= os.path.getsize(path) * 0.15


def test_list_json_and_table(repo_cli, tmp_path):
    data = tmp_path / "data"
    make_rich_tree(str(data))
    assert json.loads(repo_cli.run("list", "--json").stdout) == []
    assert "No backups found" in repo_cli.run("list").stdout
    a = backup_json(repo_cli, data, "--time", "2025-10-20T14:30:00", "--description", "daily", "--tag", "nightly")
    b = backup_json(repo_cli, data, "--time", "1761000000")
    listed = json.loads(repo_cli.run("list", "--json").stdout)
    assert [x["id"] for x in listed] == [b["id"], a["id"]]  # newest first
    first = listed[1]
    assert first["timestamp"] == 1760970600 and first["time"] == "2025-10-20T14:30:00Z"
    assert first["description"] == "daily" and first["tags"] == ["nightly"] and first["type"] == "full"
    assert first["short_id"] == a["id"][:8] and first["file_count"] == 7 and first["logical_bytes"] > 0
    assert set(first) >= {"id", "short_id", "timestamp", "time", "source", "host", "tags", "description",
                          "parent_id", "type", "logical_bytes", "added_bytes", "file_count"}
    assert listed[0]["parent_id"] == a["id"]
    table = repo_cli.run("snapshots").stdout
    assert a["id"][:8] in table and "1760970600" in table
    ls = json.loads(repo_cli.run("ls", a["id"][:10], "sub", "--json").stdout)
    assert {x["path"] for x in ls} >= {"sub", "sub/deeper/big.bin", "sub/hardlink.txt"}


def test_seed_forms(cli, tmp_path):
    data = tmp_path / "data"
    make_rich_tree(str(data))
    cli.init()
    full = json.loads(cli.run("create-full", "--data-dir", str(data), "--backup-dir", cli.repo, "--json",
                              "--description", "Daily", repo=False).stdout)
    assert full["type"] == "full"
    parent = json.loads(cli.run("list", "--backup-dir", cli.repo, "--json", repo=False).stdout)[0]["id"]
    inc = json.loads(cli.run("create-incremental", "--parent-id", parent, "--data-dir", str(data),
                             "--backup-dir", cli.repo, "--json", repo=False).stdout)
    assert inc["type"] == "incremental" and inc["parent_id"] == full["id"]
    bad = cli.run("create-incremental", "--parent-id", "deadbeef", "--data-dir", str(data), expect=1)
    assert "parent backup deadbeef not found" in bad.stderr


def test_restore_refuses_nonempty_target_and_leaves_it(repo_cli, tmp_path):
    data = tmp_path / "data"
    make_rich_tree(str(data))
    repo_cli.run("backup", "--data-dir", str(data))
    target = tmp_path / "target"
    target.mkdir()
    (target / "precious").write_text("keep me")
    r = repo_cli.run("restore", "--backup-id", "latest", "--data-dir", str(target), expect=15)
    assert "not empty" in r.stderr and "--allow-clear" in r.stderr and r.stderr.count("\n") == 1
    assert os.listdir(target) == ["precious"]
    dry = repo_cli.run("restore", "--backup-id", "latest", "--data-dir", str(target), "--dry-run", "--allow-clear")
    assert "DRY-RUN: Would delete 1 file(s)" in dry.stdout and "- precious" in dry.stdout
    assert "DRY-RUN: Would restore 9 file(s)" in dry.stdout
    assert os.listdir(target) == ["precious"]
    repo_cli.run("restore", "--backup-id", "latest", "--data-dir", str(target), env={"BACKUP_ALLOW_CLEAR": "true"})
    assert snapshot_tree(str(target)) == snapshot_tree(str(data))
    assert not [e for e in os.listdir(tmp_path) if "kyrorepo" in e]  # no staging left


def test_restore_include(repo_cli, tmp_path):
    data = tmp_path / "data"
    make_rich_tree(str(data))
    repo_cli.run("backup", "--data-dir", str(data))
    out = tmp_path / "out"
    repo_cli.run("restore", "--backup-id", "latest", "--data-dir", str(out), "--include", "sub/deeper/*")
    files = [os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs]
    assert files == ["sub/deeper/big.bin"]


def test_restore_killed_midway_leaves_old_content(repo_cli, tmp_path):
    proc, target = start_restore_over_old_content(repo_cli, tmp_path, 6)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if any(".kyrorepo-staging-" in e for e in os.listdir(tmp_path)):
            time.sleep(0.2)
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    if proc.returncode == 0:
        pytest.skip("restore finished before it could be killed")
    assert os.listdir(target) == ["old"] and (target / "old").read_text() == "old content"
    # A second restore cleans the leftover staging directory and completes.
    repo_cli.run("restore", "--backup-id", "latest", "--data-dir", str(target), "--allow-clear")
    assert sorted(os.listdir(target)) == [f"f{i}" for i in range(6)]
    assert not [e for e in os.listdir(tmp_path) if "kyrorepo" in e]


def test_file_changing_during_backup(repo_cli, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "stable").write_bytes(b"stable")
    hot = data / "hot.log"
    hot.write_bytes(os.urandom(8 * 1024 * 1024))
    stop = threading.Event()

    def scribble():
        with open(hot, "r+b") as f:
            while not stop.is_set():
                f.seek(random.randrange(8 * 1024 * 1024))
                f.write(os.urandom(16))
                f.flush()
                os.fsync(f.fileno())

    t = threading.Thread(target=scribble)
    t.start()
    try:
        r = repo_cli.run("backup", "--data-dir", str(data), "--json", expect=3)
    finally:
        stop.set()
        t.join()
    out = json.loads(r.stdout)
    assert out["incomplete"] is True
    assert any("hot.log" in w and "changed while it was read" in w for w in out["warnings"])
    listed = json.loads(repo_cli.run("list", "--json").stdout)
    assert len(listed) == 1  # stored, with a warning


def test_wrong_passphrase_and_missing_repo(repo_cli, tmp_path):
    r = repo_cli.run("list", expect=12, env={"KYROREPO_PASSWORD": "wrong"})
    assert "wrong passphrase" in r.stderr and r.stderr.count("\n") == 1
    r = repo_cli.run("list", "--json", expect=12, env={"KYROREPO_PASSWORD": "wrong"})
    err = json.loads(r.stderr)["error"]
    assert err["code"] == 12 and err["kind"] == "wrong-password"
    r = repo_cli.run("list", "--repo", str(tmp_path / "nothing"), repo=False, expect=10)
    assert "no kyrorepo repository" in r.stderr


def test_flipped_byte_in_pack_caught_on_restore(repo_cli, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "file.bin").write_bytes(os.urandom(200_000))
    repo_cli.run("backup", "--data-dir", str(data))
    packs = []
    for d, _, fs in os.walk(os.path.join(repo_cli.repo, "data")):
        packs += [os.path.join(d, f) for f in fs]
    for p in packs:
        with open(p, "r+b") as f:
            f.seek(100)
            b = f.read(1)
            f.seek(100)
            f.write(bytes([b[0] ^ 0x40]))
    out = tmp_path / "out"
    r = repo_cli.run("restore", "--backup-id", "latest", "--data-dir", str(out), expect=13)
    assert "failed authentication" in r.stderr or "damaged" in r.stderr
    assert not out.exists()


def test_no_plaintext_in_repository(repo_cli, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    marker = b"KYRO-PLAINTEXT-MARKER-7d1f"
    (data / "secret_file_name_marker.txt").write_bytes(marker * 1000)
    (data / "raw.bin").write_bytes(os.urandom(1000) + marker + os.urandom(1000))
    repo_cli.run("backup", "--data-dir", str(data), "--description", "descr-marker-91a", "--tag", "tag-marker-55b")
    for d, _, fs in os.walk(repo_cli.repo):
        for f in fs:
            blob = open(os.path.join(d, f), "rb").read()
            for needle in (marker, b"secret_file_name_marker", b"descr-marker-91a", b"tag-marker-55b", str(data).encode()):
                assert needle not in blob, f"{needle!r} found in {f}"


def test_exit_codes(repo_cli, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("x")
    # usage error: unknown option / missing option
    assert repo_cli.run("backup", "--bogus", expect=2).stderr.startswith("kyrorepo: error:")
    repo_cli.run("restore", "--data-dir", str(tmp_path / "o"), expect=2)
    # 1: a backup that does not exist; a data dir that does not exist
    r = repo_cli.run("restore", "--backup-id", "abcdef12", "--data-dir", str(tmp_path / "o"), expect=1)
    assert "not found" in r.stderr
    repo_cli.run("backup", "--data-dir", str(tmp_path / "missing"), expect=1)
    # 2: time that does not parse
    repo_cli.run("backup", "--data-dir", str(data), "--time", "yesterday-ish", expect=2)
    # 1: init over an existing repository
    assert "already exists" in repo_cli.init(expect=1).stderr
    # 2: no repository given at all
    assert "--repo" in repo_cli.run("list", repo=False, expect=2).stderr


def test_locked_repository_exit_11(repo_cli, tmp_path):
    from kyrorepo.backends import LocalBackend
    from kyrorepo.repository import Repository

    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("x")
    repo = Repository.open(LocalBackend(repo_cli.repo), b"test-pass", str(tmp_path / "c2"))
    with repo.lock(exclusive=True):
        r = repo_cli.run("backup", "--data-dir", str(data), expect=11)
        assert "locked" in r.stderr and "kyrorepo unlock" in r.stderr
    repo_cli.run("backup", "--data-dir", str(data))


def test_several_sources_need_naming(repo_cli, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "f").write_text(d.name)
    repo_cli.run("backup", "--data-dir", str(a))
    repo_cli.run("backup", "--data-dir", str(b), "--source", "db-b")
    r = repo_cli.run("restore", "--backup-id", "latest", "--data-dir", str(tmp_path / "o"), expect=2)
    assert "--source" in r.stderr and "db-b" in r.stderr
    repo_cli.run("restore", "--backup-id", "latest", "--source", "db-b", "--data-dir", str(tmp_path / "o"))
    assert (tmp_path / "o" / "f").read_text() == "b"
