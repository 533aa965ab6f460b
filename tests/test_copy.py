"""copy / sync between related repositories: sealed data travels unopened, resumes, refuses strangers."""

from __future__ import annotations

import json
import os

from conftest import Cli
from kyrorepo.backends import LocalBackend
from kyrorepo.repository import Repository
from treeutil import make_rich_tree, snapshot_tree


def _backup(cli, data, *extra):
    return json.loads(cli.run("backup", "--data-dir", str(data), "--json", *extra).stdout)


def test_copy_creates_related_repo_and_is_incremental(repo_cli, tmp_path):
    data = tmp_path / "data"
    make_rich_tree(str(data))
    a = _backup(repo_cli, data)
    dest = str(tmp_path / "offsite")
    out = json.loads(repo_cli.run("copy", "--to", dest, "--json", "--kdf-memory-kib", "1024",
                                  "--kdf-iterations", "1").stdout)
    assert out["created"] and out["copied"] == [a["id"]] and out["blobs_sent"] > 0
    dest_cli = Cli(dest, repo_cli.cache)
    listed = json.loads(dest_cli.run("list", "--json").stdout)
    assert [x["id"] for x in listed] == [a["id"]]
    # related, not the same repository: the same master key, its own repository id
    src_repo = Repository.open(LocalBackend(repo_cli.repo), b"test-pass", str(tmp_path / "c1"))
    dest_repo = Repository.open(LocalBackend(dest), b"test-pass", str(tmp_path / "c2"))
    assert src_repo.master == dest_repo.master and src_repo.config.repo_id != dest_repo.config.repo_id
    assert src_repo.config.chunker_avg == dest_repo.config.chunker_avg
    # incremental copy: a second backup sends only what is new
    (data / "new.bin").write_bytes(os.urandom(100_000))
    b = _backup(repo_cli, data)
    again = json.loads(repo_cli.run("copy", "--to", dest, "--json").stdout)
    assert again["copied"] == [b["id"]] and again["already_present"] == [a["id"]]
    assert 0 < again["bytes_sent"] < 200_000
    # restore from the copy
    dest_cli.run("restore", "--backup-id", b["id"], "--data-dir", str(tmp_path / "out"))
    assert snapshot_tree(str(tmp_path / "out")) == snapshot_tree(str(data))


def test_copy_refuses_unrelated_destination(repo_cli, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("x")
    _backup(repo_cli, data)
    other = Cli(str(tmp_path / "other"), repo_cli.cache)
    other.init()
    r = repo_cli.run("copy", "--to", other.repo, expect=2)
    assert "not related" in r.stderr


def test_copy_interrupted_resumes(repo_cli, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        (data / f"f{i}").write_bytes(os.urandom(1024 * 1024))
    a = _backup(repo_cli, data)
    dest = str(tmp_path / "offsite")
    repo_cli.run("copy", "--to", dest, "--kdf-memory-kib", "1024", "--kdf-iterations", "1")
    # Simulate an interruption after the packs were sent but before the snapshot object:
    snap_files = os.listdir(os.path.join(dest, "snapshots"))
    os.remove(os.path.join(dest, "snapshots", snap_files[0]))
    again = json.loads(repo_cli.run("copy", "--to", dest, "--json").stdout)
    assert again["copied"] == [a["id"]] and again["blobs_sent"] == 0  # every blob was already there
    Cli(dest, repo_cli.cache).run("restore", "--backup-id", "latest", "--data-dir", str(tmp_path / "out"))
    assert snapshot_tree(str(tmp_path / "out")) == snapshot_tree(str(data))


def test_sync_delete_after_upload(repo_cli, tmp_path):
    data = tmp_path / "data"
    make_rich_tree(str(data))
    _backup(repo_cli, data, "--time", "1700000000")
    _backup(repo_cli, data, "--time", "1700003600")
    dest = str(tmp_path / "offsite")
    out = json.loads(repo_cli.run("sync", "--to", dest, "--delete-after-upload", "--json",
                                  "--kdf-memory-kib", "1024", "--kdf-iterations", "1").stdout)
    assert len(out["copied"]) == 2 and sorted(out["forgotten"]) == sorted(out["copied"])
    assert json.loads(repo_cli.run("list", "--json").stdout) == []
    assert len(json.loads(Cli(dest, repo_cli.cache).run("list", "--json").stdout)) == 2
