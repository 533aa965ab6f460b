"""Train a repository's zstd dictionary from the data of its first sizeable backup.

A file chunk is ~39 KiB at the default chunk size; zstd compressing it alone starts with
an empty window every time, while restic's 1 MiB chunks give it 25 times more context.
A 64 KiB dictionary trained on samples of the repository's own data gives that context
back (on the database-like benchmark data: 0.81 → 0.71 of the input at the same speed,
docs/performance.md "Compression dictionary").

Training happens once per repository, at the start of the first backup whose source
holds at least ``MIN_SOURCE_BYTES``: ``SAMPLES`` chunk-sized samples are read at evenly
spaced positions across the source's files (stratified by bytes, so big table files
weigh as much as they count), a dictionary is trained on most of them with fixed
fastcover parameters (~50 ms), and kept only when it makes the held-out samples at least
``MIN_GAIN`` smaller. It is stored twice (``dicts/<id>`` and ``dictcopies/<id>``, sealed)
before any blob uses it; a backup writes whichever of the two its dictionary lacks.
Data that does not benefit (already compressed, random) gets no dictionary; a backup of
the same repository from this machine tries again after ``RETRY_AFTER`` (the time of the
failed attempt is kept in the local cache), so that a repository of incompressible data
does not pay for sampling on every backup.
"""

from __future__ import annotations

import os
import stat
import time

import zstandard

from kyrorepo.blob import dictionary_compressor
from kyrorepo.repository import Repository

DICT_SIZE = 64 * 1024
SAMPLES = 80  # read; the last HELD_OUT judge the dictionary
HELD_OUT = 16
MIN_SOURCE_BYTES = 8 * 1024 * 1024
MAX_SCAN = 20_000  # directory entries looked at to find the files to sample
MIN_GAIN = 0.03
MIN_SAMPLE = 1024
# fastcover with fixed parameters: the optimising search (k=d=0) takes seconds, these
# ~50 ms for 2.5 MiB of samples, and measured within 0.5% of it on database pages
FASTCOVER_K = 200
FASTCOVER_D = 8
RETRY_AFTER = 24 * 3600  # seconds between training attempts that found no gain


def _files(root: str) -> list[tuple[str, int]]:
    """Regular files under ``root`` (at most ``MAX_SCAN`` entries looked at), with sizes."""
    out: list[tuple[str, int]] = []
    seen = 0
    stack = [root]
    while stack and seen < MAX_SCAN:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for e in sorted(entries, key=lambda e: e.name):
            seen += 1
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append(e.path)
            elif stat.S_ISREG(st.st_mode) and st.st_size > 0:
                out.append((e.path, st.st_size))
    return out


def read_samples(root: str, size: int, count: int = SAMPLES) -> list[bytes | bytearray | memoryview]:
    """``count`` samples of ``size`` bytes at evenly spaced positions across the files' bytes.

    Returns no samples when the files hold less than ``MIN_SOURCE_BYTES`` together."""
    files = _files(root)
    total = sum(n for _, n in files)
    if total < MIN_SOURCE_BYTES:
        return []
    samples: list[bytes | bytearray | memoryview] = []
    fi, base = 0, 0  # file index, byte position where files[fi] starts
    for i in range(count):
        pos = (2 * i + 1) * total // (2 * count)
        while base + files[fi][1] <= pos:
            base += files[fi][1]
            fi += 1
        path, length = files[fi]
        offset = min(pos - base, max(0, length - size))
        try:
            with open(path, "rb") as f:
                data = os.pread(f.fileno(), size, offset)
        except OSError:
            continue  # vanished or unreadable: the backup itself will say so
        if len(data) >= MIN_SAMPLE:
            samples.append(data)
    return samples


def train(samples: list[bytes | bytearray | memoryview], level: int) -> bytes | None:
    """A dictionary trained on ``samples``, or None when it would not pay for itself."""
    if len(samples) < HELD_OUT * 2:
        return None
    training, held_out = samples[:-HELD_OUT], samples[-HELD_OUT:]
    try:
        zdict = zstandard.train_dictionary(DICT_SIZE, training, k=FASTCOVER_K, d=FASTCOVER_D)
    except zstandard.ZstdError:
        return None  # too little or too random data to learn from
    plain = zstandard.ZstdCompressor(level=level)
    with_dict = dictionary_compressor(zdict.as_bytes(), level)
    without = sum(min(len(plain.compress(s)), len(s)) for s in held_out)
    using = sum(min(len(with_dict.compress(s)) + 32, len(s)) for s in held_out)
    if using > without * (1 - MIN_GAIN):
        return None
    return zdict.as_bytes()  # type: ignore[no-any-return]


def _attempt_marker(repo: Repository) -> str:
    return os.path.join(repo.cache_root, repo.config.repo_id, "dictionary-attempt")


def _recently_failed(repo: Repository) -> bool:
    try:
        return time.time() - os.stat(_attempt_marker(repo)).st_mtime < RETRY_AFTER
    except OSError:
        return False


def _remember_failure(repo: Repository) -> None:
    path = _attempt_marker(repo)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w"):
            pass
        os.utime(path)
    except OSError:
        pass  # only an optimisation: the next backup samples again


def ensure_dictionary(repo: Repository, root: str) -> bytes | None:
    """Make sure ``repo`` has a dictionary, training one from ``root`` when it has none.

    Returns the id of the dictionary new chunks will use (None: none yet)."""
    dicts = repo.codec.dicts
    if dicts is None or repo.config.compression_level <= 0:
        return None
    current = dicts.current()
    if current is not None:
        dicts.complete(current)  # a repository from before the second copies gets one here
        return current
    if _recently_failed(repo):
        return None
    samples = read_samples(root, repo.config.chunker_avg)
    if not samples:
        return None  # too little data to learn from yet: not a failed attempt
    raw = train(samples, repo.config.compression_level)
    if raw is None:
        _remember_failure(repo)
        return None
    return dicts.add(raw)
