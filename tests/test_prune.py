"""forget / prune end to end through the real CLI: rules, dry-run, space, crashes, concurrency."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time

import pytest

from kyrorepo.backends import open_backend
from kyrorepo.cli.main import cli as click_group
from kyrorepo.cli.main import main
from kyrorepo.format import BlobType
from kyrorepo.pack import PackBuilder, pack_name
from kyrorepo.prune import CRASH_ENV, CRASH_POINTS
from kyrorepo.repository import Repository
from treeutil import snapshot_tree

PW = "test-pass"
FAST_INIT = ["--kdf-memory-kib", "1024", "--kdf-iterations", "1", "--pack-size", "1M"]


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("KYROREPO_PASSWORD", PW)
    for var in ("KYROREPO_REPO", "KYROREPO_CACHE_DIR", CRASH_ENV, "BACKUP_ALLOW_CLEAR"):
        monkeypatch.delenv(var, raising=False)


class K:
    """kyrorepo in-process, bound to one repository and cache; records every backup's tree."""

    def __init__(self, tmp_path, capsys) -> None:
        self.tmp = tmp_path
        self.repo = str(tmp_path / "repo")
        self.cache = str(tmp_path / "cache")
        self.capsys = capsys
        self.trees: dict[str, dict] = {}
        self.outs = 0

    def __call__(self, *args: str, expect: int = 0) -> str:
        self.capsys.readouterr()
        code = main([*args, "--repo", self.repo, "--cache-dir", self.cache])
        out = self.capsys.readouterr()
        assert code == expect, f"kyrorepo {' '.join(args)} exited {code}, expected {expect}\n{out.out}\n{out.err}"
        return out.out

    def json(self, *args: str, expect: int = 0):
        return json.loads(self(*args, "--json", expect=expect))

    def backup(self, data, when: str, *extra: str) -> str:
        sid = self.json("backup", "--data-dir", str(data), "--time", when, *extra)["id"]
        self.trees[sid] = snapshot_tree(str(data))
        return sid

    def ids(self) -> set[str]:
        return {s["id"] for s in self.json("list")}

    def restore_all(self) -> None:
        """Every backup in the repository restores byte for byte; verify passes when it exists."""
        for sid in sorted(self.ids()):
            self.outs += 1
            out = self.tmp / f"restored{self.outs}"
            self("restore", "--backup-id", sid, "--data-dir", str(out))
            assert snapshot_tree(str(out)) == self.trees[sid], f"backup {sid[:8]} restored differently"
            shutil.rmtree(out)
        if "verify" in click_group.commands:
            self.capsys.readouterr()
            code = main(["verify", "--full-scan", "--repo", self.repo, "--cache-dir", self.cache])
            assert code == 0, self.capsys.readouterr()

    def files(self, prefix: str = "") -> dict[str, str]:
        out = {}
        for dirpath, _, names in os.walk(self.repo):
            for n in names:
                p = os.path.join(dirpath, n)
                rel = os.path.relpath(p, self.repo)
                if rel.startswith(prefix) and not rel.startswith("locks"):
                    with open(p, "rb") as f:
                        out[rel] = hashlib.sha256(f.read()).hexdigest()
        return out

    def data_bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(os.path.join(self.repo, "data"))
                   for n in ns)


@pytest.fixture
def k(tmp_path, capsys) -> K:
    kk = K(tmp_path, capsys)
    kk("init", *FAST_INIT)
    return kk


def write(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def history(k: K) -> tuple[str, str, str]:
    """s1: a+b; s2: a+c; s3: a+d+sub/e. Forgetting s1 and s2 leaves b and c unused."""
    data = k.tmp / "data"
    rnd = random.Random(5)
    write(data / "a", rnd.randbytes(400_000))
    write(data / "b", rnd.randbytes(400_000))
    s1 = k.backup(data, "2025-01-01T00:00:00")
    (data / "b").unlink()
    write(data / "c", rnd.randbytes(400_000))
    s2 = k.backup(data, "2025-01-02T00:00:00")
    (data / "c").unlink()
    write(data / "d", rnd.randbytes(50_000))
    write(data / "sub" / "e", b"small text\n" * 10)
    s3 = k.backup(data, "2025-01-03T00:00:00")
    return s1, s2, s3


# --- rules -----------------------------------------------------------------------------------

TIMES = ["2023-06-15T12:00:00", "2024-11-20T08:00:00", "2024-12-30T10:00:00", "2025-01-01T09:00:00",
         "2025-01-05T23:00:00", "2025-01-06T01:00:00", "2025-01-06T01:30:00", "2025-01-06T05:00:00"]
GUIDE = ["--hourly-hours", "24", "--daily-days", "7", "--weekly-weeks", "4", "--monthly-months", "12",
         "--min-age-days", "1"]
CASES = [
    (["--keep-last", "2"], {7, 6}),
    (["--keep-hourly", "2"], {7, 6}),
    (["--keep-daily", "2"], {7, 4}),
    (["--keep-weekly", "2"], {7, 4}),
    (["--keep-monthly", "2"], {7, 2}),
    (["--keep-yearly", "2"], {7, 2}),
    (["--keep-daily", "unlimited"], {7, 4, 3, 2, 1, 0}),
    (["--keep-within", "1d"], {7, 6, 5, 4}),
    (["--older-than-days", "1"], {7, 6, 5, 4}),
    (["--keep-within-hourly", "1d"], {7, 6, 4}),
    (["--hourly-hours", "24"], {7, 6, 4}),
    (["--keep-within-daily", "7d"], {7, 4, 3, 2}),
    (["--daily-days", "7"], {7, 4, 3, 2}),
    (["--keep-within-weekly", "2w"], {7, 4}),
    (["--weekly-weeks", "2"], {7, 4}),
    (["--keep-within-monthly", "2m"], {7, 2, 1}),
    (["--monthly-months", "2"], {7, 2, 1}),
    (["--keep-within-yearly", "2y"], {7, 2, 0}),
    (["--keep-tag", "old"], {0}),
    (["--keep-tag", "prod,db"], {7}),
    (["--keep-last", "1", "--min-age-days", "100000"], set(range(8))),
    (GUIDE, {7, 6, 4, 3, 2, 1}),
]


def test_every_rule_and_seed_form_through_the_cli(k):
    data = k.tmp / "data"
    write(data / "f", b"x" * 1000)
    ids = [k.backup(data, t, *(["--tag", "old"] if i == 0 else ["--tag", "prod", "--tag", "db"] if i == 7 else []))
           for i, t in enumerate(TIMES)]
    before = k.files()
    for args, expected in CASES:
        for cmd in ("forget", "prune"):
            out = k.json(cmd, "--dry-run", *args)
            assert out["dry_run"] is True
            (group,) = out["groups"]
            assert {b["id"] for b in group["keep"]} == {ids[i] for i in expected}, (cmd, args)
            assert {b["id"] for b in group["remove"]} == {ids[i] for i in range(8) if i not in expected}, (cmd, args)
            assert all(b["reasons"] for b in group["keep"]) and not any(b["reasons"] for b in group["remove"])
    assert k.files() == before
    # The guide's retention script, for real: reasons name the seed rules, data stays until prune.
    out = k.json("forget", *GUIDE)
    reasons = {b["id"]: b["reasons"] for b in out["groups"][0]["keep"]}
    assert reasons[ids[7]] == ["hourly within 24h", "daily within 7d", "weekly within 28d", "monthly within 12m"]
    assert reasons[ids[1]] == ["monthly within 12m"]
    assert k.ids() == {ids[i] for i in (7, 6, 4, 3, 2, 1)}
    assert set(k.files("data")) == set(before_data := {p for p in before if p.startswith("data")}) and before_data
    # Groups: per source by default, or across all; --source limits what is considered.
    k.backup(data, "2025-01-02T00:00:00", "--source", "other")
    other = k.backup(data, "2025-01-03T00:00:00", "--source", "other")
    by_source = k.json("forget", "--dry-run", "--keep-last", "1")
    assert [len(g["keep"]) for g in by_source["groups"]] == [1, 1]
    none = k.json("forget", "--dry-run", "--keep-last", "1", "--group-by", "none")
    assert [b["id"] for b in none["groups"][0]["keep"]] == [ids[7]]
    only = k.json("forget", "--keep-last", "1", "--source", "other")
    assert len(only["removed"]) == 1 and other in k.ids() and ids[6] in k.ids()


def test_no_keep_rule_is_refused(k):
    s1, s2, s3 = history(k)
    before = k.files()
    for args in (["prune"], ["forget"], ["prune", "--min-age-days", "1"], ["forget", "--keep-last", "0"],
                 ["prune", "--gc-only", "--keep-last", "1"], ["prune", "--older-than-days", "3", "--keep-within", "2d"],
                 ["prune", "--keep-within", "soon"], ["prune", "--keep-last", "1", "--max-unused", "150%"]):
        k(*args, expect=2)
    assert k.files() == before and k.ids() == {s1, s2, s3}


# --- garbage collection ---------------------------------------------------------------------


def test_dry_run_changes_nothing_and_estimates(k):
    s1, s2, s3 = history(k)
    before = k.files()
    text = k("prune", "--dry-run", "--keep-last", "1")
    assert "DRY-RUN: would remove 2 backup(s)" in text and "would be freed" in text
    assert f"keep   {s3[:8]}" in text and "last" in text and f"remove {s1[:8]}" in text
    out = k.json("prune", "--dry-run", "--keep-last", "1")
    assert out["removed"] == [s2, s1]
    assert out["gc"]["estimated_freed_bytes"] > 700_000 and out["gc"]["packs_to_delete"] >= 1
    assert k.files() == before and k.ids() == {s1, s2, s3}


def test_prune_reclaims_space_and_every_kept_backup_restores(k):
    s1, s2, s3 = history(k)
    size = k.data_bytes()
    out = k.json("prune", "--keep-last", "1")
    gc = out["gc"]
    assert out["removed"] == [s2, s1] and k.ids() == {s3}
    assert gc["packs_removed"] >= 2 and gc["blobs_moved"] >= 1 and gc["freed_bytes"] > 700_000
    assert k.data_bytes() < size - 700_000
    k.restore_all()
    again = k.json("prune", "--keep-last", "1")["gc"]
    assert again["packs_to_delete"] == 0 and again["freed_bytes"] < 20_000
    assert again["unindexed_packs_waiting"] == 0
    k.restore_all()


def test_deleting_any_backup_never_breaks_another(k):
    data = k.tmp / "data"
    rnd = random.Random(9)
    big = bytearray(rnd.randbytes(1_500_000))  # long enough for a content-list blob
    write(data / "big", bytes(big))
    write(data / "x" / "one", rnd.randbytes(100_000))
    tags = []
    for i in range(4):
        if i == 1:
            big[700_000:700_100] = rnd.randbytes(100)
            write(data / "big", bytes(big))
        if i == 2:
            (data / "x" / "one").unlink()
            write(data / "y" / "two", rnd.randbytes(300_000))
        if i == 3:
            write(data / "x" / "three", rnd.randbytes(200_000))
        k.backup(data, f"2025-02-0{i + 1}T00:00:00", "--tag", f"t{i}")
        tags.append(f"t{i}")
    for gone in ("t1", "t0", "t3"):
        tags.remove(gone)
        keep = [a for t in tags for a in ("--keep-tag", t)]
        k("prune", *keep, "--max-unused", "0%")
        assert len(k.ids()) == len(tags)
        k.restore_all()


def test_forget_keeps_data_until_prune(k):
    s1, s2, s3 = history(k)
    data_before = k.files("data")
    text = k("forget", "--keep-last", "1")
    assert "removed 2 backup(s)" in text and "kyrorepo prune" in text
    assert k.ids() == {s3} and k.files("data") == data_before
    gc = k.json("prune", "--gc-only")["gc"]
    assert gc["freed_bytes"] > 700_000 and k.ids() == {s3}
    k.restore_all()


def _stray_pack(k: K) -> str:
    """A pack a killed backup left behind: saved, never listed by an index segment."""
    repo = Repository.open(open_backend(k.repo), PW.encode(), str(k.tmp / "other-cache"))
    try:
        builder = PackBuilder(repo.codec)
        blob = os.urandom(5000)
        bid = repo.keys.blob_id(blob)
        builder.add(BlobType.DATA, bid, repo.codec.encode(BlobType.DATA, bid, blob), len(blob))
        pid, data, _ = builder.finish()
        repo.backend.save(pack_name(pid), data)
        return pack_name(pid)
    finally:
        repo.close()


def test_unindexed_packs_wait_for_the_grace_period(k):
    history(k)
    stray = _stray_pack(k)
    text = k("prune", "--gc-only")
    assert "1 unindexed pack(s) kept for the grace period" in text and stray in k.files()
    assert k.json("prune", "--gc-only", "--unindexed-grace", "1h")["gc"]["unindexed_packs_waiting"] == 1
    assert stray in k.files()
    assert k.json("prune", "--gc-only", "--unindexed-grace", "0")["gc"]["packs_removed"] == 1
    assert stray not in k.files()
    k.restore_all()


# --- crashes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_killed_prune_leaves_a_restorable_repository_and_prune_finishes(k, point):
    s1, s2, s3 = history(k)
    env = dict(os.environ, KYROREPO_PASSWORD=PW, **{CRASH_ENV: point})
    proc = subprocess.run([sys.executable, "-m", "kyrorepo", "prune", "--keep-last", "1", "--repo", k.repo,
                           "--cache-dir", k.cache], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 137, proc.stderr
    assert s3 in k.ids()
    k.restore_all()  # whatever survived the crash is whole; the stale lock is ignored
    out = k.json("prune", "--keep-last", "1")  # default grace: our own leftovers go anyway
    assert k.ids() == {s3}
    final = k.json("prune", "--gc-only", "--dry-run")["gc"]
    assert final["packs_to_delete"] == 0 and final["unindexed_packs_waiting"] == 0, (out, final)
    assert k.data_bytes() < 700_000
    k.restore_all()


# --- concurrency --------------------------------------------------------------------------------

HOLDER = r"""
import os, sys, time
from kyrorepo.backends import open_backend
from kyrorepo.backup import BackupOptions, run_backup
from kyrorepo.repository import Repository

mode, repo_path, cache, data, ready, go = sys.argv[1:7]
repo = Repository.open(open_backend(repo_path), os.environ["KYROREPO_PASSWORD"].encode(), cache)
seen = [0, False]

def wait():
    open(ready, "w").close()
    while not os.path.exists(go):
        time.sleep(0.05)

def progress(nbytes, nfiles):
    seen[0] += nbytes
    if seen[0] >= 2_500_000 and not seen[1]:
        seen[1] = True
        wait()  # mid-backup: packs uploaded, shared lock held, snapshot not yet saved

if mode == "exclusive":
    with repo.lock(exclusive=True):
        wait()
else:
    with repo.lock():
        res = run_backup(repo, BackupOptions(data_dir=data, source="concurrent", time=1767225600,
                                             progress=progress))
    print(res.snapshot.id)
repo.close()
"""


def _holder(k: K, mode: str, data) -> tuple[subprocess.Popen, str, str]:
    ready, go = str(k.tmp / f"{mode}.ready"), str(k.tmp / f"{mode}.go")
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, mode, k.repo, str(k.tmp / f"{mode}-cache"), str(data),
                             ready, go], env=dict(os.environ, KYROREPO_PASSWORD=PW), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(ready):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc, ready, go


def test_backup_running_during_prune_keeps_all_its_data(k):
    s1, s2, s3 = history(k)
    data2 = k.tmp / "data2"
    write(data2 / "big", random.Random(3).randbytes(4_000_000))
    write(data2 / "small", b"hello\n")
    backup, _, go = _holder(k, "backup", data2)
    before = k.files()
    # The most aggressive prune possible refuses while the backup holds its lock ...
    k("prune", "--keep-last", "1", "--group-by", "none", "--unindexed-grace", "0", "--max-unused", "0%", expect=11)
    settled = {p for p in before if "/.tmp" not in p}  # the blocked backup may still be finishing an upload
    assert settled <= set(k.files()) and k.ids() == {s1, s2, s3}
    # ... or waits for it with --retry-lock, then sees the new backup.
    pruner = subprocess.Popen([sys.executable, "-m", "kyrorepo", "prune", "--keep-last", "1", "--group-by", "none",
                               "--unindexed-grace", "0", "--max-unused", "0%", "--retry-lock", "60", "--json",
                               "--repo", k.repo, "--cache-dir", k.cache], env=dict(os.environ, KYROREPO_PASSWORD=PW),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)
    assert pruner.poll() is None, pruner.communicate()
    open(go, "w").close()
    out, err = backup.communicate(timeout=60)
    assert backup.returncode == 0, err
    new_id = out.strip()
    k.trees[new_id] = snapshot_tree(str(data2))
    pout, perr = pruner.communicate(timeout=60)
    assert pruner.returncode == 0, perr
    assert set(json.loads(pout)["removed"]) == {s1, s2, s3}
    assert k.ids() == {new_id}
    k.restore_all()


def test_backup_cannot_start_while_prune_holds_the_exclusive_lock(k):
    history(k)
    holder, _, go = _holder(k, "exclusive", k.tmp / "data")
    try:
        k("backup", "--data-dir", str(k.tmp / "data"), expect=11)
    finally:
        open(go, "w").close()
        holder.communicate(timeout=30)
    k("backup", "--data-dir", str(k.tmp / "data"))


def test_damaged_or_missing_packs_are_never_made_worse(k):
    s1, s2, s3 = history(k)
    packs = sorted((os.path.getsize(os.path.join(d, n)), os.path.join(d, n))
                   for d, _, ns in os.walk(os.path.join(k.repo, "data")) for n in ns)
    smallest, largest = packs[0][1], packs[-1][1]  # s3's own pack; a+b, to be repacked
    with open(largest, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    gc = k.json("prune", "--keep-last", "2")["gc"]
    assert any(os.path.basename(largest) in w for w in gc["warnings"]) and os.path.exists(largest)
    os.rename(smallest, smallest + ".away")
    before = k.files()
    assert k("prune", "--keep-last", "1", expect=13) == ""
    assert {p for p in k.files() if p.startswith("data")} == {p for p in before if p.startswith("data")}
    assert s3 in k.ids()


# --- one id, two types -----------------------------------------------------------------------


def _open(k: K) -> Repository:
    repo = Repository.open(open_backend(k.repo), PW.encode(), k.cache)
    repo.sync_index()
    return repo


def _top_node(repo: Repository, sid: str, name: bytes):
    from kyrorepo.snapshot import find_snapshot
    from kyrorepo.walk import load_tree

    return next(n for n in load_tree(repo, find_snapshot(repo, sid).tree) if n.name == name)


@pytest.mark.parametrize("kind", [BlobType.TREE, BlobType.CONTENT], ids=["tree", "content"])
@pytest.mark.parametrize("chunk_first", [False, True])
@pytest.mark.parametrize("file_backup_older", [True, False])
def test_a_file_holding_a_tree_or_content_lists_exact_bytes_shares_its_id_and_every_backup_survives(
        k, kind, chunk_first, file_backup_older):
    """A chunk and a tree or content list with the same plaintext have one id and are stored
    once, as the type that came first (docs/format.md, "Blob ids and types"). Every backup still
    restores, verify finds nothing, and prune keeps what the tree or content list references
    whichever use of the id its mark phase meets first (it used to skip walking a tree whose id
    it had met as a chunk)."""
    trees, files = k.tmp / "trees", k.tmp / "files"
    if kind == BlobType.TREE:
        write(trees / "d" / "c", random.Random(9).randbytes(300_000))  # only the tree of d references c
    else:
        write(trees / "d", random.Random(9).randbytes(600_000))  # more chunks than a node holds inline
    write(files / "other", b"x" * 1000)
    first = k.backup(trees, "2025-01-01T00:00:00", "--tag", "first")
    repo = _open(k)
    node = _top_node(repo, first, b"d")
    meta_id = node.subtree if kind == BlobType.TREE else node.content[0]
    plaintext = repo.load_blob(meta_id, kind)
    repo.close()
    t_files, t_trees = ("2025-01-02T00:00:00", "2025-01-03T00:00:00")[::1 if file_backup_older else -1]
    write(files / "copy", plaintext)
    if chunk_first:  # the id goes, comes back as a chunk, then as a tree or content list again
        k("prune", "--keep-tag", "none-such", "--max-unused", "0%", "--unindexed-grace", "0")
        assert k.ids() == set()
        s_files = k.backup(files, t_files)
        k.backup(trees, t_trees)
    else:
        s_files = k.backup(files, t_files)
    repo = _open(k)
    assert _top_node(repo, s_files, b"copy").chunks == ((meta_id, len(plaintext)),)
    assert repo.lookup(meta_id).type == (BlobType.DATA if chunk_first else kind)
    repo.close()
    k("prune", "--gc-only", "--max-unused", "0%", "--unindexed-grace", "0")
    k.restore_all()
