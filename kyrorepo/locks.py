"""Repository locks: small sealed objects ``locks/<random id>``.

Shared locks (backup, restore, verify, copy) coexist; an exclusive lock (prune's delete
phase, repair) excludes every other lock. A lock records host, pid, user and time and is
refreshed while held; it is stale when not refreshed for ``STALE_AFTER`` seconds, or when
its host is this host and its process is gone. Stale locks are ignored, and removed by
``kyrorepo unlock``.
"""

from __future__ import annotations

import getpass
import os
import socket
import threading
import time
from dataclasses import dataclass

from kyrorepo.errors import LockedError

STALE_AFTER = 30 * 60
REFRESH_EVERY = 5 * 60


@dataclass(frozen=True)
class LockInfo:
    name: str
    host: str
    pid: int
    username: str
    time: int
    exclusive: bool

    def to_obj(self) -> dict:
        return {"exclusive": self.exclusive, "host": self.host, "pid": self.pid,
                "time": self.time, "username": self.username}

    @classmethod
    def from_obj(cls, name: str, d: dict) -> "LockInfo":
        return cls(name, str(d["host"]), int(d["pid"]), str(d["username"]), int(d["time"]),
                   bool(d["exclusive"]))

    def is_stale(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if now - self.time > STALE_AFTER:
            return True
        if self.host == socket.gethostname() and self.pid != os.getpid():
            return not pid_alive(self.pid)
        return False

    def describe(self) -> str:
        kind = "exclusive" if self.exclusive else "shared"
        age = int(time.time() - self.time)
        return f"{kind} lock {self.name} by {self.username}@{self.host} pid {self.pid}, refreshed {age}s ago"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def new_lock(name: str, exclusive: bool) -> LockInfo:
    return LockInfo(name, socket.gethostname(), os.getpid(), getpass.getuser(), int(time.time()), exclusive)


def conflicting(mine: LockInfo, others: list[LockInfo]) -> LockInfo | None:
    for other in others:
        if other.name == mine.name or other.is_stale():
            continue
        if mine.exclusive or other.exclusive:
            return other
    return None


def locked_error(other: LockInfo) -> LockedError:
    return LockedError(
        f"repository is locked: {other.describe()}; wait for it to finish, or if that process "
        "is gone run 'kyrorepo unlock'"
    )


class Refresher:
    """Background thread that re-saves a held lock so others do not take it as stale."""

    def __init__(self, refresh) -> None:
        self._refresh = refresh
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lock-refresh", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(REFRESH_EVERY):
            try:
                self._refresh()
            except Exception:  # a failed refresh is retried at the next tick
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
