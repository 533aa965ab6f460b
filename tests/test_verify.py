"""verify through the real CLI: structure, full scan, subset audits, resume, restore drills.

Every damage is made by flipping, truncating or deleting bytes of the repository's files,
and must be found at the right level, with exit code 13 and a message naming the object.
"""

from __future__ import annotations

import glob
import json
import math
import os
import random
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import lmdb
import pytest

import kyrorepo.verify_data as verify_mod
from kyrorepo.backends.local import LocalBackend
from kyrorepo.cli.main import main
from kyrorepo.pack import pack_name
from kyrorepo.repository import Repository
from kyrorepo.format import BlobType
from kyrorepo.snapshot import find_snapshot, save_snapshot
from kyrorepo.tree import DIR, FILE, Node, Ref, decode_tree, encode_tree
from kyrorepo.walk import chunk_refs, find_node

PASSWORD = "pw"
V1_FILES = {
    "a.bin": 1_600_000,
    "big/b.bin": 1_200_000,
    "sub/c.bin": 600_000,
    "sub/deep/d.txt": 3_000,
    "e.txt": 100,
}


@dataclass
class Env:
    repo: str
    cache: str
    v1: str  # source tree of the first backup
    v2: str  # source tree of the second backup
    tmp: Path

    def backups(self) -> list[str]:
        """Backup ids, oldest first."""
        rc, out, _ = run("list", "--json", *self.opts())
        assert rc == 0
        return [b["id"] for b in reversed(json.loads(out))]

    def opts(self) -> list[str]:
        return ["--repo", self.repo, "--cache-dir", self.cache]


_CAPTURE: dict[str, pytest.CaptureFixture[str]] = {}


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KYROREPO_PASSWORD", PASSWORD)
    for var in ("KYROREPO_REPO", "KYROREPO_CACHE_DIR", "BACKUP_ALLOW_CLEAR"):
        monkeypatch.delenv(var, raising=False)
    _CAPTURE["c"] = capsys


def run(*argv: str) -> tuple[int, str, str]:
    capsys = _CAPTURE["c"]
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(*argv: str) -> tuple[int, dict, str]:
    rc, out, err = run(*argv, "--json")
    return rc, json.loads(out), err


def _write_tree(root: Path, files: dict[str, int], seed: int) -> None:
    rng = random.Random(seed)
    for rel, size in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(size) if rel.endswith(".bin") else (b"line %d\n" % seed) * (size // 7))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with two backups (the second changes e.txt and adds f.bin), built once."""
    base = tmp_path_factory.mktemp("verify-template")
    mp = pytest.MonkeyPatch()
    mp.setenv("KYROREPO_PASSWORD", PASSWORD)
    try:
        data = base / "data"
        _write_tree(data, V1_FILES, 1)
        opts = ["--repo", str(base / "repo"), "--cache-dir", str(base / "cache")]
        assert main(["init", *opts, "--kdf-memory-kib", "1024", "--kdf-iterations", "1", "--pack-size", "1M"]) == 0
        assert main(["backup", *opts, "--data-dir", str(data), "--source", "db", "--time", "1700000000"]) == 0
        shutil.copytree(data, base / "v1")
        (data / "e.txt").write_text("changed\n")
        _write_tree(data, {"f.bin": 300_000}, 2)
        assert main(["backup", *opts, "--data-dir", str(data), "--source", "db", "--time", "1700000100"]) == 0
        shutil.copytree(data, base / "v2")
    finally:
        mp.undo()
    return base


@pytest.fixture
def env(template: Path, tmp_path: Path) -> Env:
    shutil.copytree(template / "repo", tmp_path / "repo")
    shutil.copytree(template / "cache", tmp_path / "cache")
    return Env(str(tmp_path / "repo"), str(tmp_path / "cache"), str(template / "v1"), str(template / "v2"), tmp_path)


# --- helpers shared with test_repair -------------------------------------------------------


def flip(path: str, offset: int) -> None:
    data = bytearray(Path(path).read_bytes())
    data[offset] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def packs(env: Env) -> list[str]:
    return sorted(glob.glob(os.path.join(env.repo, "data", "*", "*")))


def locate(env: Env, backup: str, path: str, tree: bool = False) -> tuple[str, int]:
    """(pack file, offset) of the first chunk of file ``path`` (or of directory ``path``'s tree)."""
    repo = Repository.open(LocalBackend(env.repo), PASSWORD.encode(), env.cache)
    try:
        repo.sync_index()
        snap = find_snapshot(repo, backup)
        node = find_node(repo, snap.tree, path.encode())
        assert node is not None
        bid = node.subtree if tree else next(chunk_refs(repo, node))[0]
        assert bid is not None
        loc = repo.lookup(bid)
        assert loc is not None
        return os.path.join(env.repo, pack_name(loc.pack_id)), loc.offset + loc.length // 2
    finally:
        repo.close()


def restored_equal(env: Env, backup: str, source: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Restore ``backup`` and compare it with ``source``; return the relative files restored."""
    target = env.tmp / f"restore-{backup[:8]}"
    shutil.rmtree(target, ignore_errors=True)
    rc, _, err = run("restore", *env.opts(), "--backup-id", backup, "--data-dir", str(target))
    assert rc == 0, err
    got = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    want = sorted(str(p.relative_to(source)) for p in Path(source).rglob("*") if p.is_file())
    if "/" in skip:  # the whole backup was lost
        want = []
    assert got == [w for w in want if not any(w == s or w.startswith(s.rstrip("/") + "/") for s in skip)]
    for rel in got:
        assert (target / rel).read_bytes() == (Path(source) / rel).read_bytes(), rel
    return got


# --- clean repository ----------------------------------------------------------------------


def test_clean_repository_passes_every_level(env: Env) -> None:
    rc, out, err = run("verify", *env.opts())
    assert rc == 0, err
    assert "no damage found" in out
    rc, rep, err = run_json("verify", *env.opts(), "--full-scan", "--restore-test")
    assert rc == 0, err
    assert rep["ok"] and rep["damaged"] == [] and rep["mode"] == "full-scan"
    assert rep["packs_checked"] == rep["packs"] == len(packs(env)) >= 3
    assert rep["blobs_checked"] > 0 and rep["bytes_checked"] == rep["pack_bytes"]
    assert rep["coverage"]["percent"] == 100.0 and rep["backups_checked"] == 2
    assert [t["ok"] for t in rep["restore_tests"]] == [True]  # the latest backup of the one source
    assert not glob.glob(os.path.join(env.cache, "*", "verify-*"))  # the work index is gone


def test_seed_form_with_backup_dir(env: Env) -> None:
    first = env.backups()[0]
    rc, rep, err = run_json("verify", "--backup-id", first[:8], "--backup-dir", env.repo, "--cache-dir", env.cache,
                            "--full-scan")
    assert rc == 0, err
    assert rep["backups_checked"] == 1
    assert 0 < rep["packs_checked"] <= rep["packs"]


def test_usage_errors(env: Env) -> None:
    assert run("verify", *env.opts(), "--full-scan", "--read-data-subset", "10%")[0] == 2
    assert run("verify", *env.opts(), "--read-data-subset", "ten")[0] == 2
    assert run("verify", *env.opts(), "--read-data-subset", "3/2")[0] == 2


# --- damage at each level -------------------------------------------------------------------


def test_flipped_data_byte_found_by_full_scan_only(env: Env) -> None:
    latest = env.backups()[-1]
    pack, offset = locate(env, latest, "big/b.bin")
    flip(pack, offset)
    assert run("verify", *env.opts())[0] == 0  # structure reads no pack bodies
    rc, rep, err = run_json("verify", *env.opts(), "--full-scan")
    assert rc == 13
    name = pack_name(bytes.fromhex(os.path.basename(pack)))
    assert name in err and "damaged object" in err
    assert all(name in d["object"] for d in rep["damaged"])
    assert {f["path"] for f in rep["affected_files"]} == {"big/b.bin"}
    assert rep["affected_backups"] == sorted(env.backups())  # both backups hold big/b.bin


def test_missing_pack_found_by_structure_check(env: Env) -> None:
    pack, _ = locate(env, env.backups()[-1], "a.bin")
    os.remove(pack)
    rc, out, err = run("verify", *env.opts())
    assert rc == 13
    assert f"pack {pack_name(bytes.fromhex(os.path.basename(pack)))}: is missing" in out + err
    assert "a.bin" in out


def test_truncated_pack_found_by_structure_check(env: Env) -> None:
    pack, _ = locate(env, env.backups()[-1], "sub/c.bin")
    os.truncate(pack, os.path.getsize(pack) // 2)
    rc, rep, err = run_json("verify", *env.opts())
    assert rc == 13
    assert "truncated" in err and os.path.basename(pack) in err
    assert rep["affected_files"] and rep["affected_backups"]


def test_damaged_pack_trailer_found_by_structure_check(env: Env) -> None:
    pack = packs(env)[0]
    flip(pack, os.path.getsize(pack) - 60)  # inside the sealed trailer
    rc, _, err = run("verify", *env.opts())
    assert rc == 13
    assert "trailer" in err and os.path.basename(pack) in err


def test_damaged_tree_found_by_structure_check(env: Env) -> None:
    pack, offset = locate(env, env.backups()[-1], "sub", tree=True)
    flip(pack, offset)
    rc, rep, err = run_json("verify", *env.opts())
    assert rc == 13
    assert "tree blob" in err
    assert "sub/" in {f["path"] for f in rep["affected_files"]}


def backup_with_extra_node(env: Env, make: Callable[[Ref], Node]) -> tuple[str, Ref]:
    """Save a copy of the newest backup whose top tree has one more entry, ``make(ref)`` of the
    first chunk of a.bin; return the new backup's id and that chunk."""
    repo = Repository.open(LocalBackend(env.repo), PASSWORD.encode(), env.cache)
    try:
        repo.sync_index()
        snap = find_snapshot(repo, env.backups()[-1])
        node = find_node(repo, snap.tree, b"a.bin")
        assert node is not None
        top = decode_tree(repo.load_blob(snap.tree, BlobType.TREE), "top tree")
        good = next(chunk_refs(repo, node))
        top.append(make(good))
        tid, _ = repo.add_blob(BlobType.TREE, encode_tree(top))
        repo.flush()
        return save_snapshot(repo, replace(snap, root=replace(snap.root, subtree=tid), time=snap.time + 1)).id, good
    finally:
        repo.close()


def test_chunk_referenced_as_a_directory_is_damage_of_the_reference_not_of_the_chunk(env: Env) -> None:
    """A backup whose tree names a data chunk as a directory. The chunk opens (a blob is opened
    as the type it was stored as, docs/format.md "Blob ids and types") but is not a tree: the
    damage is that reference's, so a.bin, which uses the chunk rightly, is not affected, and
    'repair snapshots' drops odd/ and keeps the chunk."""
    odd, (chunk, _) = backup_with_extra_node(env, lambda good: Node(name=b"odd", type=DIR, subtree=good[0]))
    rc, rep, err = run_json("verify", *env.opts(), "--full-scan")
    assert rc == 13
    [damage] = rep["damaged"]
    assert damage["object"] == f"tree blob {chunk.hex()[:16]}" and damage["blobs"] == 0, damage
    assert {(f["backup"], f["path"]) for f in rep["affected_files"]} == {(odd, "odd/")}
    assert "repair snapshots" in err

    rc, out, err = run("repair", "snapshots", *env.opts(), "--yes")
    assert rc == 0, err
    assert "odd/" in out
    rc, rep, err = run_json("verify", *env.opts(), "--full-scan")
    assert rc == 0, err
    for backup in env.backups():
        restored_equal(env, backup, env.v2 if backup != env.backups()[0] else env.v1)


def test_chunk_list_with_unindexed_chunks(env: Env) -> None:
    """A file's chunk list naming ids no index lists, between good chunks, in a repository with
    no other damage (the walk looks a file's chunks up together until damage is known): each
    missing chunk is counted once, and only the file that names them is attributed."""
    ghosts = [(bytes([n]) * 32, 10) for n in (1, 2)]

    def odd_file(good: Ref) -> Node:
        refs = (good, ghosts[0], good, ghosts[1], ghosts[0], good)
        return Node(name=b"odd.bin", type=FILE, size=good[1] * 3 + 30, chunks=refs, digest=bytes(32))

    odd, _ = backup_with_extra_node(env, odd_file)
    rc, rep, _ = run_json("verify", *env.opts())
    assert rc == 13
    [damage] = rep["damaged"]
    assert "2 blob(s) that backups reference are in no readable index segment" in damage["reason"], damage
    assert {(f["backup"], f["path"]) for f in rep["affected_files"]} == {(odd, "odd.bin")}


def test_damaged_index_segment(env: Env) -> None:
    seg = glob.glob(os.path.join(env.repo, "index", "*"))[0]
    flip(seg, 40)
    rc, rep, err = run_json("verify", *env.opts())
    assert rc == 13
    assert f"index segment index/{os.path.basename(seg)}" in err and "repair index" in err
    assert rep["damaged"][0]["fixed_by"] == "repair index"


def test_truncated_snapshot_object(env: Env) -> None:
    first = env.backups()[0]
    snap = os.path.join(env.repo, "snapshots", first)
    os.truncate(snap, 30)
    rc, rep, err = run_json("verify", *env.opts())
    assert rc == 13
    assert f"snapshots/{first}" in err
    assert rep["affected_backups"] == [first]


def test_damaged_key_objects(env: Env, tmp_path: Path) -> None:
    (tmp_path / "pw2").write_text("second\n")
    rc, out, _ = run("key", "add", *env.opts(), "--new-password-file", str(tmp_path / "pw2"),
                     "--kdf-memory-kib", "1024", "--kdf-iterations", "1")
    assert rc == 0
    added = out.split()[-1]
    keys = glob.glob(os.path.join(env.repo, "keys", "*"))
    other = next(k for k in keys if os.path.basename(k).startswith(added))
    mine = next(k for k in keys if k != other)
    doc = json.loads(Path(other).read_text())
    doc["iterations"] = 2  # the checksum no longer matches: damage, not a wrong passphrase
    Path(other).write_text(json.dumps(doc))
    rc, out, err = run("verify", *env.opts())  # opens with the intact key, reports the other
    assert rc == 13
    assert f"key object keys/{os.path.basename(other)}" in out + err
    Path(mine).write_bytes(Path(mine).read_bytes()[:50])  # now no key is intact
    rc, _, err = run("verify", *env.opts())
    assert rc == 13 and "key object keys/" in err


def test_wrong_passphrase_is_not_damage(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KYROREPO_PASSWORD", "wrong")
    assert run("verify", *env.opts())[0] == 12


def test_damaged_lmdb_cache_is_rebuilt(env: Env) -> None:
    for mdb in glob.glob(os.path.join(env.cache, "*", "index", "data.mdb")):
        Path(mdb).write_bytes(random.Random(3).randbytes(64 * 1024))
    rc, rep, err = run_json("verify", *env.opts(), "--full-scan")
    assert rc == 0, err
    restored_equal(env, env.backups()[-1], env.v2)


def _edit_cache_records(env: Env, edit: Callable[[lmdb.Transaction, lmdb._Database, list[tuple[bytes, bytes]]], None]) -> None:
    (path,) = glob.glob(os.path.join(env.cache, "*", "index"))
    lenv = lmdb.open(path, max_dbs=10, subdir=True)
    try:
        db = lenv.open_db(b"blobs")
        with lenv.begin(write=True) as txn:
            edit(txn, db, list(txn.cursor(db=db)))
    finally:
        lenv.close()


def _drop_one(txn: lmdb.Transaction, db: lmdb._Database, recs: list[tuple[bytes, bytes]]) -> None:
    txn.delete(recs[len(recs) // 2][0], db=db)


def _move_one(txn: lmdb.Transaction, db: lmdb._Database, recs: list[tuple[bytes, bytes]]) -> None:
    bid, rec = recs[len(recs) // 2]
    txn.put(bid, rec[:-12] + bytes(4) + rec[-8:], db=db)  # another offset in the same pack


def _add_one(txn: lmdb.Transaction, db: lmdb._Database, recs: list[tuple[bytes, bytes]]) -> None:
    bid, rec = recs[-1]
    txn.put(bid[:-1] + bytes([bid[-1] ^ 1]), rec, db=db)  # a blob no segment lists


@pytest.mark.parametrize("edit", [_drop_one, _move_one, _add_one], ids=["missing", "moved", "extra"])
def test_index_cache_that_disagrees_with_the_segments_is_rebuilt(env: Env, edit: Callable[..., None]) -> None:
    rc, rep, err = run_json("verify", *env.opts())
    assert rc == 0, err
    assert not any("did not match" in n for n in rep["notices"])
    _edit_cache_records(env, edit)
    rc, rep, err = run_json("verify", *env.opts())
    assert rc == 0, err
    assert any("did not match the index segments: rebuilt" in n for n in rep["notices"])
    rc, rep, err = run_json("verify", *env.opts())
    assert rc == 0 and not any("did not match" in n for n in rep["notices"]), err
    restored_equal(env, env.backups()[-1], env.v2)


def test_stale_cache_is_resynced(env: Env, template: Path) -> None:
    """A cache that lists a segment the repository no longer has is rebuilt, never trusted."""
    assert run("repair", "index", *env.opts())[0] == 0  # replaces the segments
    shutil.rmtree(env.cache)
    shutil.copytree(template / "cache", env.cache)  # the cache from before: stale segment names
    rc, _, err = run("verify", *env.opts(), "--restore-test")
    assert rc == 0, err


def test_damaged_audit_log_is_thrown_away(env: Env) -> None:
    assert run("verify", *env.opts(), "--read-data-subset", "50%")[0] == 0
    for mdb in glob.glob(os.path.join(env.cache, "*", "audit", "data.mdb")):
        os.truncate(mdb, 4096 * 2)
    rc, rep, err = run_json("verify", *env.opts(), "--read-data-subset", "50%")
    assert rc == 0, err


# --- subset audits and resumable scans ----------------------------------------------------------


def test_repeated_subset_audits_reach_full_coverage(env: Env) -> None:
    total = len(packs(env))
    percents = []
    for _ in range(total):
        rc, rep, err = run_json("verify", *env.opts(), "--read-data-subset", "20%")
        assert rc == 0, err
        percents.append(rep["coverage"]["percent"])
        if percents[-1] == 100.0:
            break
        assert rep["coverage"]["oldest_unchecked_pack"] is not None
    assert percents == sorted(percents) and percents[-1] == 100.0
    # least recently checked first: no pack is read twice before every pack was read once
    assert len(percents) == math.ceil(total / math.ceil(total * 0.2))


def test_group_subsets_cover_everything(env: Env) -> None:
    checked = 0
    for n in (1, 2, 3):
        rc, rep, err = run_json("verify", *env.opts(), "--read-data-subset", f"{n}/3")
        assert rc == 0, err
        checked += rep["packs_checked"]
    assert checked == len(packs(env))
    assert rep["coverage"]["percent"] == 100.0


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """Ctrl-C as the result of pack ``count + 1`` comes back (packs are checked in worker processes)."""
    real = verify_mod.pack_result
    calls = {"n": 0}

    def stopping(*args):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > count:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(verify_mod, "pack_result", stopping)


def test_interrupted_full_scan_resumes(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    first_pack = packs(env)[0]  # scans go in pack id order: this one is read first
    flip(first_pack, 100)
    with monkeypatch.context() as m:
        _interrupt_after(m, 2)
        rc, _, _ = run("verify", *env.opts(), "--full-scan")
    assert rc == 130
    rc, rep, err = run_json("verify", *env.opts(), "--resume")
    assert rc == 13  # the damage found before the interruption is still reported
    assert os.path.basename(first_pack) in err
    assert rep["packs_resumed"] == 2
    assert rep["packs_checked"] == len(packs(env)) - 2
    assert rep["coverage"]["percent"] == 100.0
    rc, rep, _ = run_json("verify", *env.opts(), "--resume")  # finished: nothing to resume, scans all
    assert rep["packs_checked"] == len(packs(env)) and rep["packs_resumed"] == 0
    assert any("no interrupted full scan" in n for n in rep["notices"])


# --- restore drills -----------------------------------------------------------------------------


def test_restore_test_reports_damaged_backup(env: Env) -> None:
    first, latest = env.backups()
    pack, offset = locate(env, latest, "e.txt")
    flip(pack, offset)
    rc, rep, err = run_json("verify", *env.opts(), "--restore-test", "--backup-id", latest, "--backup-id", first,
                            "--restore-dir", str(env.tmp))
    assert rc == 13
    drills = {t["backup"]: t for t in rep["restore_tests"]}
    assert not drills[latest]["ok"] and os.path.basename(pack) in drills[latest]["error"]
    assert drills[first]["ok"]  # the first backup's e.txt is a different file
    assert not glob.glob(os.path.join(env.tmp, "kyrorepo-restore-test-*"))


def test_damaged_config(env: Env) -> None:
    flip(os.path.join(env.repo, "config"), 30)
    rc, _, err = run("verify", *env.opts())
    assert rc == 13 and "repository config" in err
