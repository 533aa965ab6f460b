"""The LMDB index cache: segments added in bounded transactions, and a half-added segment.

A segment is written in several transactions when it lists more than ``TXN_ENTRIES``
blobs; a process killed between them must leave a cache that ``sync`` either completes
(the segment is still in the repository) or rebuilds (it is gone), never one that
claims the blobs of a segment it does not know.
"""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from kyrorepo import index
from kyrorepo.format import BlobType, PackEntry, PackInfo
from kyrorepo.index import IndexCache
from kyrorepo.lmdbutil import SMALL_FILE, MappedPages

PACK_LEN = 16 << 20


def make_packs(seed: int, packs: int, per_pack: int) -> list[PackInfo]:
    """``packs`` packs of ``per_pack`` distinct blob ids, derived from ``seed`` (reproducible in a child)."""
    out = []
    for p in range(packs):
        pid = bytes([seed, p]) * 16
        entries = tuple(PackEntry(bytes([seed, p, i >> 8, i & 255]) * 8, BlobType.DATA, 8 + 100 * i, 100, 90)
                        for i in range(per_pack))
        out.append(PackInfo(pid, PACK_LEN, entries))
    return out


def all_ids(packs: list[PackInfo]) -> list[bytes]:
    return [e.id for p in packs for e in p.entries]


def test_a_large_segment_goes_in_several_transactions_and_is_complete(tmp_path, monkeypatch):
    monkeypatch.setattr(index, "TXN_ENTRIES", 100)
    monkeypatch.setattr(index, "RELEASE_EVERY", 16)
    cache = IndexCache(str(tmp_path / "idx"))
    packs = make_packs(1, 3, 350)
    cache.add_segment("seg1", packs)
    assert cache.segment_names() == {"seg1"} and cache.loading_names() == set()
    assert cache.counts() == (1050, 3, 1)
    for p in packs:
        for e in p.entries:
            loc = cache.lookup(e.id)
            assert loc is not None and (loc.pack_id, loc.offset, loc.length, loc.raw_length) == \
                (p.pack_id, e.offset, e.length, e.raw_length)
    assert {pid for pid, _, _ in cache.iter_packs()} == {p.pack_id for p in packs}


def test_an_empty_segment_is_recorded(tmp_path):
    cache = IndexCache(str(tmp_path / "idx"))
    cache.add_segment("empty", [])
    assert cache.segment_names() == {"empty"} and cache.loading_names() == set()


def kill_during_add(path: str) -> None:
    """Add segment "seg1" in a child process that is killed (SIGKILL) after its first transaction."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path[:0] = {sys.path!r}
        from kyrorepo import index
        from tests.test_index_cache import make_packs
        index.TXN_ENTRIES = 100
        index.RELEASE_EVERY = 1000
        index.IndexCache.release_pages = lambda self: os.kill(os.getpid(), signal.SIGKILL)
        index.IndexCache({path!r}).add_segment("seg1", make_packs(1, 3, 350))
    """)
    proc = subprocess.run([sys.executable, "-c", script], check=False, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == -signal.SIGKILL


def test_a_half_added_segment_is_added_again_while_the_repository_has_it(tmp_path):
    path = str(tmp_path / "idx")
    cache = IndexCache(path)
    cache.add_segment("seg0", make_packs(0, 1, 10))
    cache.close()
    kill_during_add(path)
    cache = IndexCache(path)
    packs = make_packs(1, 3, 350)
    assert cache.segment_names() == {"seg0"} and cache.loading_names() == {"seg1"}
    present = sum(cache.has(bid) for bid in all_ids(packs))
    assert present == 100  # the first transaction's blobs, and no more
    loaded = cache.sync({"seg0", "seg1"}, lambda name: packs)
    assert loaded == 1
    assert cache.segment_names() == {"seg0", "seg1"} and cache.loading_names() == set()
    assert all(cache.has(bid) for bid in all_ids(packs))


def test_a_half_added_segment_gone_from_the_repository_makes_the_cache_rebuild(tmp_path):
    path = str(tmp_path / "idx")
    cache = IndexCache(path)
    kept = make_packs(0, 1, 10)
    cache.add_segment("seg0", kept)
    cache.close()
    kill_during_add(path)
    cache = IndexCache(path)
    stale = all_ids(make_packs(1, 3, 350))
    assert any(cache.has(bid) for bid in stale)
    # The segment was replaced meanwhile (prune): none of its blobs may be claimed any more.
    loaded = cache.sync({"seg0"}, lambda name: kept)
    assert loaded == 1
    assert not any(cache.has(bid) for bid in stale)
    assert all(cache.has(bid) for bid in all_ids(kept))
    assert cache.segment_names() == {"seg0"} and cache.loading_names() == set()


def _resident_kib(path: str) -> int:
    """KiB of this process's mappings of ``path`` that are resident (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:  # a mapping's first line
                inside = len(head) == 6 and head[5] == path
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise of file mappings: Linux only")
@pytest.mark.parametrize("mib, dropped", [(4, False), (24, True)])
def test_mapped_pages_are_dropped_only_from_large_files(tmp_path, mib, dropped):
    """``MappedPages.release`` drops a large file's touched pages from this process's RSS; a file
    of at most ``SMALL_FILE`` bytes stays mapped (it cannot add more than its size)."""
    assert ((mib << 20) > SMALL_FILE) == dropped
    path = str(tmp_path / "mapped")
    with open(path, "wb") as f:
        f.write(os.urandom(mib << 20))
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert sum(m[i] for i in range(0, len(m), 4096)) >= 0  # touch every page
        before = _resident_kib(path)
        MappedPages(path).release()
        after = _resident_kib(path)
        assert m[len(m) - 1] == m[len(m) - 1]  # the bytes are still there
    assert before >= (mib << 10) * 3 // 4
    assert (after < before // 8) if dropped else (after == before)
