"""Local filesystem backend.

Atomic save: write to a unique temporary file in the target directory, fsync it,
rename it over the name, fsync the directory. Large objects are written and read with
direct I/O when the file system allows it (kyrorepo.directio). Files are created 0600 and
directories 0700. Temporary files start with ``.tmp-`` and are never listed; a
killed writer leaves at most such a file behind, which ``list`` ignores.
"""

from __future__ import annotations

import errno
import os
import secrets
from dataclasses import dataclass
from typing import Iterator

from kyrorepo import directio
from kyrorepo.backends.base import validate_name, validate_prefix
from kyrorepo.errors import ObjectNotFoundError, PermanentBackendError, TransientBackendError

_TMP_PREFIX = ".tmp-"
_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT, errno.EIO}


def _classify(exc: OSError, what: str) -> Exception:
    if isinstance(exc, FileNotFoundError):
        return ObjectNotFoundError(f"{what}: not found")
    if exc.errno in _TRANSIENT_ERRNOS:
        return TransientBackendError(f"{what}: {exc.strerror}")
    return PermanentBackendError(f"{what}: {exc.strerror or exc}")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class LocalSpec:
    """How a worker process reopens a local repository: its root (picklable, no open state)."""

    root: str

    def open(self) -> "LocalBackend":
        return LocalBackend(self.root)


class LocalBackend:
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def reopen_spec(self) -> LocalSpec:
        """What another process needs to open this backend itself (kyrorepo.procpool)."""
        return LocalSpec(self.root)

    def _path(self, name: str) -> str:
        return os.path.join(self.root, *validate_name(name).split("/"))

    def _makedirs(self, path: str) -> None:
        """Create ``path`` and missing parents 0700, fsyncing each parent that changed."""
        if os.path.isdir(path):
            return
        parent = os.path.dirname(path)
        self._makedirs(parent)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            return
        fsync_dir(parent)

    def save(self, name: str, data: bytes | memoryview) -> None:
        path = self._path(name)
        directory = os.path.dirname(path)
        tmp = os.path.join(directory, _TMP_PREFIX + secrets.token_hex(8))
        try:
            self._makedirs(directory)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                directio.write_file(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            fsync_dir(directory)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise _classify(exc, f"saving {name} in {self.root}") from exc

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(name)
        try:
            if length is None or length >= directio.MIN_DIRECT:
                data = directio.pread(path, offset, os.stat(path).st_size - offset if length is None else length)
                if data is not None:
                    return data
            with open(path, "rb") as f:
                if offset:
                    f.seek(offset)
                return f.read() if length is None else f.read(length)
        except OSError as exc:
            raise _classify(exc, f"loading {name} from {self.root}") from exc

    def load_view(self, name: str, offset: int, length: int) -> memoryview:
        """``load``'s range, left in this thread's read buffer (``directio.read_view``): valid until
        the thread's next ``load_view``."""
        try:
            return directio.read_view(self._path(name), offset, length)
        except OSError as exc:
            raise _classify(exc, f"loading {name} from {self.root}") from exc

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        validate_prefix(prefix)
        # Walk only the directory the prefix lies in, not the whole repository.
        base_dir = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = os.path.join(self.root, *base_dir.split("/")) if base_dir else self.root
        if not os.path.isdir(start):
            return
        for dirpath, dirnames, filenames in os.walk(start):
            rel_dir = os.path.relpath(dirpath, self.root)
            rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
            dirnames[:] = [
                d for d in dirnames if (rel_dir + d + "/").startswith(prefix)
                or prefix.startswith(rel_dir + d + "/")
            ]
            for fn in filenames:
                if fn.startswith(_TMP_PREFIX):
                    continue
                name = rel_dir + fn
                if not name.startswith(prefix):
                    continue
                try:
                    size = os.stat(os.path.join(dirpath, fn)).st_size
                except FileNotFoundError:
                    continue
                yield name, size

    def stat(self, name: str) -> int:
        try:
            return os.stat(self._path(name)).st_size
        except OSError as exc:
            raise _classify(exc, f"stat of {name} in {self.root}") from exc

    def remove(self, name: str) -> None:
        path = self._path(name)
        try:
            os.unlink(path)
        except OSError as exc:
            raise _classify(exc, f"removing {name} from {self.root}") from exc
        try:
            fsync_dir(os.path.dirname(path))
        except OSError:
            pass

    def describe(self) -> str:
        return self.root

    def close(self) -> None:
        pass
