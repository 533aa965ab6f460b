import os
import stat

import pytest

from backend_conformance import BackendConformance
from kyrorepo.backends import LocalBackend, MemoryBackend


class TestMemoryBackend(BackendConformance):
    @pytest.fixture
    def backend(self):
        return MemoryBackend()


class TestLocalBackend(BackendConformance):
    @pytest.fixture
    def backend(self, tmp_path):
        return LocalBackend(str(tmp_path / "repo"))

    def test_owner_only_permissions(self, backend):
        backend.save("data/ab/x", b"secret")
        path = os.path.join(backend.root, "data", "ab", "x")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700

    def test_temp_files_not_listed(self, backend):
        backend.save("data/ab/x", b"1")
        with open(os.path.join(backend.root, "data", "ab", ".tmp-dead"), "wb") as f:
            f.write(b"partial")
        assert [n for n, _ in backend.list("data/")] == ["data/ab/x"]
