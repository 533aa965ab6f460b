"""Structure checks: everything verify checks without reading pack bodies.

Key objects parse; every index segment decodes and is loaded into the work index; every
indexed pack exists with the size the index records (packs no segment lists are a note);
every pack's trailer (its tail only) lists every blob the index claims for it; the local
index cache says what the readable segments say. The backups' trees are checked by
``verify_backups``. See docs/integrity.md, "Levels" and "The local cache".
"""

from __future__ import annotations

import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import lmdb

from kyrorepo.audit_log import DamageNote
from kyrorepo.blob import Dictionaries, dictionary_paths
from kyrorepo.errors import IntegrityError, KyroError, NotFoundError, ObjectNotFoundError
from kyrorepo.format import BlobType, PackEntry
from kyrorepo.ids import from_hex
from kyrorepo.keys import parse_key_file
from kyrorepo.pack import pack_name
from kyrorepo.repository import Repository
from kyrorepo.verify_data import bounded_map, pack_id_from_name, read_trailer
from kyrorepo.verify_index import WorkIndex, union_entries
from kyrorepo.verify_report import DamageLedger, reason_of


def check_keys(repo: Repository, ledger: DamageLedger) -> None:
    ids = repo.key_ids()
    ledger.report.keys = len(ids)
    for kid in ids:
        what = f"key object keys/{kid}"
        try:
            parse_key_file(repo.backend.load(f"keys/{kid}"), kid)
        except ObjectNotFoundError:
            continue
        except IntegrityError as exc:
            ledger.add_damage(what, reason_of(exc, what))


def check_dictionaries(repo: Repository, notices: list[str], ledger: DamageLedger) -> None:
    """Read both stored objects of every compression dictionary back and check them against its id.

    A dictionary neither of whose objects opens makes every chunk compressed with it
    unreadable (the full scan then lists each one): this names the cause in every verify,
    for the price of a few 64 KiB reads. One damaged object is damage that 'repair index'
    mends from the other. One missing object is a notice: a repository from before the
    second copies, or a writer killed between the two saves (the next backup that uses the
    dictionary, or 'repair index', stores it).
    """
    fresh = Dictionaries(repo.backend, repo.keys)  # not the codec's: read what storage holds now
    ids: set[bytes] = set()
    for name in sorted(fresh.objects()):
        try:
            ids.add(from_hex(name.rsplit("/", 1)[1]))
        except ValueError:
            ledger.add_damage(f"dictionary {name}", "has a malformed name")
    stored_once = 0
    for did in sorted(ids):
        paths = dictionary_paths(did)
        failed = fresh.check(did)[1]
        if len(failed) == 2:
            primary, copy = (failed[p] for p in paths)
            ledger.add_damage(f"dictionary {paths[0]}", f"{_dict_reason(primary, paths[0])}, and its copy {paths[1]} "
                              f"{_dict_reason(copy, paths[1])}: the chunks compressed with it cannot be opened; "
                              "restore it from a copy of the repository")
        elif failed:
            (path, err), = failed.items()
            twin = paths[1] if path == paths[0] else paths[0]
            if isinstance(err, ObjectNotFoundError):
                stored_once += 1
            else:
                ledger.add_damage(f"dictionary {path}", f"{_dict_reason(err, path)}: its other copy {twin} is intact, "
                                  "nothing is lost: run 'kyrorepo repair index'", index_level=True)
    if ids:
        notices.append(f"{len(ids)} compression dictionar{'y' if len(ids) == 1 else 'ies'} checked")
    if stored_once:
        notices.append(f"{stored_once} compression dictionar{'y is' if stored_once == 1 else 'ies are'} stored once, "
                       "without the second copy (a repository from before the copies, or a backup killed "
                       "between the two saves): the next backup or 'kyrorepo repair index' stores it")


def _dict_reason(exc: KyroError, path: str) -> str:
    return "is missing" if isinstance(exc, ObjectNotFoundError) else reason_of(exc, path)


def list_packs(repo: Repository, work: WorkIndex, notices: list[str]) -> None:
    """Record the ``data/`` listing."""
    for name, size in repo.backend.list("data/"):
        pid = pack_id_from_name(name)
        if pid is None:
            notices.append(f"{name} is not a pack name: ignored")
        else:
            work.put_size(work.listed, pid, size)


def load_segments(repo: Repository, work: WorkIndex, ledger: DamageLedger) -> list[str]:
    """Load every readable index segment into the work index; return their names."""
    good: list[str] = []
    for name in repo.object_names(BlobType.INDEX):
        what = f"index segment index/{name}"
        try:
            packs = repo.load_index_segment(name)
        except NotFoundError:
            continue  # removed meanwhile
        except IntegrityError as exc:
            ledger.add_damage(what, reason_of(exc, f"index/{name}") + ": run 'kyrorepo repair index'",
                              index_level=True)
            continue
        seg = bytes.fromhex(name)
        for p in packs:
            work.add_pack(seg, p)
        good.append(name)
    ledger.report.index_segments = len(good)
    return good


def check_presence(work: WorkIndex, ledger: DamageLedger) -> None:
    """Every indexed pack exists with its recorded size; note packs no segment lists."""
    report = ledger.report
    for pid, lengths in work.iter_listed_lengths():  # the entries are decoded only for damage
        report.packs += 1
        obj = f"pack {pack_name(pid)}"
        size = work.size(work.listed, pid)
        if size is None:
            listings = work.listings(pid)
            segs = ", ".join(f"index/{s.hex()[:16]}" for s, _, _ in listings)
            ledger.add_damage(obj, f"is missing (listed by index segment {segs}): restore it from a copy",
                              [e.id for e in union_entries(listings)])
            continue
        wrong = [n for n in lengths if n != size]
        if wrong:
            ledger.add_damage(obj, f"has {size} bytes, the index says {wrong[0]}: it is truncated or damaged",
                              [e.id for e in union_entries(work.listings(pid))])
            continue
        report.pack_bytes += size
        work.put_size(work.ok_packs, pid, size)
    count = nbytes = 0
    for pid, size in work.sizes(work.listed):
        if not work.has_prefix(work.listing, pid):
            count += 1
            nbytes += size
    if count:
        report.unindexed_packs = count
        report.notices.append(
            f"{count} pack(s) ({nbytes} bytes) are listed by no index segment (left by an interrupted backup "
            "or 'repair snapshots', or their index was lost): if backups need them 'kyrorepo repair index' "
            "indexes them, else prune removes them")


def compare_listings(work: WorkIndex, pid: bytes, trailer: frozenset[PackEntry]) -> list[DamageNote]:
    """The index may omit blobs of a pack (repair drops damaged ones), never claim others."""
    notes: list[DamageNote] = []
    for seg, _, entries in work.listings(pid):
        extra = [e for e in entries if e not in trailer]
        if extra:
            notes.append((b"", f"index segment index/{seg.hex()}",
                          f"lists {len(extra)} blob(s) of pack {pack_name(pid)} that its trailer does not "
                          f"(first {extra[0].id.hex()[:16]}): run 'kyrorepo repair index'"))
    return notes


def check_trailers(repo: Repository, work: WorkIndex, ledger: DamageLedger, pool: ThreadPoolExecutor,
                   scope: Iterable[tuple[bytes, int]], window: int) -> None:
    """Read the trailer (the tail) of every pack in ``scope`` and compare it with the index."""
    for (pid, _), result in bounded_map(pool, lambda job: read_trailer(repo, *job), scope, window):
        name = pack_name(pid)
        if isinstance(result, KyroError):
            ledger.add_damage(f"pack {name}", f"trailer cannot be read ({reason_of(result, name)}): its blobs "
                              "stay readable through the index; restore the pack from a copy of the repository")
        else:
            for note in compare_listings(work, pid, frozenset(result)):
                ledger.add_note(note)


def check_cache(repo: Repository, work: WorkIndex, good_segments: list[str], notices: list[str]) -> None:
    """The local index cache must say what the readable segments say; rebuild it if not."""
    try:
        same = work.holds_exactly(repo.cache.iter_records())  # the same layout: compared undecoded
        if not same:
            repo.cache.clear_index()
    except (lmdb.Error, ValueError, struct.error):
        same = False
        repo.reset_cache()
    if not same:
        notices.append(f"the local index cache in {repo.cache.path} did not match the index "
                       "segments: rebuilt from them (it is only a cache, nothing was lost)")
    repo.cache.sync(set(good_segments), repo.load_index_segment)
