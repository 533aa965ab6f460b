"""Repository: blobs, packs, index cache staleness, tamper detection, concurrent writers."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from kyrorepo.backends import LocalBackend, MemoryBackend
from kyrorepo.errors import IntegrityError, LockedError, NoRepositoryError, RepositoryExistsError, WrongPasswordError
from kyrorepo.format import BlobType, PackInfo
from kyrorepo.keys import KdfParams
from kyrorepo.opening import Unlocking, unlock_master
from kyrorepo.pack import PackBuilder, pack_name
from kyrorepo.repository import Repository

FAST = KdfParams(1024, 1, 1)


def make_repo(tmp_path, backend=None, **kw):
    backend = backend or LocalBackend(str(tmp_path / "repo"))
    return Repository.create(backend, b"pw", str(tmp_path / "cache"), kdf=FAST, pack_size=1024 * 1024, **kw)


def reopen(repo, tmp_path, cache="cache2"):
    return Repository.open(repo.backend, b"pw", str(tmp_path / cache))


def blobs(n, size=20000):
    return [os.urandom(size) for _ in range(n)]


def test_create_open_roundtrip(tmp_path):
    repo = make_repo(tmp_path)
    data = blobs(200)
    ids = [repo.add_blob(BlobType.DATA, d)[0] for d in data]
    repo.flush()
    r2 = reopen(repo, tmp_path)
    assert r2.config == repo.config
    r2.sync_index()
    for bid, d in zip(ids, data):
        assert r2.load_blob(bid) == d
    assert len(list(repo.backend.list("data/"))) >= 3  # 4 MB of random data in 1 MiB packs


def test_dedup_within_and_across_runs(tmp_path):
    repo = make_repo(tmp_path)
    d = os.urandom(5000)
    assert repo.add_blob(BlobType.DATA, d)[1] is True
    assert repo.add_blob(BlobType.DATA, d)[1] is False
    repo.flush()
    r2 = reopen(repo, tmp_path)
    r2.sync_index()
    assert r2.add_blob(BlobType.DATA, d)[1] is False


def test_init_twice_refused_and_missing_repo(tmp_path):
    repo = make_repo(tmp_path)
    with pytest.raises(RepositoryExistsError):
        make_repo(tmp_path, backend=repo.backend)
    with pytest.raises(NoRepositoryError):
        Repository.open(LocalBackend(str(tmp_path / "none")), b"pw", str(tmp_path / "c"))


def test_wrong_password_and_second_key(tmp_path):
    repo = make_repo(tmp_path)
    with pytest.raises(WrongPasswordError):
        Repository.open(repo.backend, b"nope", str(tmp_path / "c"))
    repo.add_key(b"second", FAST)
    assert Repository.open(repo.backend, b"second", str(tmp_path / "c")).config.repo_id == repo.config.repo_id


def test_unlocking_on_a_thread_gives_the_key_or_the_error_unlock_master_gives(tmp_path):
    repo = make_repo(tmp_path)
    repo.add_key(b"second", FAST)
    for password in (b"pw", b"second"):
        unlocking = Unlocking(repo.backend, password)
        master = unlocking.master()
        assert master.secret == repo.master.secret == unlock_master(repo.backend, password).secret
        assert Repository.unlocked(repo.backend, master, str(tmp_path / "c")).config == repo.config
    wrong = Unlocking(repo.backend, b"nope")
    wrong.wait()  # the caller may wait first (to close the backend), and still gets the error
    with pytest.raises(WrongPasswordError):
        wrong.master()
    with pytest.raises(NoRepositoryError):
        Unlocking(LocalBackend(str(tmp_path / "none")), b"pw").master()
    for name, _ in list(repo.backend.list("keys/")):
        repo.backend.save(name, b"{}")
    with pytest.raises(IntegrityError, match="damaged"):
        Unlocking(repo.backend, b"pw").master()


def test_memory_backend_repository(tmp_path):
    repo = make_repo(tmp_path, backend=MemoryBackend())
    bid, _ = repo.add_blob(BlobType.TREE, b"tree")
    repo.flush()
    assert repo.load_blob(bid, BlobType.TREE) == b"tree"


def _one_pack(repo):
    (name, size), = [x for x in repo.backend.list("data/")]
    return name, size


def test_flipped_byte_in_pack_detected(tmp_path):
    repo = make_repo(tmp_path)
    bid, _ = repo.add_blob(BlobType.DATA, b"x" * 1000 + os.urandom(100))
    repo.flush()
    name, _ = _one_pack(repo)
    path = os.path.join(repo.backend.root, name)
    loc = repo.lookup(bid)
    with open(path, "r+b") as f:
        f.seek(loc.offset + 20)
        b = f.read(1)
        f.seek(loc.offset + 20)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(IntegrityError, match="failed authentication"):
        repo.load_blob(bid)


def test_truncated_pack_detected(tmp_path):
    repo = make_repo(tmp_path)
    bid, _ = repo.add_blob(BlobType.DATA, os.urandom(3000))
    repo.flush()
    name, size = _one_pack(repo)
    with open(os.path.join(repo.backend.root, name), "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(IntegrityError):
        repo.pack_trailer(bytes.fromhex(name.rsplit("/", 1)[1]))


def test_swapped_blob_detected_but_moved_blob_opens(tmp_path):
    repo = make_repo(tmp_path)
    a, b = os.urandom(1000), os.urandom(1000)
    ida, _ = repo.add_blob(BlobType.DATA, a)
    idb, _ = repo.add_blob(BlobType.DATA, b)
    repo.flush()
    la, lb = repo.lookup(ida), repo.lookup(idb)
    pack = repo.backend.load(pack_name(la.pack_id))
    sealed_a = pack[la.offset:la.offset + la.length]
    sealed_b = pack[lb.offset:lb.offset + lb.length]
    # Swapped: a's sealed bytes presented as b are rejected.
    with pytest.raises(IntegrityError):
        repo.codec.decode(BlobType.DATA, idb, sealed_a, "swapped")
    # Moved: the same sealed bytes in another pack, at another offset, still open.
    builder = PackBuilder(repo.codec)
    builder.add(BlobType.DATA, idb, sealed_b, len(b))
    builder.add(BlobType.DATA, ida, sealed_a, len(a))
    pack_id, data, entries = builder.finish()
    moved = {e.id: e for e in entries}
    assert moved[ida].offset != la.offset
    assert repo.codec.decode(BlobType.DATA, ida, data[moved[ida].offset:][:moved[ida].length], "moved") == a


def test_cache_never_claims_removed_blobs(tmp_path):
    repo = make_repo(tmp_path)
    bid, _ = repo.add_blob(BlobType.DATA, os.urandom(1000))
    repo.flush()
    assert repo.has_blob(bid)
    # Another client (prune) removes the segment: the next sync forgets the blob.
    for name, _ in list(repo.backend.list("index/")):
        repo.backend.remove(name)
    r2 = reopen(repo, tmp_path, cache="cache")  # same cache dir as repo
    r2.sync_index()
    assert not r2.has_blob(bid)


def test_cache_picks_up_other_writers_segments(tmp_path):
    repo = make_repo(tmp_path)
    other = reopen(repo, tmp_path, cache="other")
    bid, _ = other.add_blob(BlobType.DATA, os.urandom(1000))
    other.flush()
    r2 = reopen(repo, tmp_path, cache="cache")
    r2.sync_index()
    assert r2.has_blob(bid)


def test_cache_rebuilt_when_deleted_or_damaged(tmp_path):
    repo = make_repo(tmp_path)
    bid, _ = repo.add_blob(BlobType.DATA, os.urandom(1000))
    repo.flush()
    cache_dir = os.path.join(str(tmp_path / "cache"), repo.config.repo_id, "index")
    repo.cache.close()
    with open(os.path.join(cache_dir, "data.mdb"), "r+b") as f:
        f.write(b"\xff" * 4096)
    r2 = reopen(repo, tmp_path, cache="cache")
    r2.sync_index()
    assert r2.load_blob(bid)


def test_damaged_index_segment_named(tmp_path):
    repo = make_repo(tmp_path)
    repo.add_blob(BlobType.DATA, os.urandom(1000))
    repo.flush()
    (name, _), = list(repo.backend.list("index/"))
    path = os.path.join(repo.backend.root, name)
    data = bytearray(open(path, "rb").read())
    data[-5] ^= 0xFF
    open(path, "wb").write(bytes(data))
    r2 = reopen(repo, tmp_path)
    with pytest.raises(IntegrityError, match=name.split("/")[1][:16]):
        r2.sync_index()


def test_exclusive_lock_excludes(tmp_path):
    repo = make_repo(tmp_path)
    r2 = reopen(repo, tmp_path)
    with repo.lock():
        with r2.lock():
            pass  # shared + shared
        with pytest.raises(LockedError):
            with r2.lock(exclusive=True):
                pass
    with repo.lock(exclusive=True):
        with pytest.raises(LockedError):
            with r2.lock():
                pass
    assert not list(repo.backend.list("locks/"))


def _writer(root, cache, seed):
    repo = Repository.open(LocalBackend(root), b"pw", cache)
    rnd = os.urandom
    ids = []
    for i in range(60):
        bid, _ = repo.add_blob(BlobType.DATA, bytes([seed]) * 100 + rnd(30000))
        ids.append(bid)
    repo.flush()
    return ids


def test_concurrent_writer_processes_make_distinct_packs(tmp_path):
    repo = make_repo(tmp_path)
    root = repo.backend.root
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        results = pool.starmap(_writer, [(root, str(tmp_path / f"c{i}"), i) for i in range(3)])
    r = reopen(repo, tmp_path, cache="final")
    r.sync_index()
    packs = [n for n, _ in repo.backend.list("data/")]
    assert len(packs) == len(set(packs)) >= 6
    for ids in results:
        for bid in ids:
            assert r.load_blob(bid)
    seen: set[bytes] = set()
    for seg in r.object_names(BlobType.INDEX):
        for info in r.load_index_segment(seg):
            assert isinstance(info, PackInfo)
            assert info.pack_id not in seen
            seen.add(info.pack_id)


def test_truncated_cache_is_thrown_away_not_a_crash(tmp_path):
    repo = make_repo(tmp_path)
    bid, _ = repo.add_blob(BlobType.DATA, os.urandom(1000))
    repo.flush()
    path = os.path.join(str(tmp_path / "cache"), repo.config.repo_id, "index", "data.mdb")
    for _ in range(100):  # grow the file well past its first pages
        repo.cache.put_file_stats("s", [(os.urandom(40), (1, 2, 3, 4, os.urandom(32)))])
    repo.cache.close()
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    r2 = reopen(repo, tmp_path, cache="cache")
    r2.sync_index()
    assert r2.load_blob(bid)
