"""Restore and the full data check through worker processes (kyrorepo.procpool), end to end.

A local repository is reopened in the worker processes; in-memory backends keep threads
(tests/test_pipeline.py covers that path).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from kyrorepo.backends import LocalBackend, MemoryBackend
from kyrorepo.crypto import MasterKey
from kyrorepo.errors import IntegrityError, KyroError
from kyrorepo.format import BlobType
from kyrorepo.keys import KdfParams
from kyrorepo import procpool
from kyrorepo.cli.main import main
from kyrorepo.procpool import WORKER_MALLOC, ProcPool, Setup, ThreadRunner, WorkerFailed, open_runner
from kyrorepo.repository import Repository
from kyrorepo import restore as restore_mod
from kyrorepo.restore_worker import FileCheck, check_file
from kyrorepo.pack import pack_name
from kyrorepo.snapshot import find_snapshot
from kyrorepo.walk import chunk_refs
from treeutil import snapshot_tree, start_restore_over_old_content

WORKER_MARK = "procpool import worker_main"


def make_tree(root) -> None:
    """Many small files, empty files, hard links, a mostly-zero file and files spanning many packs."""
    rnd = __import__("random").Random(7)
    for d in range(6):
        sub = root / f"d{d}"
        sub.mkdir(parents=True)
        for i in range(60):
            (sub / f"small{i}").write_bytes(rnd.randbytes(rnd.randrange(1, 9000)))
        (sub / "empty").write_bytes(b"")
    (root / "big.bin").write_bytes(rnd.randbytes(6 * 1024 * 1024))
    with open(root / "sparse.bin", "wb") as f:  # holes read back as zeros
        f.write(b"head")
        f.seek(3 * 1024 * 1024)
        f.write(rnd.randbytes(100_000))
        f.truncate(5 * 1024 * 1024)
    (root / "same1.bin").write_bytes(b"x" * 300_000)  # deduplicated chunks within and across files
    (root / "same2.bin").write_bytes(b"x" * 300_000)
    os.link(root / "big.bin", root / "d0" / "big-link.bin")
    os.link(root / "d1" / "empty", root / "d2" / "empty-link")
    os.link(root / "d3" / "small5", root / "d4" / "small5-link")
    os.symlink("big.bin", root / "link")
    os.chmod(root / "d5" / "small1", 0o640)


def our_workers(cache: str) -> list[int]:
    """Worker processes started by commands of this test (they inherit its cache directory)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if WORKER_MARK.encode() not in f.read():
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"KYROREPO_CACHE_DIR={cache}".encode() in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:
            continue
    return found


def packs_of(repo: str) -> list[str]:
    out = []
    for d, _, fs in os.walk(os.path.join(repo, "data")):
        out += [os.path.join(d, f) for f in fs]
    return sorted(out, key=os.path.getsize)


def flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


@pytest.fixture
def backed_up(repo_cli, tmp_path):
    data = tmp_path / "data"
    make_tree(data)
    repo_cli.run("backup", "--data-dir", str(data))
    return repo_cli, data


@pytest.mark.parametrize("direct_io", ["1", "0"])
def test_restore_is_identical_through_worker_processes(backed_up, tmp_path, direct_io):
    """With direct I/O (kyrorepo.directio) and, as on a file system refusing it, without."""
    cli, data = backed_up
    out = tmp_path / "out"
    r = cli.run("restore", "--backup-id", "latest", "--data-dir", str(out), env={"KYROREPO_DIRECT_IO": direct_io})
    assert "every file verified" in r.stdout
    assert snapshot_tree(str(out)) == snapshot_tree(str(data))
    assert os.stat(out / "big.bin").st_ino == os.stat(out / "d0" / "big-link.bin").st_ino
    assert os.stat(out / "d1" / "empty").st_ino == os.stat(out / "d2" / "empty-link").st_ino
    assert not our_workers(cli.cache)


def restore_latest(cli, target: str) -> None:  # type: ignore[no-untyped-def]
    """``run_restore`` of the latest backup into ``target``, in this process (so that the
    test's monkeypatches of the restore module apply)."""
    repo = Repository.open(LocalBackend(cli.repo), b"test-pass", cli.cache)
    try:
        restore_mod.run_restore(repo, find_snapshot(repo, "latest"), restore_mod.RestoreOptions(target))
    finally:
        repo.close()


def test_large_file_in_several_segments_is_read_back(backed_up, tmp_path, monkeypatch):
    """A file larger than one segment is written by several workers at once, then hashed
    back from the disk; one segment's file is hashed while it is written."""
    cli, data = backed_up
    monkeypatch.setattr(restore_mod, "SEGMENT_MAX", 1 << 20)
    submitted = []
    real = restore_mod._Writer._submit_segment

    def spy(self, f, ranges, check):
        submitted.append((f.shown, check is not None))
        return real(self, f, ranges, check)

    monkeypatch.setattr(restore_mod._Writer, "_submit_segment", spy)
    restore_latest(cli, str(tmp_path / "out"))
    assert snapshot_tree(str(tmp_path / "out")) == snapshot_tree(str(data))
    big = [whole for shown, whole in submitted if shown == "big.bin"]
    assert len(big) >= 5 and not any(big)  # 6 MiB in segments of about 1 MiB: read back
    sparse = [whole for shown, whole in submitted if shown == "sparse.bin"]
    assert len(sparse) >= 4 and not any(sparse)


def test_split_file_is_read_back_only_after_its_last_segment(backed_up, tmp_path, monkeypatch):
    """With no worker thread ever free while tasks are out, every segment waits until all
    earlier replies are taken, its own file's earlier segments among them: the file must not
    be read back (and found short) before its last segment is written."""
    cli, data = backed_up
    monkeypatch.setattr(restore_mod, "SEGMENT_MAX", 1 << 20)
    for cls in (procpool.ProcPool, procpool.ThreadRunner):
        monkeypatch.setattr(cls, "idle", property(lambda self: self.pending == 0))
    restore_latest(cli, str(tmp_path / "out"))
    assert snapshot_tree(str(tmp_path / "out")) == snapshot_tree(str(data))


def test_restore_with_a_fsync_per_file(backed_up, tmp_path, monkeypatch):
    """Where the platform has no ``syncfs``, every restored file is fsynced once it is checked:
    in the worker that checked it (whole files in a range, one-segment files), after reading
    it back (split files), or here (empty files); the restore is the same."""
    cli, data = backed_up
    monkeypatch.setattr(restore_mod, "FILES_NEED_FSYNC", True)
    monkeypatch.setattr(restore_mod, "SEGMENT_MAX", 11 << 19)  # sparse.bin (5 MiB) one segment, big.bin (6) two
    restore_latest(cli, str(tmp_path / "out"))
    assert snapshot_tree(str(tmp_path / "out")) == snapshot_tree(str(data))


def damaged_restore(cli, tmp_path) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    """Restore the latest backup over a target holding one old file, expecting exit 13 (damage):
    the old content stays, no staging directory or worker is left. Returns the run."""
    target = tmp_path / "target"
    target.mkdir()
    (target / "old").write_text("old content")
    r = cli.run("restore", "--backup-id", "latest", "--data-dir", str(target), "--allow-clear", expect=13)
    assert os.listdir(target) == ["old"] and (target / "old").read_text() == "old content"
    assert not [e for e in os.listdir(tmp_path) if "kyrorepo" in e]  # no staging directory left
    assert not our_workers(cli.cache)
    return r


def test_damaged_chunk_fails_with_13_and_leaves_target(backed_up, tmp_path):
    cli, _ = backed_up
    biggest = packs_of(cli.repo)[-1]
    flip(biggest, os.path.getsize(biggest) // 2)  # inside a data blob of the largest file
    r = damaged_restore(cli, tmp_path)
    assert "failed authentication" in r.stderr and os.path.basename(biggest) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_authentic_chunk_with_other_content_fails_its_file(backed_up, tmp_path):
    """A blob that opens (sealed with the repository's keys) but holds other bytes than its id
    says: restore does not re-hash chunks, the file's digest catches it, and nothing is swapped
    in; verify --full-scan names the chunk."""
    cli, _ = backed_up
    repo = Repository.open(LocalBackend(cli.repo), b"test-pass", cli.cache)
    try:
        node = dict(restore_mod.selected_entries(repo, find_snapshot(repo, "latest"), ()))[b"big.bin"]
        bid, length = list(chunk_refs(repo, node))[1]  # random data: stored raw
        loc = repo.cache.lookup(bid)
        assert loc is not None
        forged = repo.keys.seal(BlobType.DATA, bid, b"\x00" + bytes(length))
        assert len(forged) == loc.length
        with open(os.path.join(cli.repo, pack_name(loc.pack_id)), "r+b") as f:
            f.seek(loc.offset)
            f.write(forged)
    finally:
        repo.close()
    r = damaged_restore(cli, tmp_path)
    assert "restored file big.bin does not match its recorded digest" in r.stderr
    r = cli.run("verify", "--full-scan", expect=None)
    assert r.returncode != 0 and bid.hex()[:16] in r.stdout + r.stderr


def test_full_scan_finds_flipped_byte_in_workers(backed_up):
    cli, _ = backed_up
    assert cli.run("verify", "--full-scan").returncode == 0
    pack = packs_of(cli.repo)[-1]
    flip(pack, os.path.getsize(pack) // 3)
    r = cli.run("verify", "--full-scan", expect=13)
    assert os.path.basename(pack) in r.stdout + r.stderr
    assert not our_workers(cli.cache)


def test_interrupted_restore_stops_its_workers(repo_cli, tmp_path):
    proc, target = start_restore_over_old_content(repo_cli, tmp_path, 4)
    while proc.poll() is None:
        if any(".kyrorepo-staging-" in e for e in os.listdir(tmp_path)) and our_workers(repo_cli.cache):
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("restore finished before it could be interrupted")
    assert proc.returncode == 130, err
    assert os.listdir(target) == ["old"]
    assert not [e for e in os.listdir(tmp_path) if "kyrorepo" in e]
    assert not our_workers(repo_cli.cache)


def test_runner_choice_follows_the_backend(tmp_path):
    fast = KdfParams(memory_kib=1024, iterations=1)
    local = Repository.create(LocalBackend(str(tmp_path / "r")), b"pw", str(tmp_path / "c1"), kdf=fast)
    memory = Repository.create(MemoryBackend(), b"pw", str(tmp_path / "c2"), kdf=fast)
    runner = open_runner(local, 2)
    try:
        assert isinstance(runner, ProcPool)
    finally:
        runner.close()
    runner = open_runner(memory, 2)
    try:
        assert isinstance(runner, ThreadRunner)
    finally:
        runner.close()
    local.close()
    memory.close()


def test_worker_errors_come_back_as_errors(tmp_path):
    keys = MasterKey.generate().keys()
    pool = ProcPool(Setup(LocalBackend(str(tmp_path)).reopen_spec(), keys, 3), 1)
    try:
        missing = FileCheck(str(tmp_path / "nope"), "nope", 1, bytes(32), False)
        pool.submit(check_file, missing)
        with pytest.raises(KyroError, match="restored file nope cannot be read back"):
            pool.wait()
        (tmp_path / "f").write_bytes(b"abc")
        pool.submit(check_file, FileCheck(str(tmp_path / "f"), "f", 3, bytes(32), False))
        with pytest.raises(IntegrityError, match="restored file f does not match its recorded digest"):
            pool.wait()
        pool.submit(check_file, None)  # a bug in a task: its traceback is the cause
        with pytest.raises(WorkerFailed, match="AttributeError") as info:
            pool.wait()
        assert "check_file" in str(info.value.__cause__)
        good = FileCheck(str(tmp_path / "f"), "f", 3, keys.blob_id(b"abc"), False)
        pool.submit(check_file, good)
        assert pool.wait()[1] is None  # the worker lives on after errors
        pool._workers[0].proc.kill()
        with pytest.raises(KyroError, match="was killed by signal 9"):
            pool.submit(check_file, good)
            pool.wait()
    finally:
        pool.close()


def test_prestarted_workers_are_adopted_replaced_or_stopped(tmp_path):
    """``prestart`` starts workers before their Setup: the next pool takes them (a dead one is
    replaced), and those no pool took stop when the socket closes at exit."""
    keys = MasterKey.generate().keys()
    (tmp_path / "f").write_bytes(b"abc")
    good = FileCheck(str(tmp_path / "f"), "f", 3, keys.blob_id(b"abc"), False)
    setup = Setup(LocalBackend(str(tmp_path)).reopen_spec(), keys, 3)
    procpool.prestart(2, ("kyrorepo.restore_worker",))
    spares = [w.proc for w, _ in procpool._SPARES]
    assert len(spares) == 2
    spares[0].kill()
    spares[0].wait()
    pool = ProcPool(setup, 2)
    try:
        assert spares[1] in [w.proc for w in pool._workers]  # adopted
        assert spares[0] not in [w.proc for w in pool._workers]  # dead: replaced
        assert procpool._SPARES == []
        for _ in range(2):
            pool.submit(check_file, good)
        assert [pool.wait()[1] for _ in range(2)] == [None, None]
    finally:
        pool.close()
    procpool.prestart(1)
    left = procpool._SPARES[0][0].proc
    procpool.stop_spares()  # what restore does on its way out, and exit
    assert left.poll() == 0 and procpool._SPARES == []


def record_prestarts(monkeypatch) -> list[tuple[object, tuple[str, ...]]]:
    """(process, preloaded modules) of every worker ``procpool.prestart`` starts from now on."""
    real = procpool.prestart
    started: list[tuple[object, tuple[str, ...]]] = []

    def prestart(processes: int, preload: tuple[str, ...] = ()) -> None:
        real(processes, preload)
        started.extend((w.proc, preload) for w, _ in procpool._SPARES)

    monkeypatch.setattr(procpool, "prestart", prestart)
    return started


def test_full_check_adopts_the_workers_it_prestarted(backed_up, monkeypatch):
    """verify --full-scan starts its workers (importing the pack checker) before it opens the
    repository, and its pool adopts them; a structure-only verify starts none."""
    cli, _ = backed_up
    monkeypatch.setenv("KYROREPO_PASSWORD", "test-pass")
    started = record_prestarts(monkeypatch)
    pooled: list[object] = []
    real_init = ProcPool.__init__

    def init(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        real_init(self, *args, **kwargs)
        pooled.extend(w.proc for w in self._workers)

    monkeypatch.setattr(ProcPool, "__init__", init)
    args = ["verify", "--repo", cli.repo, "--cache-dir", cli.cache, "--workers", "2"]
    assert main(args) == 0
    assert started == [] and pooled == []
    assert main([*args, "--full-scan"]) == 0
    assert len(started) == procpool.process_count(2) and all("kyrorepo.verify_pack" in preload for _, preload in started)
    assert {p for p, _ in started} == set(pooled)
    assert all(p.poll() is not None for p, _ in started) and procpool._SPARES == []


def test_refused_restore_stops_its_prestarted_workers(backed_up, tmp_path, monkeypatch):
    """restore starts its workers before it opens the repository; refused (non-empty target,
    no --allow-clear), it stops them before it returns, and leaves the target alone."""
    cli, _ = backed_up
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep").write_text("mine")
    monkeypatch.setenv("KYROREPO_PASSWORD", "test-pass")
    monkeypatch.delenv("BACKUP_ALLOW_CLEAR", raising=False)
    started = record_prestarts(monkeypatch)
    rc = main(["restore", "--repo", cli.repo, "--cache-dir", cli.cache, "--backup-id", "latest",
               "--data-dir", str(target)])
    assert rc == 15
    assert started and all(p.poll() is not None for p, _ in started)
    assert procpool._SPARES == []
    assert [p.name for p in target.iterdir()] == ["keep"] and (target / "keep").read_text() == "mine"


@pytest.fixture
def echo_after(monkeypatch):  # type: ignore[no-untyped-def]
    """``pool_tasks.echo_after``, with this directory on the workers' PYTHONPATH so they can import it."""
    here = os.path.dirname(os.path.abspath(__file__))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    from pool_tasks import echo_after as task

    return task


def test_replies_may_overtake_within_a_worker(tmp_path, echo_after):
    """A worker runs two tasks at once: a quick task's reply overtakes a slow one's and is
    matched to its own ticket."""
    pool = ProcPool(Setup(LocalBackend(str(tmp_path)).reopen_spec(), MasterKey.generate().keys(), 3, threads=2), 1)
    try:
        assert pool.slots == 3
        slow = pool.submit(echo_after, (1.0, "slow"))
        quick = pool.submit(echo_after, (0.0, "quick"))
        assert pool.wait() == (quick, "quick")
        assert pool.wait() == (slow, "slow")
        assert pool.pending == 0
    finally:
        pool.close()


def test_workers_keep_freed_memory_for_reuse(tmp_path, echo_after, monkeypatch):
    """Workers run with procpool.WORKER_MALLOC (glibc keeps freed plaintexts for the next range
    instead of faulting them in afresh), before the user's own tunables, which win."""
    from pool_tasks import environ

    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    pool = ProcPool(Setup(LocalBackend(str(tmp_path)).reopen_spec(), MasterKey.generate().keys(), 3), 1)
    try:
        pool.submit(environ, "GLIBC_TUNABLES")
        assert pool.wait()[1] == WORKER_MALLOC + ":glibc.malloc.arena_max=2"
    finally:
        pool.close()


def test_idle_means_a_worker_thread_is_free(tmp_path, echo_after):
    pool = ProcPool(Setup(LocalBackend(str(tmp_path)).reopen_spec(), MasterKey.generate().keys(), 3, threads=1), 2)
    try:
        assert pool.idle
        first = pool.submit(echo_after, (0.5, "a"))
        assert pool.idle  # the other worker is free
        pool.submit(echo_after, (0.5, "b"))
        assert not pool.idle and pool.pending == 2  # a third task would wait behind one of them
        assert pool.wait()[0] in (first, first + 1)
        assert pool.idle
        pool.wait()
    finally:
        pool.close()


def test_segments_start_on_a_free_worker_thread(backed_up, tmp_path, monkeypatch):
    """A segment (up to SEGMENT_MAX bytes of work) is sent only when some worker thread is
    free, never queued behind a busy worker's tasks while another worker runs dry."""
    cli, data = backed_up
    monkeypatch.setattr(restore_mod, "SEGMENT_MAX", 1 << 19)  # the two large files: 22 segments
    sent = []
    real = ProcPool.submit

    def spy(self, fn, arg):  # type: ignore[no-untyped-def]
        sent.append((fn.__name__, self.idle))
        return real(self, fn, arg)

    monkeypatch.setattr(ProcPool, "submit", spy)
    restore_latest(cli, str(tmp_path / "out"))
    assert snapshot_tree(str(tmp_path / "out")) == snapshot_tree(str(data))
    segments = [idle for name, idle in sent if name == "write_segment"]
    assert len(segments) >= 20 and all(segments)


def test_restore_killed_mid_swap_gets_the_old_content_back(repo_cli, tmp_path):
    """Killed after the old content was moved aside and before the new one moved in: the
    next restore puts the old content back and refuses to replace it without --allow-clear."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "new").write_text("backed up")
    repo_cli.run("backup", "--data-dir", str(data))
    (tmp_path / ".target.kyrorepo-old-0badc0de").mkdir()
    (tmp_path / ".target.kyrorepo-old-0badc0de" / "precious").write_text("user data")
    target = tmp_path / "target"
    r = repo_cli.run("restore", "--backup-id", "latest", "--data-dir", str(target), expect=15)
    assert "not empty" in r.stderr
    assert (target / "precious").read_text() == "user data"
    assert not [e for e in os.listdir(tmp_path) if "kyrorepo-old" in e]
    repo_cli.run("restore", "--backup-id", "latest", "--data-dir", str(target), "--allow-clear")
    assert os.listdir(target) == ["new"]
