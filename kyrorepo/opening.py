"""What opening a repository needs before its heavier modules load: the default cache
directory, and the master key, unlocked on a thread.

Stretching the passphrase (Argon2id, ~0.2 s here) releases the GIL, and a command spends
about as long importing what it needs (LMDB, zstd, the chunker, the command's own code).
``Unlocking`` derives the key on a thread while the caller imports; this module itself
imports only the key and backend modules, so nothing heavy is loaded before it starts.
"""

from __future__ import annotations

import os
import threading

from kyrorepo.backends.base import Backend
from kyrorepo.crypto import MasterKey
from kyrorepo.errors import (
    IntegrityError,
    NoRepositoryError,
    ObjectNotFoundError,
    WrongPasswordError,
)
from kyrorepo.keys import open_key_file


def default_cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kyrorepo")


def repository_exists(backend: Backend) -> bool:
    try:
        backend.stat("config")
        return True
    except ObjectNotFoundError:
        return False


def unlock_master(backend: Backend, password: bytes) -> MasterKey:
    """Try every key object; raise WrongPasswordError when none opens."""
    if not repository_exists(backend):
        raise NoRepositoryError(
            f"no kyrorepo repository at {backend.describe()}: check --repo, or create one with 'kyrorepo init'"
        )
    key_names = sorted(n for n, _ in backend.list("keys/"))
    if not key_names:
        raise IntegrityError(f"repository at {backend.describe()} has no key objects: restore keys/ from a copy")
    damaged: list[IntegrityError] = []
    for name in key_names:
        key_id = name.split("/", 1)[1]
        try:
            return open_key_file(backend.load(name), key_id, password)
        except WrongPasswordError:
            continue
        except IntegrityError as exc:
            damaged.append(exc)
    if damaged and len(damaged) == len(key_names):
        raise damaged[0]
    raise WrongPasswordError(f"wrong passphrase for the repository at {backend.describe()}: no key object opens with it")


class Unlocking:
    """``unlock_master(backend, password)`` running on a thread from construction on.

    The backend is the thread's until ``master()`` or ``wait()`` returns: the caller must
    not use it before. ``master()`` returns the key or raises what ``unlock_master`` raised.
    """

    def __init__(self, backend: Backend, password: bytes) -> None:
        self._backend = backend
        self._password = password
        self._master: MasterKey | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kyrorepo-unlock", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._master = unlock_master(self._backend, self._password)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by master()
            self._error = exc

    def wait(self) -> None:
        """Wait for the thread (after which the backend may be closed), whatever it gave."""
        self._thread.join()

    def master(self) -> MasterKey:
        self.wait()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        assert self._master is not None
        return self._master
