"""Salts of sealed blobs: drawn from the OS in batches, never repeated, not even across a fork.

A repeated salt repeats a blob's AES-GCM key and nonce, so a forked child (worker
processes) must not hand out the salts its parent had drawn but not used yet.
"""

from __future__ import annotations

import os

from kyrorepo.crypto import SALT_LEN, MasterKey
from kyrorepo.format import BlobType

KEYS = MasterKey.generate().keys()


def salts(n: int) -> list[bytes]:
    return [KEYS.seal(BlobType.DATA, bytes(32), b"x")[:SALT_LEN] for _ in range(n)]


def test_salts_do_not_repeat_across_batches():
    drawn = salts(3000)
    assert len(set(drawn)) == len(drawn)


def test_a_forked_child_does_not_reuse_the_parents_salts():
    salts(1)  # the parent now holds a batch it has barely used
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.write(write_end, b"".join(salts(100)))
        os._exit(0)
    os.close(write_end)
    child = b""
    while chunk := os.read(read_end, 65536):
        child += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    parent = set(salts(100))
    from_child = {child[i:i + SALT_LEN] for i in range(0, len(child), SALT_LEN)}
    assert len(from_child) == 100 and not parent & from_child
