"""Blob codec: compress (zstd, stored raw when it does not shrink), then seal.

Sealed plaintext layout (docs/format.md, "Sealed blob"): compression u8 | payload, where
compression is 0 = raw, 1 = one zstd frame, 2 = dictionary id (32 bytes) then one zstd
frame made with that repository dictionary (``dicts/<id>``, also kept as
``dictcopies/<id>``). Only DATA blobs use a dictionary: file chunks are small (~39 KiB at
the default chunk size) and a dictionary trained on the repository's own data gives zstd
the context a small chunk lacks (docs/performance.md, "Compression dictionary").
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Collection, Iterable, Mapping, Sequence

import zstandard

from kyrorepo.crypto import BlobKeys
from kyrorepo.errors import IntegrityError, KyroError, ObjectNotFoundError
from kyrorepo.format import BlobType, file_header, split_file
from kyrorepo.ids import ID_LEN, is_full_hex

COMP_RAW = 0
COMP_ZSTD = 1
COMP_ZSTD_DICT = 2
MAX_BLOB = 64 * 1024 * 1024
DICT_DIR = "dicts"
DICT_COPY_DIR = "dictcopies"  # the second copy of every dictionary (Dictionaries)
DICT_DIRS = (DICT_DIR, DICT_COPY_DIR)
# zstd levels 1 and 2 use its "fast" strategy at every source size: the only levels where
# literals may stay raw (LiteralCoding).
FAST_LEVELS = (1, 2)


def plain_compressor(level: int, raw_literals: bool = False) -> zstandard.ZstdCompressor:
    """A compressor of frames at ``level`` (with their content size), optionally with
    ``raw_literals`` (only on ``FAST_LEVELS``: see ``LiteralCoding``)."""
    if not raw_literals:
        return zstandard.ZstdCompressor(level=level, write_content_size=True)
    assert level in FAST_LEVELS
    return zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters(
        compression_level=level, target_length=1, write_content_size=1))


def dictionary_compressor(dictionary: bytes, level: int, raw_literals: bool = False) -> zstandard.ZstdCompressor:
    """A compressor of frames made with zstd ``dictionary`` (the raw ZDICT bytes) at ``level``,
    with the level's own parameters for the dictionary's size, optionally with ``raw_literals``
    (only on ``FAST_LEVELS``). Frames carry their content size and no dictionary id
    (docs/format.md, "Plaintext body"); any zstd decoder given the dictionary reads them."""
    assert not raw_literals or level in FAST_LEVELS
    params = zstandard.ZstdCompressionParameters.from_level(level, dict_size=len(dictionary),
                                                            **({"target_length": 1} if raw_literals else {}))
    zdict = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_FULLDICT)
    zdict.precompute_compress(compression_params=params)  # the compressor copies these tables per frame
    return zstandard.ZstdCompressor(dict_data=zdict, write_content_size=True, write_dict_id=False)


# Literal coding (LiteralCoding): probe the first batches, then one in every 4 (~4 MiB each)
LITERALS_FIRST_PROBES = 4
LITERALS_PROBE_EVERY = 4
LITERALS_MIN_GAIN = 0.005  # coding must make the probed frames at least 0.5% smaller to stay on
LITERALS_DECAY = 0.75  # weight of the earlier probes at each new one


class LiteralCoding:
    """Whether a codec's batches of chunks Huffman-code the literals of their zstd frames.

    Literals are the bytes no match covers. zstd codes them only when that makes them at least
    ~1.6% smaller, but it tries on every block (a histogram and a Huffman table), at about a
    sixth of level 2's time. On data whose literals are random-looking (the benchmark's rows
    once the dictionary has taken their structure; hashes, ids, encrypted or compressed
    values) it tries in vain; zstd's fast strategy skips the try when asked for a sampling
    distance of 1 (``target_length``), which changes nothing else about the frames.

    So the first ``LITERALS_FIRST_PROBES`` batches, then one batch in every
    ``LITERALS_PROBE_EVERY``, compress their largest chunk both ways, and the literals stay raw
    only while coding them saves less than ``LITERALS_MIN_GAIN`` over the recent probes
    (decayed sums). It starts coded, needs all first probes to go raw and comes back as soon
    as coding pays again. Frames made either way are ordinary zstd frames: readers do not know.
    One object serves all the threads of a codec."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batches = 0
        self._probes = 0
        self._coded = 0.0  # decayed sum of the probed frames' sizes with literals coded
        self._raw = 0.0  # and with literals raw
        self.raw = False

    def probe_due(self) -> bool:
        with self._lock:
            n = self._batches
            self._batches += 1
        return n < LITERALS_FIRST_PROBES or n % LITERALS_PROBE_EVERY == 0

    def record(self, coded: int, raw: int) -> None:
        """One probe: the sizes of one chunk's frame with its literals coded and raw."""
        with self._lock:
            self._coded = self._coded * LITERALS_DECAY + coded
            self._raw = self._raw * LITERALS_DECAY + raw
            self._probes += 1
            self.raw = self._probes >= LITERALS_FIRST_PROBES and self._coded > self._raw * (1 - LITERALS_MIN_GAIN)


def _id_mismatch(what: str) -> IntegrityError:
    return IntegrityError(f"{what}: content does not match its id")


def codec_for(backend: object, keys: BlobKeys, level: int) -> "BlobCodec":
    """The codec of a repository opened on ``backend``: what ``Repository`` uses, and what a
    worker process that reopened the backend itself must use to open the same blobs."""
    return BlobCodec(keys, level, Dictionaries(backend, keys))


class Dictionaries:
    """A repository's zstd dictionaries: loaded when first needed, kept.

    Each is stored twice, ``dicts/<id>`` and ``dictcopies/<id>``, each object sealed on its
    own: every chunk compressed with a dictionary needs it, so one damaged 64 KiB object
    must not make them all unreadable. Readers take the first of the two that opens.
    New DATA blobs use the dictionary with the lowest id (two first backups on different
    hosts may each have trained one; every writer then settles on the same one). A blob
    names its dictionary, so every dictionary ever used stays readable. Thread-safe.
    """

    def __init__(self, backend: object, keys: BlobKeys) -> None:
        self._backend = backend
        self._plain = BlobCodec(keys, 19)  # opens and seals the dictionary objects themselves
        self._lock = threading.Lock()
        self._data: dict[bytes, bytes] = {}
        self._current: bytes | None = None
        self._listed: frozenset[str] | None = None  # the objects current() found

    def objects(self) -> frozenset[str]:
        """The names of the objects both directories hold (one listing of each)."""
        return frozenset(n for d in DICT_DIRS for n, _ in self._backend.list(d + "/"))  # type: ignore[attr-defined]

    def ids(self) -> list[bytes]:
        """Every dictionary either directory holds, in id order (names that are not ids are left out)."""
        return _ids_named(self.objects())

    def current(self) -> bytes | None:
        """Id of the dictionary new DATA blobs use, or None when the repository has none."""
        if self._listed is None:
            with self._lock:
                if self._listed is None:
                    listed = self.objects()
                    ids = _ids_named(listed)
                    self._current = ids[0] if ids else None
                    self._listed = listed
        return self._current

    def open_object(self, path: str, did: bytes) -> bytes:
        """The dictionary stored at ``path`` (one of ``dictionary_paths(did)``), checked against its
        id. Raises ObjectNotFoundError, or IntegrityError saying why, starting with ``path``."""
        return self._open(path, did, self._backend.load(path))  # type: ignore[attr-defined]

    def _open(self, path: str, did: bytes, stored: bytes) -> bytes:
        return self._plain.decode(BlobType.DICT, did, split_file(stored, BlobType.DICT, path), path)

    def check(self, did: bytes) -> tuple[bytes | None, dict[str, KyroError]]:
        """Open both of dictionary ``did``'s objects: (its plaintext, or None when neither
        opens; the error of each object that does not, by path: ObjectNotFoundError or
        IntegrityError)."""
        raw: bytes | None = None
        failed: dict[str, KyroError] = {}
        for path in dictionary_paths(did):
            try:
                raw = self.open_object(path, did)
            except (ObjectNotFoundError, IntegrityError) as exc:
                failed[path] = exc
        return raw, failed

    def intact(self, did: bytes) -> tuple[bytes, bytes]:
        """(stored object, plaintext) of the first of dictionary ``did``'s two objects that opens;
        IntegrityError names both when neither does."""
        if self._backend is None:
            raise IntegrityError(f"a blob needs dictionary {DICT_DIR}/{did.hex()}, which only a repository has")
        errors = []
        for path in dictionary_paths(did):
            try:
                stored = self._backend.load(path)  # type: ignore[attr-defined]
                return stored, self._open(path, did, stored)
            except ObjectNotFoundError:
                errors.append(f"{path} is missing")
            except IntegrityError as exc:
                errors.append(exc.message)
        raise IntegrityError(f"dictionary {errors[0]}, and its copy {errors[1]}: the chunks compressed with it "
                             "cannot be opened; copy it back from a related repository")

    def data(self, did: bytes) -> bytes:
        """The dictionary ``did``, loaded, opened and checked against its id on first use: from
        ``dicts/<id>``, or from its copy when that object is missing or damaged."""
        raw = self._data.get(did)
        if raw is None:
            raw = self.intact(did)[1]
            with self._lock:
                self._data[did] = raw
        return raw

    def sealed(self, did: bytes, raw: bytes) -> bytes:
        """Dictionary ``did`` (its plaintext ``raw``) as a stored object: freshly sealed."""
        return file_header(BlobType.DICT) + self._plain.encode(BlobType.DICT, did, raw)

    def add(self, raw: bytes) -> bytes:
        """Store a new dictionary (both objects, durably, before any blob uses it); return its id."""
        present = self.current()
        did = self._plain.keys.blob_id(raw)
        for path in reversed(dictionary_paths(did)):  # the copy first: once dicts/<id> exists, so does it
            self._backend.save(path, self.sealed(did, raw))  # type: ignore[attr-defined]
        with self._lock:
            self._data[did] = raw
            self._current = did if present is None else min(did, present)
            self._stored(dictionary_paths(did))
        return did

    def _stored(self, paths: Iterable[str]) -> None:
        """Count ``paths`` as listed from now on; the caller holds the lock."""
        self._listed = (self._listed or frozenset()) | frozenset(paths)

    def complete(self, did: bytes) -> list[str]:
        """Store whichever of dictionary ``did``'s two objects is missing (a repository from
        before the copies, or a writer killed between the two saves), from the other;
        return the paths written. A damaged object is left to 'repair index'. Missing means
        absent from the listing ``current()`` made: no request per object."""
        self.current()
        assert self._listed is not None
        written = missing_objects(did, self._listed)
        for path in written:
            self._backend.save(path, self.sealed(did, self.data(did)))  # type: ignore[attr-defined]
        with self._lock:
            self._stored(written)
        return written


def dictionary_paths(did: bytes) -> tuple[str, str]:
    """Where dictionary ``did`` is stored: ``dicts/<id>``, and its copy."""
    return f"{DICT_DIR}/{did.hex()}", f"{DICT_COPY_DIR}/{did.hex()}"


def _ids_named(names: Iterable[str]) -> list[bytes]:
    """The dictionary ids among object names ``<dir>/<id>``, in id order (names that are not
    ids are left out)."""
    return sorted({bytes.fromhex(h) for h in (n.rsplit("/", 1)[1] for n in names) if is_full_hex(h)})


def missing_objects(did: bytes, listed: Collection[str]) -> list[str]:
    """The paths of dictionary ``did``'s two objects that are not in ``listed`` (the names
    ``Dictionaries.objects`` returned), the copy first (the order a writer stores them in)."""
    return [path for path in reversed(dictionary_paths(did)) if path not in listed]


class BlobCodec:
    def __init__(self, keys: BlobKeys, level: int = 3, dicts: Dictionaries | None = None) -> None:
        self.keys = keys
        self.level = level
        self.dicts = dicts
        self.literals = LiteralCoding() if level in FAST_LEVELS else None
        self._local = threading.local()

    def _compressors(self) -> dict[tuple[bytes | None, bool], zstandard.ZstdCompressor]:
        """This thread's compressors (zstd contexts are not shared), by (dictionary id or None,
        raw literals)."""
        cache = getattr(self._local, "zc", None)
        if cache is None:
            cache = self._local.zc = {}
        return cache  # type: ignore[no-any-return]

    def _zd(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "zd", None)
        if d is None:
            d = self._local.zd = zstandard.ZstdDecompressor()
        return d

    def _dict_zd(self, did: bytes, what: str) -> zstandard.ZstdDecompressor:
        cache = getattr(self._local, "dzd", None)
        if cache is None:
            cache = self._local.dzd = {}
        d = cache.get(did)
        if d is None:
            if self.dicts is None:
                raise IntegrityError(f"{what} was compressed with a dictionary, which only a repository has")
            zdict = zstandard.ZstdCompressionDict(self.dicts.data(did), dict_type=zstandard.DICT_TYPE_FULLDICT)
            d = cache[did] = zstandard.ZstdDecompressor(dict_data=zdict)
        return d

    def encode(self, btype: BlobType, bid: bytes, data: bytes | memoryview) -> bytes:
        """Return the sealed blob for ``data`` (whose id ``bid`` the caller computed).

        zstd releases the GIL while it compresses, so several threads encode in parallel.
        """
        if self.level <= 0 or not len(data):
            return self.keys.seal(btype, bid, b"".join((b"\x00", data)))
        did, zc = self._compressor(btype, False)
        return self._seal_smaller(btype, bid, data, did, zc.compress(data))

    def encode_many(self, btype: BlobType, items: list[tuple[bytes, bytes]]) -> list[bytes]:
        """``encode`` of each (id, data) in ``items``: the same sealed blobs, but zstd compresses
        the whole list in one call, which gives the GIL up once instead of once per chunk (every
        hand-back of the GIL waits for the other threads of the pipeline). The frames code
        their literals or not as ``self.literals`` decides, and some batches probe for it."""
        if self.level <= 0 or len(items) < 2 or not all(len(d) for _, d in items):
            return [self.encode(btype, bid, d) for bid, d in items]
        literals = self.literals
        raw = literals is not None and literals.raw
        did, zc = self._compressor(btype, raw)
        packed = zc.multi_compress_to_buffer([d for _, d in items], threads=1)
        if literals is not None and literals.probe_due():  # the largest chunk, the other way too
            i = max(range(len(items)), key=lambda k: len(items[k][1]))
            this, other = len(packed[i]), len(self._compressor(btype, not raw)[1].compress(items[i][1]))
            literals.record(coded=other if raw else this, raw=this if raw else other)
        return [self._seal_smaller(btype, bid, data, did, memoryview(packed[i]))  # type: ignore[arg-type]
                for i, (bid, data) in enumerate(items)]  # a BufferSegment is a buffer

    def _compressor(self, btype: BlobType, raw_literals: bool) -> tuple[bytes | None, zstandard.ZstdCompressor]:
        """The dictionary new blobs of ``btype`` are compressed with (DATA only; None: none) and
        this thread's compressor for it, with literals coded or ``raw_literals``."""
        did = self.dicts.current() if btype == BlobType.DATA and self.dicts is not None else None
        cache = self._compressors()
        c = cache.get((did, raw_literals))
        if c is None:
            if did is None:
                c = plain_compressor(self.level, raw_literals)
            else:
                assert self.dicts is not None
                c = dictionary_compressor(self.dicts.data(did), self.level, raw_literals)
            cache[(did, raw_literals)] = c
        return did, c

    def _seal_smaller(self, btype: BlobType, bid: bytes, data: bytes | memoryview, did: bytes | None,
                      frame: bytes | memoryview) -> bytes:
        """Seal ``data`` as its zstd ``frame`` (compressed with dictionary ``did``, or none) when that
        body is smaller, else raw (docs/format.md, "Plaintext body")."""
        if did is not None and len(frame) + ID_LEN < len(data):
            return self.keys.seal(btype, bid, b"".join((b"\x02", did, frame)))
        if did is None and len(frame) < len(data):
            return self.keys.seal(btype, bid, b"".join((b"\x01", frame)))
        return self.keys.seal(btype, bid, b"".join((b"\x00", data)))

    def decode(self, btype: BlobType, bid: bytes, sealed: bytes | memoryview, what: str, check_id: bool = True) -> bytes:
        """Open, decompress and (by default) re-hash a sealed blob."""
        return self._plaintext(bid, self.keys.open(btype, bid, sealed, what), what, check_id)

    def _plaintext(self, bid: bytes, body: bytes, what: str, check_id: bool) -> bytes:
        """The plaintext of an opened blob's body (decompressed, re-hashed when ``check_id``)."""
        did = self._frame_dict(body)
        if did is None:
            return self._raw(bid, body, what, check_id)
        data = self._decompress_with(did, memoryview(body)[1 + len(did):], what)
        return self._checked(bid, data, what) if check_id else data

    def open_many(self, btype: BlobType, items: Iterable[tuple[bytes, bytes | memoryview]],
                  what: Callable[[int], str], types: Mapping[int, BlobType] | None = None) -> list[bytes]:
        """``decode(btype, id, sealed, what(i), check_id=False)`` of each (id, sealed blob) in ``items``,
        in order, raising the first blob's error: restore's loop (its files are checked against
        their digests instead). ``what(i)`` names item ``i`` and is called only for a blob that
        fails; each dictionary's decompressor is looked up once per call. ``types``: item ->
        the type an item was sealed as when not ``btype`` (docs/format.md, "Blob ids and types")."""
        open_ = self.keys.open
        zds: dict[bytes, zstandard.ZstdDecompressor] = {}
        out: list[bytes] = []
        for i, (bid, sealed) in enumerate(items):
            sealed_as = types.get(i, btype) if types else btype
            try:
                body = open_(sealed_as, bid, sealed, "")
            except IntegrityError:
                body = open_(sealed_as, bid, sealed, what(i))  # fails again, with the name
            did = self._frame_dict(body)
            if did is None:
                if body and body[0] == COMP_RAW:
                    out.append(body[1:])
                    continue
            else:
                zd = zds.get(did)
                if zd is None and (not did or self.dicts is not None):  # (its errors name the dictionary)
                    zd = zds[did] = self._dict_zd(did, "") if did else self._zd()
                if zd is not None:
                    with contextlib.suppress(zstandard.ZstdError):  # else decoded again below, for its error
                        out.append(zd.decompress(memoryview(body)[1 + len(did):], max_output_size=MAX_BLOB))
                        continue
            out.append(self._plaintext(bid, body, what(i), False))
        return out

    def decode_many(self, btype: BlobType, items: Sequence[tuple[bytes, bytes | memoryview]],
                    what: Callable[[int], str]) -> list[bytes | IntegrityError]:
        """``decode`` of each (id, sealed blob) in ``items``: the plaintext, or the IntegrityError
        that blob raises (``what(i)`` names item ``i`` in it; it is called only for a blob that
        fails, the uncommon case).

        One zstd call per blob. One ``multi_decompress_to_buffer`` call per batch gave the GIL
        up once instead of once per blob, but it sets a decompression context up per call and
        hands back one shared buffer; a verify worker runs two threads, and without it the full
        check of 1 GiB took 3.10 s instead of 3.35 s (4.75 instead of 5.08 user-s, 6 alternated
        runs each)."""
        out: list[bytes | IntegrityError] = []
        decode = self.decode
        for i, (bid, sealed) in enumerate(items):
            try:
                out.append(decode(btype, bid, sealed, ""))
            except IntegrityError:
                try:
                    out.append(decode(btype, bid, sealed, what(i)))  # fails again, with the name
                except IntegrityError as exc:
                    out.append(exc)
        return out

    @staticmethod
    def _frame_dict(body: bytes) -> bytes | None:
        """For a body that holds a zstd frame: the id of its dictionary (b"" for none); else None."""
        kind = body[0] if body else -1
        if kind == COMP_ZSTD:
            return b""
        if kind == COMP_ZSTD_DICT and len(body) >= 1 + ID_LEN:
            return bytes(body[1:1 + ID_LEN])
        return None

    def _raw(self, bid: bytes, body: bytes, what: str, check_id: bool) -> bytes:
        """The plaintext of a body that holds no zstd frame: a raw one, else the error that names
        what is wrong with it."""
        if not body:
            raise IntegrityError(f"{what}: empty plaintext")
        kind = body[0]
        if kind == COMP_RAW:
            return self._checked(bid, body[1:], what) if check_id else body[1:]
        if kind == COMP_ZSTD_DICT:
            raise IntegrityError(f"{what}: dictionary-compressed body is truncated")
        raise IntegrityError(f"{what}: unknown compression type {kind}")

    def _checked(self, bid: bytes, data: bytes, what: str) -> bytes:
        if self.keys.blob_id(data) != bid:
            raise _id_mismatch(what)
        return data

    def _decompress_with(self, did: bytes, frame: memoryview, what: str) -> bytes:
        return self._decompress(self._dict_zd(did, what) if did else self._zd(), frame, what)

    @staticmethod
    def _decompress(zd: zstandard.ZstdDecompressor, frame: memoryview, what: str) -> bytes:
        try:
            return zd.decompress(frame, max_output_size=MAX_BLOB)  # type: ignore[no-any-return]
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"{what}: compressed data is damaged ({exc})") from None
