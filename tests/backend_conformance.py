"""One conformance suite for every Backend implementation.

Mix ``BackendConformance`` into a test class that provides a ``backend`` fixture
returning a fresh, empty backend. Every backend must pass it unchanged.
"""

from __future__ import annotations

import os
import threading

import pytest

from kyrorepo.errors import ObjectNotFoundError, PermanentBackendError


class BackendConformance:
    def test_save_load_roundtrip(self, backend):
        backend.save("data/ab/abcdef", b"hello world")
        assert backend.load("data/ab/abcdef") == b"hello world"

    def test_empty_object(self, backend):
        backend.save("keys/empty", b"")
        assert backend.load("keys/empty") == b""
        assert backend.stat("keys/empty") == 0

    def test_large_object(self, backend):
        data = os.urandom(9 * 1024 * 1024 + 17)
        backend.save("data/00/big", data)
        assert backend.stat("data/00/big") == len(data)
        assert backend.load("data/00/big") == data
        assert backend.load("data/00/big", 5 * 1024 * 1024, 1000) == data[5 * 1024 * 1024:5 * 1024 * 1024 + 1000]

    def test_load_range(self, backend):
        backend.save("index/seg", bytes(range(100)))
        assert backend.load("index/seg", 10, 5) == bytes(range(10, 15))
        assert backend.load("index/seg", 90) == bytes(range(90, 100))
        assert backend.load("index/seg", 95, 50) == bytes(range(95, 100))
        assert backend.load("index/seg", 0, 0) == b""

    def test_overwrite_replaces(self, backend):
        backend.save("locks/l1", b"one")
        backend.save("locks/l1", b"two!")
        assert backend.load("locks/l1") == b"two!"
        assert backend.stat("locks/l1") == 4

    def test_missing_object(self, backend):
        with pytest.raises(ObjectNotFoundError):
            backend.load("snapshots/missing")
        with pytest.raises(ObjectNotFoundError):
            backend.stat("snapshots/missing")
        with pytest.raises(ObjectNotFoundError):
            backend.remove("snapshots/missing")

    def test_list_prefix(self, backend):
        names = {"data/aa/aa01": b"1", "data/ab/ab02": b"22", "index/i1": b"333", "config": b"c"}
        for n, d in names.items():
            backend.save(n, d)
        assert dict(backend.list("data/")) == {"data/aa/aa01": 1, "data/ab/ab02": 2}
        assert dict(backend.list("index/")) == {"index/i1": 3}
        assert dict(backend.list("")) == {n: len(d) for n, d in names.items()}
        assert dict(backend.list("snapshots/")) == {}
        assert dict(backend.list("data/aa/")) == {"data/aa/aa01": 1}

    def test_list_many(self, backend):
        for i in range(300):
            backend.save(f"snapshots/{i:04d}", b"x")
        assert sorted(n for n, _ in backend.list("snapshots/")) == [f"snapshots/{i:04d}" for i in range(300)]

    def test_remove(self, backend):
        backend.save("snapshots/s1", b"x")
        backend.remove("snapshots/s1")
        with pytest.raises(ObjectNotFoundError):
            backend.load("snapshots/s1")
        assert dict(backend.list("snapshots/")) == {}

    @pytest.mark.parametrize("bad", ["", "/abs", "a//b", "../x", "a/../b", "a/./b", "sp ace", "x/", "ü"])
    def test_invalid_names_rejected(self, backend, bad):
        with pytest.raises(PermanentBackendError):
            backend.save(bad, b"x")
        with pytest.raises(PermanentBackendError):
            backend.load(bad)

    def test_concurrent_saves(self, backend):
        errors = []

        def worker(k):
            try:
                for i in range(10):
                    backend.save(f"data/{k:02d}/obj{i}", bytes([k]) * 1000)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert len(list(backend.list("data/"))) == 40
        assert backend.load("data/03/obj9") == bytes([3]) * 1000
