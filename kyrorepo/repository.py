"""The repository: the one place that composes backend, keys, config, packs and index.

Layout (docs/format.md): ``config``, ``keys/<id>``, ``data/<2 hex>/<pack id>``,
``index/<id>``, ``snapshots/<id>``, ``walcaps/<id>``, ``locks/<id>``.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import time
from dataclasses import dataclass
from typing import Any, Iterator

import lmdb

from kyrorepo.backends.base import Backend
from kyrorepo.blob import DICT_DIR, BlobCodec, codec_for
from kyrorepo.chunker import DEFAULT_AVG, Chunker, ChunkerParams
from kyrorepo.crypto import BlobKeys, MasterKey
from kyrorepo.errors import (
    IntegrityError,
    NoRepositoryError,
    NotFoundError,
    ObjectNotFoundError,
    RepositoryExistsError,
    UsageError,
)
from kyrorepo.format import (
    FORMAT_VERSION,
    BlobType,
    PackEntry,
    PackInfo,
    check_version,
    decode_index,
    encode_index,
    file_header,
    split_file,
)
from kyrorepo.ids import ID_LEN, from_hex, is_hex_prefix
from kyrorepo.index import BlobLocation, IndexCache, open_cache
from kyrorepo.keys import KdfParams, make_key_file
from kyrorepo.locks import LockInfo, Refresher, conflicting, locked_error, new_lock
from kyrorepo.opening import repository_exists, unlock_master
from kyrorepo.pack import pack_name, read_trailer
from kyrorepo.tree import packb, unpackb
from kyrorepo.writer import BlobWriter

DEFAULT_PACK_SIZE = 16 * 1024 * 1024
DEFAULT_COMPRESSION = 2  # with a dictionary, level 2 stores less than level 3 without (docs/performance.md)
CONFIG_ID = bytes(ID_LEN)
OBJECT_DIRS = {BlobType.SNAPSHOT: "snapshots", BlobType.INDEX: "index", BlobType.WALCAP: "walcaps", BlobType.DICT: DICT_DIR}


@dataclass(frozen=True)
class RepoConfig:
    repo_id: str
    version: int
    created: int
    chunker_avg: int
    compression_level: int
    pack_size: int

    def to_obj(self) -> dict[str, Any]:
        return {
            "aead": "aes-256-gcm/blake3-salted-key",
            "chunker": {"algorithm": "fastcdc2020", "avg_size": self.chunker_avg,
                        "min_size": self.chunker_avg // 4, "max_size": self.chunker_avg * 4,
                        "normalization": 1},
            "compression": {"algorithm": "zstd", "level": self.compression_level},
            "created": self.created,
            "id": self.repo_id,
            "id_algorithm": "blake3-keyed",
            "pack_size": self.pack_size,
            "version": self.version,
        }

    @classmethod
    def from_obj(cls, d: dict[str, Any]) -> "RepoConfig":
        try:
            check_version(int(d["version"]), "repository config")
            return cls(str(d["id"]), int(d["version"]), int(d["created"]),
                       int(d["chunker"]["avg_size"]), int(d["compression"]["level"]),
                       int(d["pack_size"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"repository config is malformed ({exc})") from None


class Repository:
    def __init__(self, backend: Backend, master: MasterKey, config: RepoConfig, cache_root: str) -> None:
        self.backend = backend
        self.master = master
        self.config = config
        self.keys: BlobKeys = master.keys()
        self.codec = codec_for(backend, self.keys, config.compression_level)
        self.chunker = Chunker(ChunkerParams.for_average(config.chunker_avg, self.keys.chunker_seed))
        self.cache_root = cache_root
        self.cache: IndexCache = open_cache(cache_root, config.repo_id)
        self.writer = BlobWriter(self.codec, self.cache, config.pack_size, self._save_pack, self._save_index)
        self._synced = False

    # --- opening -----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        backend: Backend,
        password: bytes,
        cache_root: str,
        chunk_size: int = DEFAULT_AVG,
        compression_level: int = DEFAULT_COMPRESSION,
        pack_size: int = DEFAULT_PACK_SIZE,
        kdf: KdfParams = KdfParams(),
        master: MasterKey | None = None,
    ) -> "Repository":
        if repository_exists(backend):
            raise RepositoryExistsError(f"a repository already exists at {backend.describe()}: use it, or choose an empty location")
        if not 0 <= compression_level <= 22:
            raise UsageError(f"compression level {compression_level} is outside 0..22")
        if pack_size < 1024 * 1024:
            raise UsageError(f"pack size {pack_size} is below the minimum of 1 MiB")
        master = master or MasterKey.generate()
        ChunkerParams.for_average(chunk_size, 0)
        config = RepoConfig(secrets.token_hex(16), FORMAT_VERSION, int(time.time()), chunk_size,
                            compression_level, pack_size)
        key_id = secrets.token_hex(32)
        backend.save(f"keys/{key_id}", make_key_file(master, password, key_id, kdf))
        keys = master.keys()
        codec = BlobCodec(keys, 19)
        sealed = codec.encode(BlobType.CONFIG, CONFIG_ID, packb(config.to_obj()))
        backend.save("config", file_header(BlobType.CONFIG) + sealed)
        return cls(backend, master, config, cache_root)

    @classmethod
    def open(cls, backend: Backend, password: bytes, cache_root: str) -> "Repository":
        return cls.unlocked(backend, unlock_master(backend, password), cache_root)

    @classmethod
    def unlocked(cls, backend: Backend, master: MasterKey, cache_root: str) -> "Repository":
        """Open with a master key already unlocked (``kyrorepo.opening``)."""
        return cls(backend, master, read_config(backend, master), cache_root)

    def close(self) -> None:
        self.cache.close()
        self.backend.close()

    def reset_cache(self) -> None:
        """Throw the local index cache away (files cache included) and open an empty one."""
        path = self.cache.path
        with contextlib.suppress(lmdb.Error):
            self.cache.close()
        shutil.rmtree(path, ignore_errors=True)
        self.cache = open_cache(self.cache_root, self.config.repo_id)
        self.writer.cache = self.cache
        self._synced = False

    # --- keys -----------------------------------------------------------------------------

    def add_key(self, password: bytes, kdf: KdfParams = KdfParams()) -> str:
        key_id = secrets.token_hex(32)
        self.backend.save(f"keys/{key_id}", make_key_file(self.master, password, key_id, kdf))
        return key_id

    def key_ids(self) -> list[str]:
        return sorted(n.split("/", 1)[1] for n, _ in self.backend.list("keys/"))

    # --- index ----------------------------------------------------------------------------

    def sync_index(self, force: bool = False) -> int:
        """Bring the LMDB cache in line with the repository's index segments."""
        if self._synced and not force:
            return 0
        names = {n.split("/", 1)[1] for n, _ in self.backend.list("index/")}
        loaded = self.cache.sync(names, self.load_index_segment)
        self._synced = True
        return loaded

    def load_index_segment(self, name: str) -> list[PackInfo]:
        plain = self.load_object(BlobType.INDEX, name)
        return list(decode_index(plain, f"index segment index/{name}"))

    def _save_index(self, packs: list[PackInfo]) -> str:
        return self.save_object(BlobType.INDEX, encode_index(packs))

    def _save_pack(self, pack_id: bytes, data: bytes | memoryview) -> None:
        self.backend.save(pack_name(pack_id), data)

    def lookup(self, bid: bytes) -> BlobLocation | None:
        return self.cache.lookup(bid)

    # --- blobs ----------------------------------------------------------------------------

    def add_blob(self, btype: BlobType, data: bytes) -> tuple[bytes, bool]:
        return self.writer.add(btype, data)

    def has_blob(self, bid: bytes) -> bool:
        return self.writer.known(bid)

    def flush(self) -> None:
        self.writer.flush()

    def load_blob(self, bid: bytes, btype: BlobType | None = None) -> bytes:
        """The plaintext of blob ``bid``, referenced as a ``btype`` blob. It is opened as the type
        it was stored as, which may differ: a data chunk, a tree and a content list with the same
        plaintext have the same id and are stored once (docs/format.md, "Blob ids and types")."""
        loc = self.cache.lookup(bid)
        kind = f"{btype.name.lower()} blob" if btype is not None else "blob"
        if loc is None:
            raise IntegrityError(
                f"{kind} {bid.hex()[:16]} is not in the index: run 'kyrorepo repair index', then 'kyrorepo verify'"
            )
        what = f"{kind} {bid.hex()[:16]} in pack {loc.pack_id.hex()[:16]}"
        try:
            sealed = self.backend.load(pack_name(loc.pack_id), loc.offset, loc.length)
        except ObjectNotFoundError:
            raise IntegrityError(f"{what}: pack {pack_name(loc.pack_id)} is missing") from None
        if len(sealed) != loc.length:
            raise IntegrityError(f"{what}: pack is truncated")
        return self.codec.decode(loc.type, bid, sealed, what)

    def open_sealed(self, entry: PackEntry, sealed: bytes, what: str) -> bytes:
        return self.codec.decode(entry.type, entry.id, sealed, what)

    def pack_trailer(self, pack_id: bytes, pack_length: int | None = None) -> tuple[PackEntry, ...]:
        name = pack_name(pack_id)
        length = self.backend.stat(name) if pack_length is None else pack_length
        return read_trailer(self.codec, length, lambda off, n: self.backend.load(name, off, n), name)

    # --- standalone objects (snapshots, index segments, WAL captures) ---------------------

    def save_object(self, btype: BlobType, plain: bytes) -> str:
        bid = self.keys.blob_id(plain)
        name = bid.hex()
        self.backend.save(f"{OBJECT_DIRS[btype]}/{name}", file_header(btype) + self.codec.encode(btype, bid, plain))
        return name

    def load_object(self, btype: BlobType, name: str) -> bytes:
        path = f"{OBJECT_DIRS[btype]}/{name}"
        try:
            bid = from_hex(name)
        except ValueError:
            raise IntegrityError(f"object {path} has a malformed name") from None
        try:
            data = self.backend.load(path)
        except ObjectNotFoundError:
            raise NotFoundError(f"object {path} not found") from None
        return self.codec.decode(btype, bid, split_file(data, btype, path), path)

    def object_names(self, btype: BlobType) -> list[str]:
        prefix = OBJECT_DIRS[btype] + "/"
        return sorted(n[len(prefix):] for n, _ in self.backend.list(prefix))

    def remove_object(self, btype: BlobType, name: str) -> None:
        self.backend.remove(f"{OBJECT_DIRS[btype]}/{name}")

    def resolve_object(self, btype: BlobType, prefix: str, what: str) -> str:
        """Full name of the object whose hex name starts with ``prefix``."""
        prefix = prefix.lower()
        if not is_hex_prefix(prefix):
            raise UsageError(f"{what} id {prefix!r} is not a hex id or prefix")
        matches = [n for n in self.object_names(btype) if n.startswith(prefix)]
        if not matches:
            raise NotFoundError(f"{what} {prefix} not found: run 'kyrorepo list' to see the ids")
        if len(matches) > 1:
            raise UsageError(f"{what} id prefix {prefix} is ambiguous ({len(matches)} match): give more digits")
        return matches[0]

    # --- locks ----------------------------------------------------------------------------

    def list_locks(self) -> list[LockInfo]:
        out = []
        for name, _ in self.backend.list("locks/"):
            lock_name = name.split("/", 1)[1]
            try:
                plain = self._load_lock(lock_name)
                out.append(LockInfo.from_obj(lock_name, unpackb(plain, name)))
            except (ObjectNotFoundError, NotFoundError):
                continue  # released meanwhile
            except (IntegrityError, KeyError, TypeError, ValueError):
                out.append(LockInfo(lock_name, "?", 0, "?", 0, True))  # unreadable: treat as stale
        return out

    def _lock_id(self, name: str) -> bytes:
        return from_hex(name)

    def _save_lock(self, info: LockInfo) -> None:
        bid = self._lock_id(info.name)
        sealed = self.codec.encode(BlobType.LOCK, bid, packb(info.to_obj()))
        self.backend.save(f"locks/{info.name}", file_header(BlobType.LOCK) + sealed)

    def _load_lock(self, name: str) -> bytes:
        data = self.backend.load(f"locks/{name}")
        return self.codec.decode(BlobType.LOCK, self._lock_id(name), split_file(data, BlobType.LOCK, name),
                                 f"lock {name}", check_id=False)

    @contextlib.contextmanager
    def lock(self, exclusive: bool = False) -> Iterator[LockInfo]:
        mine = new_lock(secrets.token_hex(32), exclusive)
        other = conflicting(mine, self.list_locks())
        if other is not None:
            raise locked_error(other)
        self._save_lock(mine)
        other = conflicting(mine, self.list_locks())
        if other is not None:
            self.backend.remove(f"locks/{mine.name}")
            raise locked_error(other)
        refresher = Refresher(lambda: self._save_lock(new_lock(mine.name, exclusive)))
        try:
            yield mine
        finally:
            refresher.stop()
            with contextlib.suppress(ObjectNotFoundError):
                self.backend.remove(f"locks/{mine.name}")

    def remove_stale_locks(self, all_locks: bool = False) -> list[LockInfo]:
        removed = []
        for info in self.list_locks():
            if all_locks or info.is_stale():
                with contextlib.suppress(ObjectNotFoundError):
                    self.backend.remove(f"locks/{info.name}")
                removed.append(info)
        return removed


def read_config(backend: Backend, master: MasterKey) -> RepoConfig:
    try:
        data = backend.load("config")
    except ObjectNotFoundError:
        raise NoRepositoryError(f"no kyrorepo repository at {backend.describe()}") from None
    codec = BlobCodec(master.keys())
    plain = codec.decode(BlobType.CONFIG, CONFIG_ID, split_file(data, BlobType.CONFIG, "config"),
                         "repository config", check_id=False)
    obj = unpackb(plain, "repository config")
    return RepoConfig.from_obj(obj)
