"""Prune's local state: an LMDB environment beside the index cache.

Holds the used-blob set of a mark phase (so memory stays flat whatever the repository
size) and the crash journals that let a second prune finish what a killed one started.
Losing it costs only a new mark phase, and leftover packs wait for the grace period.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
from typing import Callable, Iterable, Iterator

import lmdb

from kyrorepo.lmdbutil import lmdb_file_intact
from kyrorepo.repository import Repository

MARK_COMMIT_EVERY = 65536
# What a used blob was walked as: a chunk, a tree and a content list with the same plaintext
# have one id (docs/format.md, "Blob ids and types"), and each must be walked as what it is
# referenced as, whatever the id was first marked as.
WALKED_TREE = 1
WALKED_CONTENT = 2
_TIME = struct.Struct("<Q")


class PruneState:
    """Local LMDB beside the index cache: the used-blob set and crash journals.

    ``used``  blob id -> b"" or the ``WALKED_*`` flags it was walked with  (rebuilt by every run)
    ``own``   pack id -> time: packs a repack saved, not yet known to be indexed
    ``doomed`` pack id -> time: packs to remove once no index segment lists them
    ``seen``  pack id -> time an unindexed pack was first seen (grace period)
    """

    def __init__(self, path: str) -> None:
        if not lmdb_file_intact(path):
            shutil.rmtree(path, ignore_errors=True)  # a truncated LMDB file would crash the process
        os.makedirs(path, mode=0o700, exist_ok=True)
        self.env = lmdb.open(path, map_size=1 << 40, max_dbs=4, subdir=True, readahead=False)
        self.dbs = {n: self.env.open_db(n.encode()) for n in ("used", "own", "doomed", "seen")}

    @classmethod
    def for_repo(cls, repo: Repository) -> "PruneState":
        return cls(os.path.join(repo.cache_root, repo.config.repo_id, "prune"))

    def close(self) -> None:
        self.env.close()

    def clear(self, db: str) -> None:
        with self.env.begin(write=True) as txn:
            txn.drop(self.dbs[db], delete=False)

    @contextlib.contextmanager
    def adder(self) -> Iterator["UsedAdder"]:
        adder = UsedAdder(self.env, self.dbs["used"])
        try:
            yield adder
            adder.txn.commit()
        except BaseException:
            adder.txn.abort()
            raise

    @contextlib.contextmanager
    def reader(self, db: str) -> Iterator[Callable[[bytes], bytes | None]]:
        with self.env.begin(db=self.dbs[db]) as txn:
            yield lambda key: txn.get(key)

    def put(self, db: str, keys: Iterable[bytes], value: int) -> None:
        with self.env.begin(write=True, db=self.dbs[db]) as txn:
            for k in keys:
                txn.put(k, _TIME.pack(value))

    def delete(self, db: str, keys: Iterable[bytes]) -> None:
        with self.env.begin(write=True, db=self.dbs[db]) as txn:
            for k in keys:
                txn.delete(k)

    def items(self, db: str) -> dict[bytes, int]:
        with self.env.begin(db=self.dbs[db]) as txn:
            return {bytes(k): _TIME.unpack(v)[0] for k, v in txn.cursor()}


class UsedAdder:
    """Puts ids into the ``used`` set in batched write transactions."""

    def __init__(self, env: lmdb.Environment, db: lmdb._Database) -> None:
        self.env = env
        self.db = db
        self.txn = env.begin(write=True, db=db)
        self.puts = 0
        self.new = 0

    def _tick(self) -> None:
        self.puts += 1
        if self.puts % MARK_COMMIT_EVERY == 0:
            self.txn.commit()
            self.txn = self.env.begin(write=True, db=self.db)

    def add(self, bid: bytes) -> bool:
        """Add ``bid``; return whether it was not in the set yet."""
        self._tick()
        new = bool(self.txn.put(bid, b"", overwrite=False))
        self.new += new
        return new

    def walk(self, bid: bytes, flag: int) -> bool:
        """Add ``bid`` as a blob to walk as ``flag`` (``WALKED_TREE``, ``WALKED_CONTENT``); return
        whether it was not walked as one yet (it may be in the set as a chunk already)."""
        self._tick()
        old = self.txn.get(bid)
        have = old[0] if old else 0
        if have & flag:
            return False
        self.new += old is None
        self.txn.put(bid, bytes([have | flag]))
        return True
