"""Fill a kyrorepo repository with N bytes of synthetic data, quickly, through the library.

The blobs are distinct pseudo-random 64 KiB blocks (BLAKE3 output, so nothing dedups or
compresses), stored raw, sealed and packed by the ordinary writer, listed by the index
like any other blobs, and referenced by one snapshot of one large file
(source ``bench-prefill``), so that the repository is a valid one of that size.
"""

from __future__ import annotations

import os
import socket
import stat
import time

import blake3

from kyrorepo.backends.local import LocalBackend
from kyrorepo.blob import BlobCodec
from kyrorepo.format import BlobType
from kyrorepo.repository import Repository
from kyrorepo.snapshot import Snapshot, save_snapshot
from kyrorepo.tree import DIR, FILE, ContentListBuilder, Node, encode_tree

BLOB_SIZE = 64 * 1024
SOURCE = "bench-prefill"


def prefill(repo_path: str, cache_root: str, password: bytes, nbytes: int) -> int:
    """Add about ``nbytes`` of new data under one snapshot; return the number of data blobs."""
    count = nbytes // BLOB_SIZE
    if count == 0:
        return 0
    repo = Repository.open(LocalBackend(repo_path), password, cache_root)
    try:
        with repo.lock():
            repo.sync_index()
            raw = BlobCodec(repo.keys, 0)
            seed = os.urandom(32)
            digest = repo.keys.hasher()
            content = ContentListBuilder(lambda d: repo.add_blob(BlobType.CONTENT, d)[0])
            with repo.writer.background_uploads():
                for i in range(count):
                    data = blake3.blake3(seed + i.to_bytes(8, "little")).digest(length=BLOB_SIZE)
                    bid = repo.keys.blob_id(data)
                    repo.writer.add_sealed(BlobType.DATA, bid, raw.encode(BlobType.DATA, bid, data), len(data))
                    digest.update(data)
                    content.add((bid, len(data)))
                chunks, root_list = content.finish()
                now = int(time.time())
                node = Node(name=b"prefill.bin", type=FILE, mode=0o600, mtime_ns=now * 10**9,
                            size=count * BLOB_SIZE, digest=digest.digest(), chunks=chunks, content=root_list)
                tree, _ = repo.add_blob(BlobType.TREE, encode_tree([node]))
                repo.flush()
            root = Node(name=b"", type=DIR, mode=stat.S_IMODE(0o700), mtime_ns=now * 10**9, subtree=tree)
            save_snapshot(repo, Snapshot(time=now, end_time=now, host=socket.gethostname(), username="bench",
                                         source=SOURCE, data_dir="/prefill", root=root, kind="full",
                                         stats={"logical_bytes": count * BLOB_SIZE}, program="bench.prefill"))
    finally:
        repo.close()
    return count
