"""Compression dictionaries: trained once per repository, used by new chunks, carried by copy,
checked by verify, pinned by golden vectors (docs/format.md, "Compression dictionaries")."""

from __future__ import annotations

import filecmp
import json
import os
import random

import pytest
import zstandard

from kyrorepo.backends import LocalBackend, MemoryBackend
from kyrorepo.backup import BackupOptions, run_backup
from kyrorepo.blob import COMP_ZSTD_DICT, BlobCodec, Dictionaries
from kyrorepo.crypto import MasterKey
from kyrorepo.dictionary import MIN_SOURCE_BYTES, ensure_dictionary, read_samples, train
from kyrorepo.errors import IntegrityError
from kyrorepo.format import BlobType, split_file
from kyrorepo.keys import KdfParams
from kyrorepo.pack import parse_pack
from kyrorepo.repository import Repository
from test_verify import flip

GOLDEN = json.load(open(os.path.join(os.path.dirname(__file__), "golden", "v1-dict.json")))
FAST = KdfParams(1024, 1)
WORDS = sorted({"".join(random.Random(i).choice("bcdfgklmnprst") + random.Random(i * 7).choice("aeiou")
                         for _ in range(1 + i % 4)).encode() + b"%d" % (i % 97) for i in range(4000)})


def write_pages(path: str, pages: int, seed: int) -> None:
    """Database-like 8 KiB pages: text-like records from a fixed vocabulary, then random bytes."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(pages):
            text = b" ".join(rng.choices(WORDS, k=700))[:4096].ljust(4096, b" ")
            f.write(text + rng.randbytes(4096))


@pytest.fixture
def db_dir(tmp_path) -> str:
    d = tmp_path / "db"
    d.mkdir()
    write_pages(str(d / "table1.dat"), 1024, 1)  # 8 MiB
    write_pages(str(d / "table2.dat"), 512, 2)  # 4 MiB
    return str(d)


def sealed_bodies(repo: Repository) -> list[bytes]:
    """The opened (still compressed) bodies of every DATA blob in the repository."""
    out = []
    for name, _ in repo.backend.list("data/"):
        data = repo.backend.load(name)
        for e in parse_pack(repo.codec, data, name):
            if e.type == BlobType.DATA:
                out.append(repo.keys.open(e.type, e.id, data[e.offset:e.offset + e.length], name))
    return out


def test_golden_dictionary_and_chunk_open():
    keys = MasterKey(bytes.fromhex(GOLDEN["master_key"])).keys()
    backend = MemoryBackend()
    d = GOLDEN["dictionary"]
    backend.save(f"dicts/{d['id']}", bytes.fromhex(d["object"]))
    codec = BlobCodec(keys, 2, Dictionaries(backend, keys))
    assert codec.dicts.data(bytes.fromhex(d["id"])) == bytes.fromhex(d["raw"])
    assert keys.blob_id(bytes.fromhex(d["raw"])).hex() == d["id"]
    c = GOLDEN["chunk"]
    sealed = bytes.fromhex(c["sealed_dict"])
    body = keys.open(BlobType.DATA, bytes.fromhex(c["id"]), sealed, "golden")
    assert body[0] == COMP_ZSTD_DICT and body[1:33].hex() == d["id"]
    assert codec.decode(BlobType.DATA, bytes.fromhex(c["id"]), sealed, "golden") == bytes.fromhex(c["plain"])
    # the encoder writes the same layout, and only DATA blobs use the dictionary
    plain = bytes.fromhex(c["plain"])
    body = keys.open(BlobType.DATA, bytes.fromhex(c["id"]), codec.encode(BlobType.DATA, bytes.fromhex(c["id"]), plain), "x")
    assert body[0] == COMP_ZSTD_DICT and body[1:33].hex() == d["id"]
    tid = keys.blob_id(plain)
    assert keys.open(BlobType.TREE, tid, codec.encode(BlobType.TREE, tid, plain), "x")[0] == 1


def test_dictionary_blob_without_repository_is_a_clear_error():
    keys = MasterKey(bytes.fromhex(GOLDEN["master_key"])).keys()
    c = GOLDEN["chunk"]
    with pytest.raises(IntegrityError, match="dictionary"):
        BlobCodec(keys, 2).decode(BlobType.DATA, bytes.fromhex(c["id"]), bytes.fromhex(c["sealed_dict"]), "chunk")


def test_first_backup_trains_one_dictionary_and_chunks_use_it(repo_cli, db_dir, tmp_path):
    repo_cli.run("backup", "--data-dir", db_dir)
    dicts = os.listdir(os.path.join(repo_cli.repo, "dicts"))
    assert len(dicts) == 1
    assert os.listdir(os.path.join(repo_cli.repo, "dictcopies")) == dicts  # stored twice
    repo_cli.run("backup", "--data-dir", db_dir, "--full")
    assert os.listdir(os.path.join(repo_cli.repo, "dicts")) == dicts  # trained once
    repo = Repository.open(LocalBackend(repo_cli.repo), b"test-pass", str(tmp_path / "c2"))
    try:
        bodies = sealed_bodies(repo)
        used = [b for b in bodies if b[0] == COMP_ZSTD_DICT]
        assert len(used) > len(bodies) // 2
        assert {b[1:33].hex() for b in used} == set(dicts)
    finally:
        repo.close()
    out = str(tmp_path / "out")
    repo_cli.run("restore", "--data-dir", out, "--backup-id", "latest")
    assert not filecmp.dircmp(db_dir, out).diff_files
    for f in os.listdir(db_dir):
        assert filecmp.cmp(os.path.join(db_dir, f), os.path.join(out, f), shallow=False)
    assert "1 compression dictionary checked" in repo_cli.run("verify", "--full-scan").stdout


def test_dictionary_stores_less_than_plain_zstd(db_dir):
    samples = read_samples(db_dir, 32 * 1024)
    raw = train(samples, 2)
    assert raw is not None
    test = [open(os.path.join(db_dir, "table2.dat"), "rb").read()[i:i + 32768] for i in range(0, 4 << 20, 1 << 20)]
    plain = sum(len(zstandard.ZstdCompressor(level=3).compress(t)) for t in test)
    with_dict = sum(len(zstandard.ZstdCompressor(level=2, dict_data=zstandard.ZstdCompressionDict(raw)).compress(t))
                    for t in test)
    assert with_dict < plain * 0.97  # the gain train() demands (MIN_GAIN)


def test_small_or_random_sources_get_no_dictionary(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    write_pages(str(small / "t.dat"), 64, 3)  # 512 KiB
    assert read_samples(str(small), 32768) == []
    rnd = tmp_path / "random"
    rnd.mkdir()
    (rnd / "blob.bin").write_bytes(random.Random(4).randbytes(MIN_SOURCE_BYTES + 1))
    samples = read_samples(str(rnd), 32768)
    assert len(samples) > 32
    assert train(samples, 2) is None
    repo = Repository.create(MemoryBackend(), b"pw", str(tmp_path / "cache"), kdf=FAST)
    try:
        assert ensure_dictionary(repo, str(rnd)) is None
        assert repo.object_names(BlobType.DICT) == []
        # the failed attempt is remembered: the next backups do not sample again for a day
        write_pages(str(rnd / "t.dat"), 2048, 5)
        assert ensure_dictionary(repo, str(rnd)) is None
        marker = os.path.join(repo.cache_root, repo.config.repo_id, "dictionary-attempt")
        os.utime(marker, (0, 0))  # a day later: the data, compressible now, gets its dictionary
        assert ensure_dictionary(repo, str(rnd)) is not None
        assert len(repo.object_names(BlobType.DICT)) == 1
    finally:
        repo.close()


def test_lowest_id_wins_and_every_dictionary_stays_readable(tmp_path, db_dir):
    backend = MemoryBackend()
    repo = Repository.create(backend, b"pw", str(tmp_path / "cache"), kdf=FAST)
    try:
        samples = read_samples(db_dir, 32768)
        first = repo.codec.dicts.add(train(samples, 2))
        second = repo.codec.dicts.add(train(list(reversed(samples)), 2))
        assert first != second
        assert repo.codec.dicts.current() == min(first, second)
        chunk = open(os.path.join(db_dir, "table1.dat"), "rb").read(40000)
        cid = repo.keys.blob_id(chunk)
        for did in (first, second):  # a blob made by another writer with the other dictionary
            other = BlobCodec(repo.keys, 2, Dictionaries(backend, repo.keys))
            other.dicts._current, other.dicts._listed = did, frozenset()
            sealed = other.encode(BlobType.DATA, cid, chunk)
            assert repo.keys.open(BlobType.DATA, cid, sealed, "x")[1:33] == did
            fresh = BlobCodec(repo.keys, 2, Dictionaries(backend, repo.keys))
            assert fresh.decode(BlobType.DATA, cid, sealed, "x") == chunk
        reopened = Dictionaries(backend, repo.keys)
        assert reopened.current() == min(first, second)
    finally:
        repo.close()


def test_copy_carries_the_dictionary(repo_cli, db_dir, tmp_path):
    repo_cli.run("backup", "--data-dir", db_dir)
    dest = str(tmp_path / "dest")
    repo_cli.run("copy", "--to", dest, "--kdf-memory-kib", "1024", "--kdf-iterations", "1")
    for d in ("dicts", "dictcopies"):
        assert os.listdir(os.path.join(dest, d)) == os.listdir(os.path.join(repo_cli.repo, "dicts"))
    proc = repo_cli.run("verify", "--full-scan", "--repo", dest, repo=False)
    assert "no damage found" in proc.stdout
    out = str(tmp_path / "out")
    repo_cli.run("restore", "--repo", dest, "--data-dir", out, "--backup-id", "latest", repo=False)
    assert filecmp.cmp(os.path.join(db_dir, "table1.dat"), os.path.join(out, "table1.dat"), shallow=False)


def _dict_paths(repo: str) -> tuple[str, str]:
    name = os.listdir(os.path.join(repo, "dicts"))[0]
    return os.path.join(repo, "dicts", name), os.path.join(repo, "dictcopies", name)


def test_golden_dictionary_opens_from_its_copy_alone():
    keys = MasterKey(bytes.fromhex(GOLDEN["master_key"])).keys()
    backend = MemoryBackend()
    d = GOLDEN["dictionary"]
    backend.save(f"dictcopies/{d['id']}", bytes.fromhex(d["object"]))  # dicts/<id> is missing
    codec = BlobCodec(keys, 2, Dictionaries(backend, keys))
    c = GOLDEN["chunk"]
    assert codec.decode(BlobType.DATA, bytes.fromhex(c["id"]), bytes.fromhex(c["sealed_dict"]), "golden") == \
        bytes.fromhex(c["plain"])
    assert codec.dicts.current() == bytes.fromhex(d["id"])


@pytest.mark.parametrize("damaged", ["dicts", "dictcopies"])
def test_one_damaged_dictionary_object_loses_nothing_and_repair_index_mends_it(repo_cli, db_dir, tmp_path, damaged):
    repo_cli.run("backup", "--data-dir", db_dir)
    primary, copy = _dict_paths(repo_cli.repo)
    bad, good = (primary, copy) if damaged == "dicts" else (copy, primary)
    flip(bad, 60)
    out = str(tmp_path / "out")
    repo_cli.run("restore", "--data-dir", out, "--backup-id", "latest")  # every chunk opens
    for f in os.listdir(db_dir):
        assert filecmp.cmp(os.path.join(db_dir, f), os.path.join(out, f), shallow=False)
    shown_bad = os.path.relpath(bad, repo_cli.repo)
    shown_good = os.path.relpath(good, repo_cli.repo)
    report = json.loads(repo_cli.run("verify", "--full-scan", "--json", expect=13).stdout)
    (d,) = report["damaged"]  # the object alone: no chunk, backup or file is damaged
    assert d["object"] == f"dictionary {shown_bad}" and f"its other copy {shown_good} is intact" in d["reason"]
    assert d["fixed_by"] == "repair index" and d["blobs"] == 0 and not d["backups"] and not report["affected_files"]
    assert report["blobs_checked"] > 0
    kept = open(good, "rb").read()
    proc = repo_cli.run("repair", "index")
    assert f"dictionary {shown_bad}: stored again from its intact copy" in proc.stdout
    assert open(good, "rb").read() == kept  # the intact one is left as it was
    assert "no damage found" in repo_cli.run("verify", "--full-scan").stdout


def test_a_dictionary_stored_once_is_a_notice_and_the_next_backup_stores_the_other(repo_cli, db_dir):
    repo_cli.run("backup", "--data-dir", db_dir)
    primary, copy = _dict_paths(repo_cli.repo)
    for gone in (copy, primary):  # a repository from before the copies; a writer killed between the saves
        os.remove(gone)
        proc = repo_cli.run("verify", "--full-scan")
        assert "no damage found" in proc.stdout
        assert "1 compression dictionary is stored once" in proc.stdout + proc.stderr
        repo_cli.run("backup", "--data-dir", db_dir)
        assert os.path.exists(primary) and os.path.exists(copy)
        proc = repo_cli.run("verify")
        assert "stored once" not in proc.stdout + proc.stderr
    assert len(os.listdir(os.path.dirname(primary))) == 1  # no second dictionary was trained


class StatCounting(MemoryBackend):
    """A memory backend that records the objects asked about one by one (an S3 HEAD each)."""

    def __init__(self) -> None:
        super().__init__()
        self.stat_calls: list[str] = []

    def stat(self, name: str) -> int:
        self.stat_calls.append(name)
        return super().stat(name)


def test_backup_finds_missing_dictionary_objects_from_the_listing(tmp_path, db_dir):
    backend = StatCounting()
    cache = str(tmp_path / "cache")
    Repository.create(backend, b"pw", cache, kdf=FAST).close()
    for remove in (None, None, "dictcopies", "dicts"):  # trains; has both; lacks one, then the other
        if remove is not None:
            backend.remove(f"{remove}/{names[0]}")
        repo = Repository.open(backend, b"pw", cache)
        try:
            backend.stat_calls.clear()
            run_backup(repo, BackupOptions(data_dir=db_dir, source="db"))
        finally:
            repo.close()
        assert not [n for n in backend.stat_calls if n.startswith(("dicts/", "dictcopies/"))]
        names = [n.split("/")[1] for n, _ in backend.list("dicts/")]
        assert len(names) == 1
        assert [n.split("/")[1] for n, _ in backend.list("dictcopies/")] == names


def test_an_object_in_a_dictionary_directory_that_is_not_named_by_an_id_is_damage(repo_cli, db_dir):
    repo_cli.run("backup", "--data-dir", db_dir)
    open(os.path.join(repo_cli.repo, "dictcopies", "not-an-id"), "wb").write(b"x")
    report = json.loads(repo_cli.run("verify", "--json", expect=13).stdout)
    assert [(d["object"], d["reason"]) for d in report["damaged"]] == [
        ("dictionary dictcopies/not-an-id", "has a malformed name")]
    assert "1 compression dictionary checked" in " ".join(report["notices"])


def test_copy_sends_the_dictionary_object_that_opens(repo_cli, db_dir, tmp_path):
    repo_cli.run("backup", "--data-dir", db_dir)
    primary, copy = _dict_paths(repo_cli.repo)
    flip(primary, 60)
    dest = str(tmp_path / "dest")
    repo_cli.run("copy", "--to", dest, "--kdf-memory-kib", "1024", "--kdf-iterations", "1")
    name = os.path.basename(primary)
    for d in ("dicts", "dictcopies"):
        assert open(os.path.join(dest, d, name), "rb").read() == open(copy, "rb").read()
    assert "no damage found" in repo_cli.run("verify", "--full-scan", "--repo", dest, repo=False).stdout


def test_lost_dictionary_is_named_and_restore_refuses(repo_cli, db_dir, tmp_path):
    repo_cli.run("backup", "--data-dir", db_dir)
    primary, copy = _dict_paths(repo_cli.repo)
    name = os.path.basename(primary)
    originals = {p: open(p, "rb").read() for p in (primary, copy)}
    flip(primary, 60)
    flip(copy, 60)
    proc = repo_cli.run("verify", expect=13)
    text = proc.stdout + proc.stderr
    assert f"dictionary dicts/{name}" in text and f"its copy dictcopies/{name}" in text
    proc = repo_cli.run("repair", "index", expect=13)
    assert "cannot be opened from either copy" in proc.stderr
    os.remove(primary)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = repo_cli.run("restore", "--data-dir", str(out), "--backup-id", "latest", "--allow-clear", expect=13)
    assert f"dicts/{name} is missing" in proc.stderr and f"its copy dictcopies/{name}" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine" and os.listdir(out) == ["keep.txt"]
    proc = repo_cli.run("verify", "--full-scan", expect=13)
    assert f"dicts/{name} is missing" in proc.stdout + proc.stderr
    for p, data in originals.items():  # put back from a copy of the repository: everything opens again
        open(p, "wb").write(data)
    repo_cli.run("verify", "--full-scan")


def test_dictionary_object_is_sealed(repo_cli, db_dir):
    repo_cli.run("backup", "--data-dir", db_dir)
    ddir = os.path.join(repo_cli.repo, "dicts")
    data = open(os.path.join(ddir, os.listdir(ddir)[0]), "rb").read()
    split_file(data, BlobType.DICT, "dict")  # a sealed object file of type DICT
    assert WORDS[1000] not in data and b"\x37\xa4\x30\xec" not in data  # no vocabulary, no zstd dict magic
