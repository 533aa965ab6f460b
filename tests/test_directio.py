"""Direct I/O (kyrorepo.directio) on the real file system of the test directory: every write
and read must give the bytes the page-cache path gives, whatever the alignment."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kyrorepo import directio
from kyrorepo.backends import LocalBackend
from kyrorepo.backends.base import load_view
from kyrorepo.backends.memory import MemoryBackend
from kyrorepo.backends.wrappers import RetryBackend
from kyrorepo.errors import ObjectNotFoundError
from kyrorepo.directio import ALIGN, MIN_DIRECT

pytestmark = pytest.mark.skipif(not directio.O_DIRECT, reason="no O_DIRECT on this platform")


@pytest.fixture(autouse=True)
def direct_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(directio._Switch, "on", True)


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 131 + seed * 7 + (i >> 12)) & 0xFF for i in range(n))


@settings(max_examples=40, deadline=None)
@given(offset=st.integers(0, 3 * ALIGN), sizes=st.lists(st.integers(1, 200_000), min_size=1, max_size=6),
       seed=st.integers(0, 255))
def test_write_at_matches_plain_write(tmp_path_factory: pytest.TempPathFactory, offset: int, sizes: list[int],
                                      seed: int) -> None:
    path = str(tmp_path_factory.mktemp("w") / "f")
    before = pattern(offset + sum(sizes) + 2 * ALIGN, 255 - seed)
    with open(path, "wb") as f:
        f.write(before)
    bufs = [pattern(n, seed + i) for i, n in enumerate(sizes)]
    total = sum(sizes)
    fd = os.open(path, os.O_WRONLY)
    dfd = directio.open_direct(path, os.O_WRONLY)
    assert dfd is not None
    try:
        done = directio.write_at(dfd, fd, bufs, offset, total)
        if not done:
            directio.pwrite_all(fd, b"".join(bufs), offset)
    finally:
        os.close(fd)
        os.close(dfd)
    assert done == (directio.align_down(offset + total) - directio.align_up(offset) >= MIN_DIRECT)
    with open(path, "rb") as f:
        got = f.read()
    assert got == before[:offset] + b"".join(bufs) + before[offset + total:]


def test_adjacent_runs_share_a_page(tmp_path: os.PathLike[str]) -> None:
    """Two runs meeting inside a page, written through separate descriptors as two restore
    workers would: the shared page is written through the page cache by both."""
    path = os.path.join(tmp_path, "f")
    a, b = pattern(ALIGN * 100 + 123, 1), pattern(ALIGN * 90 + 7, 2)
    for first in (a, b):
        assert len(first) > MIN_DIRECT
    fds = [os.open(path, os.O_WRONLY | os.O_CREAT, 0o600) for _ in range(2)]
    dfds = [directio.open_direct(path, os.O_WRONLY) for _ in range(2)]
    try:
        assert directio.write_at(dfds[1], fds[1], [b[:5000], b[5000:]], len(a), len(b))  # the later run first
        assert directio.write_at(dfds[0], fds[0], [a], 0, len(a))
    finally:
        for fd in fds + dfds:
            if fd is not None:
                os.close(fd)
    with open(path, "rb") as f:
        assert f.read() == a + b


@pytest.mark.parametrize("size", [0, 1, ALIGN - 1, MIN_DIRECT, MIN_DIRECT + 1, 5 * MIN_DIRECT + 4095])
@pytest.mark.parametrize("aligned", [True, False])
def test_write_file(tmp_path: os.PathLike[str], size: int, aligned: bool) -> None:
    data = pattern(size, 9)
    if aligned:
        buf = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buf[:size] = data
        src: bytes | memoryview = memoryview(buf)[:size]
    else:
        src = data
    LocalBackend(str(tmp_path)).save("f", src)  # directio.write_file, as packs are saved
    with open(os.path.join(tmp_path, "f"), "rb") as f:
        assert f.read() == data


@settings(max_examples=30, deadline=None)
@given(offset=st.integers(0, 600_000), length=st.integers(0, 700_000))
def test_pread_matches_plain_read(tmp_path_factory: pytest.TempPathFactory, offset: int, length: int) -> None:
    path = str(tmp_path_factory.mktemp("r") / "f")
    data = pattern(1_000_003, 3)
    with open(path, "wb") as f:
        f.write(data)
    got = directio.pread(path, offset, length)
    if length < MIN_DIRECT:
        assert got is None
    else:
        assert got == data[offset:offset + length]


@settings(max_examples=40, deadline=None)
@given(offset=st.integers(0, 1_100_000), length=st.integers(0, 700_000), direct=st.booleans())
def test_read_view_matches_plain_read(tmp_path_factory: pytest.TempPathFactory, offset: int, length: int,
                                      direct: bool) -> None:
    path = str(tmp_path_factory.mktemp("r") / "f")
    data = pattern(1_000_003, 4)
    with open(path, "wb") as f:
        f.write(data)
    directio._Switch.on = direct
    assert directio.read_view(path, offset, length) == data[offset:offset + length]


def test_read_view_reuses_its_buffer(tmp_path: os.PathLike[str]) -> None:
    """Ranges read one after another land in the same buffer: no new object per read (that is the
    point), so a view is valid only until the thread's next read."""
    path = os.path.join(tmp_path, "f")
    data = pattern(3 * MIN_DIRECT, 6)
    with open(path, "wb") as f:
        f.write(data)
    first = directio.read_view(path, 0, MIN_DIRECT)
    assert first == data[:MIN_DIRECT]
    second = directio.read_view(path, MIN_DIRECT + 1, MIN_DIRECT)
    assert second == data[MIN_DIRECT + 1:2 * MIN_DIRECT + 1]
    assert second.obj is first.obj
    assert first != data[:MIN_DIRECT]  # overwritten by the second read


def test_load_view_through_wrappers(tmp_path: os.PathLike[str]) -> None:
    """``load_view`` gives ``load``'s bytes from a local backend, bare or retried (a view), and from
    a backend without one (the bytes of its ``load``)."""
    data = pattern(2 * MIN_DIRECT + 99, 8)
    local = LocalBackend(str(tmp_path))
    local.save("data/ab/x", data)
    memory = MemoryBackend()
    memory.save("data/ab/x", data)
    for backend in (local, RetryBackend(local), memory, RetryBackend(memory)):
        for offset, length in ((0, len(data)), (5, MIN_DIRECT + 3), (len(data) - 10, 100), (0, 7)):
            assert load_view(backend, "data/ab/x", offset, length) == backend.load("data/ab/x", offset, length)
    assert isinstance(load_view(RetryBackend(local), "data/ab/x", 0, 7), memoryview)
    with pytest.raises(ObjectNotFoundError):
        load_view(RetryBackend(local), "data/ab/missing", 0, 7)


@pytest.mark.parametrize("size", [0, 1, ALIGN, 3 * 65536 + 17, 4 * 65536])
def test_read_blocks(tmp_path: os.PathLike[str], size: int) -> None:
    path = os.path.join(tmp_path, "f")
    data = pattern(size, 5)
    with open(path, "wb") as f:
        f.write(data)
    assert b"".join(bytes(p) for p in directio.read_blocks(path, 65536)) == data
    assert directio.enabled()  # a short last read is the end of the file, not a refusal


def test_switched_off_by_environment() -> None:
    code = "from kyrorepo import directio; print(directio.enabled())"
    env = dict(os.environ, KYROREPO_DIRECT_IO="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
