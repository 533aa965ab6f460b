"""The full data check of one pack (kyrorepo.verify_pack.scan_pack) read in pieces smaller
than its blobs: blobs straddling piece boundaries are checked like the others, and damage
anywhere is found, whatever the piece size."""

from __future__ import annotations

import os
import random

import pytest

from kyrorepo import verify_pack
from kyrorepo.backends import LocalBackend
from kyrorepo.format import BlobType, encode_trailer
from kyrorepo.keys import KdfParams
from kyrorepo.pack import pack_name
from kyrorepo.procpool import WorkerContext
from kyrorepo.repository import Repository
from kyrorepo.verify_pack import PackJob, scan_pack

PIECES = [4096, 4096 * 3 + 1, 65536, 1 << 20, 64 << 20]


@pytest.fixture
def one_pack(tmp_path):
    """A repository holding one pack of ~1.5 MiB: blobs of 1 byte to 200 KiB."""
    repo = Repository.create(LocalBackend(str(tmp_path / "r")), b"pw", str(tmp_path / "c"),
                             kdf=KdfParams(memory_kib=1024, iterations=1), compression_level=0)
    rnd = random.Random(3)
    for n in [1, 10, 200_000, 5, 70_000, 131_072, 3, 400_000, 90_000, 1000, 250_000, 77]:
        repo.add_blob(BlobType.DATA, rnd.randbytes(n))
    repo.flush()
    repo.sync_index()
    pids = {loc.pack_id for _, loc in repo.cache.iter_blobs()}
    assert len(pids) == 1
    pid = pids.pop()
    entries = tuple(sorted(repo.pack_trailer(pid), key=lambda e: e.offset))
    path = os.path.join(str(tmp_path / "r"), *pack_name(pid).split("/"))
    job = PackJob(pid, os.path.getsize(path), encode_trailer(entries))
    assert job.entries == entries
    ctx = WorkerContext(repo.backend, repo.codec, repo.keys)
    yield ctx, job, path
    repo.close()


def scan(ctx, job, piece, monkeypatch):
    monkeypatch.setattr(verify_pack, "PIECE", piece)
    return scan_pack(ctx, job)


@pytest.mark.parametrize("piece", PIECES)
def test_intact_pack_in_any_piece_size(one_pack, piece, monkeypatch):
    ctx, job, _ = one_pack
    res = scan(ctx, job, piece, monkeypatch)
    assert res.notes == [] and res.notice == ""
    assert res.blobs_ok == len(job.entries) == 12
    assert res.bytes_read == job.size
    assert res.unlisted == ()


@pytest.mark.parametrize("piece", PIECES)
def test_flipped_byte_in_each_blob_is_found(one_pack, piece, monkeypatch):
    ctx, job, path = one_pack
    for e in job.entries:
        at = e.offset + e.length - 1  # the last byte: for a straddling blob, in the later piece
        with open(path, "r+b") as f:
            f.seek(at)
            b = f.read(1)
            f.seek(at)
            f.write(bytes([b[0] ^ 1]))
        try:
            res = scan(ctx, job, piece, monkeypatch)
        finally:
            with open(path, "r+b") as f:
                f.seek(at)
                f.write(b)
        assert [n[0] for n in res.notes] == [e.id], (e, res.notes)
        assert "failed authentication" in res.notes[0][2]
        assert res.blobs_ok == len(job.entries) - 1


@pytest.mark.parametrize("piece", PIECES)
def test_truncated_pack(one_pack, piece, monkeypatch):
    ctx, job, path = one_pack
    cut = job.entries[7].offset + 10  # inside the 8th blob
    with open(path, "r+b") as f:
        f.truncate(cut)
    res = scan(ctx, job, piece, monkeypatch)
    damaged = [n[0] for n in res.notes if n[0]]
    assert damaged == [e.id for e in job.entries[7:]]
    assert res.blobs_ok == 7
    assert any(f"has {cut} bytes, {job.size} were listed" in n[2] for n in res.notes)
    assert any("trailer is damaged" in n[2] for n in res.notes)
    assert res.bytes_read == cut
