#!/usr/bin/env python3
"""Deterministic generator of KyroDB-format data directories (stdlib only).

Writes what KyroDB writes: ``MANIFEST`` (JSON), ``snapshot_<micros>.snap`` (opaque) and
``wal_<micros>.wal`` segments (4-byte magic, frames ``[u32 len][bincode payload][u32
crc32]``, the payload ending in ``seq_no u64, timestamp u64``). It is independent of
kyrorepo's codec on purpose, so tests cross-check the two. Format: docs/wal-codecs.md.

Frame times are controlled exactly: frame ``i`` (0-based) of a batch gets
``floor(base + i * seconds_per_frame)`` where ``base`` is ``--start`` or, for ``append``
without ``--start``, the previous frame's time plus ``seconds_per_frame``.

  create DIR [--start UNIX] [--frames N] [--seed S] [--seconds-per-frame F]
             [--frames-per-segment K] [--dim D] [--no-snapshot]
  append DIR --frames N [--start UNIX] [--seconds-per-frame F] [--seed S] [--torn-tail]
  rotate DIR            start a new, empty segment
  snapshot DIR          write a snapshot of everything so far and point MANIFEST at it
  drop-oldest DIR       delete the oldest segment (as KyroDB does after a snapshot)
  info DIR              JSON summary: segments with their seq_no and time ranges

Importable: ``encode_payload``, ``frame_bytes``, ``write_frame``, ``create``, ``append``,
``rotate``, ``snapshot``, ``drop_oldest``, ``read_frames``, ``info``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import struct
import sys
import zlib

MAGIC = struct.pack("<I", 0x57414C00)
DEFAULT_START = 1_700_000_000
OPS = (0, 1, 2)  # insert, update, delete
WORDS = ("red", "green", "blue", "alpha", "beta", "gamma", "doc", "img", "txt", "κόσμε")


def encode_payload(op, doc_id, embedding, metadata, seq_no, timestamp):
    """bincode 1 of {op u32, doc_id u64, embedding Vec<f32>, metadata HashMap<String,
    String>, seq_no u64, timestamp u64}; ``metadata`` is a list of (key, value)."""
    out = [struct.pack("<IQQ", op, doc_id, len(embedding))]
    out.append(struct.pack("<%df" % len(embedding), *embedding))
    out.append(struct.pack("<Q", len(metadata)))
    for k, v in metadata:
        for s in (k.encode(), v.encode()):
            out.append(struct.pack("<Q", len(s)) + s)
    out.append(struct.pack("<QQ", seq_no, timestamp))
    return b"".join(out)


def frame_bytes(payload):
    return struct.pack("<I", len(payload)) + payload + struct.pack("<I", zlib.crc32(payload))


def write_frame(f, payload):
    f.write(frame_bytes(payload))


def random_payload(rng, seq_no, timestamp, dim=4):
    meta = [("k%d" % j, rng.choice(WORDS)) for j in range(rng.randrange(3))]
    emb = [rng.uniform(-1.0, 1.0) for _ in range(dim)]
    return encode_payload(rng.choice(OPS), rng.randrange(1, 10**6), emb, meta, seq_no, timestamp)


def read_frames(path):
    """[(offset, end, seq_no, timestamp)] of the valid frames, and the valid length."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != MAGIC:
        return [], 0
    out, off = [], 4
    while off + 4 <= len(data):
        (n,) = struct.unpack_from("<I", data, off)
        end = off + 8 + n
        if end > len(data) or n < 16:
            break
        payload = data[off + 4 : off + 4 + n]
        if struct.unpack_from("<I", data, off + 4 + n)[0] != zlib.crc32(payload):
            break
        seq, ts = struct.unpack_from("<QQ", payload, n - 16)
        out.append((off, end, seq, ts))
        off = end
    return out, off


def read_manifest(root):
    with open(os.path.join(root, "MANIFEST"), "rb") as f:
        return json.loads(f.read())


def write_manifest(root, m):
    tmp = os.path.join(root, "MANIFEST.tmp")
    with open(tmp, "w") as f:
        json.dump(m, f, indent=2)
    os.replace(tmp, os.path.join(root, "MANIFEST"))


def _micros(name):
    return int(name.split("_", 1)[1].split(".", 1)[0])


def _last(root, m):
    """(seq_no, timestamp) of the newest frame, else (snapshot seq, last_updated)."""
    for name in reversed(m["wal_segments"]):
        frames, _ = read_frames(os.path.join(root, name))
        if frames:
            return frames[-1][2], frames[-1][3]
    return m["latest_snapshot_wal_seq"], m["last_updated"]


def _new_segment(root, m, micros):
    if m["wal_segments"]:
        micros = max(micros, _micros(m["wal_segments"][-1]) + 1)
    name = "wal_%d.wal" % micros
    with open(os.path.join(root, name), "wb") as f:
        f.write(MAGIC)
    m["wal_segments"].append(name)
    return name


def _write_snapshot(root, m, seq, micros, seed):
    if m.get("latest_snapshot"):
        micros = max(micros, _micros(m["latest_snapshot"]) + 1)
    name = "snapshot_%d.snap" % micros
    rng = random.Random("%s:snap:%d" % (seed, seq))
    with open(os.path.join(root, name), "wb") as f:
        f.write(b"KYROSNAP" + struct.pack("<Q", seq) + rng.randbytes(2048))
    m["latest_snapshot"], m["latest_snapshot_wal_seq"] = name, seq
    return name


def _append(root, m, frames, base, spf, seed, frames_per_segment, dim, torn_tail):
    seq, last_ts = _last(root, m)
    rng = random.Random("%s:%d" % (seed, seq + 1))
    if not m["wal_segments"]:
        _new_segment(root, m, int(math.floor(base)) * 1_000_000)
    path = os.path.join(root, m["wal_segments"][-1])
    existing, valid = read_frames(path)
    in_seg = len(existing)
    f = open(path, "r+b")
    try:
        f.truncate(max(valid, 4))  # drop a torn tail, as KyroDB does on restart
        f.seek(0, os.SEEK_END)
        for i in range(frames):
            ts = int(math.floor(base + i * spf))
            if frames_per_segment and in_seg >= frames_per_segment:
                f.close()
                f = open(os.path.join(root, _new_segment(root, m, ts * 1_000_000)), "ab")
                in_seg = 0
            seq += 1
            write_frame(f, random_payload(rng, seq, ts, dim))
            in_seg += 1
            last_ts = ts
        if torn_tail:
            whole = frame_bytes(random_payload(rng, seq + 1, last_ts, dim))
            f.write(whole[: len(whole) // 2])
    finally:
        f.close()
    m["version"] += 1
    m["last_updated"] = last_ts
    write_manifest(root, m)


def create(
    root,
    start=DEFAULT_START,
    frames=10,
    seed=42,
    seconds_per_frame=1.0,
    frames_per_segment=0,
    dim=4,
    with_snapshot=True,
):
    """A fresh data directory: snapshot at ``start`` (seq 0), then ``frames`` frames."""
    os.makedirs(root, exist_ok=True)
    m = {
        "version": 1,
        "latest_snapshot": None,
        "latest_snapshot_wal_seq": 0,
        "wal_segments": [],
        "last_updated": start,
    }
    if with_snapshot:
        _write_snapshot(root, m, 0, start * 1_000_000, seed)
    _new_segment(root, m, start * 1_000_000)
    _append(root, m, frames, float(start), seconds_per_frame, seed, frames_per_segment, dim, False)
    return read_manifest(root)


def append(
    root,
    frames,
    start=None,
    seconds_per_frame=1.0,
    seed=42,
    frames_per_segment=0,
    dim=4,
    torn_tail=False,
):
    m = read_manifest(root)
    base = float(start) if start is not None else _last(root, m)[1] + seconds_per_frame
    _append(root, m, frames, base, seconds_per_frame, seed, frames_per_segment, dim, torn_tail)
    return read_manifest(root)


def rotate(root):
    m = read_manifest(root)
    _, ts = _last(root, m)
    name = _new_segment(root, m, ts * 1_000_000 + 1)
    m["version"] += 1
    write_manifest(root, m)
    return name


def snapshot(root, seed=42, keep_old=False):
    m = read_manifest(root)
    seq, ts = _last(root, m)
    old = m.get("latest_snapshot")
    name = _write_snapshot(root, m, seq, ts * 1_000_000 + 500_000, seed)
    if old and not keep_old and old != name:
        os.remove(os.path.join(root, old))
    m["version"] += 1
    write_manifest(root, m)
    return name


def drop_oldest(root):
    m = read_manifest(root)
    if not m["wal_segments"]:
        return None
    name = m["wal_segments"].pop(0)
    os.remove(os.path.join(root, name))
    m["version"] += 1
    write_manifest(root, m)
    return name


def info(root):
    m = read_manifest(root)
    segs = []
    for name in m["wal_segments"]:
        frames, valid = read_frames(os.path.join(root, name))
        segs.append(
            {
                "name": name,
                "frames": len(frames),
                "valid_length": valid,
                "size": os.path.getsize(os.path.join(root, name)),
                "seq": [frames[0][2], frames[-1][2]] if frames else None,
                "time": [frames[0][3], frames[-1][3]] if frames else None,
            }
        )
    return {"manifest": m, "segments": segs}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create")
    a = sub.add_parser("append")
    for sp in (c, a):
        sp.add_argument("dir")
        sp.add_argument("--seed", type=int, default=42)
        sp.add_argument("--seconds-per-frame", type=float, default=1.0)
        sp.add_argument("--frames-per-segment", type=int, default=0)
        sp.add_argument("--dim", type=int, default=4)
    c.add_argument("--start", type=int, default=DEFAULT_START)
    c.add_argument("--frames", type=int, default=10)
    c.add_argument("--no-snapshot", action="store_true")
    a.add_argument("--start", type=int, default=None)
    a.add_argument("--frames", type=int, required=True)
    a.add_argument("--torn-tail", action="store_true")
    for name in ("rotate", "snapshot", "drop-oldest", "info"):
        sub.add_parser(name).add_argument("dir")
    args = p.parse_args(argv)
    if args.cmd == "create":
        out = create(
            args.dir,
            args.start,
            args.frames,
            args.seed,
            args.seconds_per_frame,
            args.frames_per_segment,
            args.dim,
            not args.no_snapshot,
        )
    elif args.cmd == "append":
        out = append(
            args.dir,
            args.frames,
            args.start,
            args.seconds_per_frame,
            args.seed,
            args.frames_per_segment,
            args.dim,
            args.torn_tail,
        )
    elif args.cmd == "rotate":
        out = rotate(args.dir)
    elif args.cmd == "snapshot":
        out = snapshot(args.dir)
    elif args.cmd == "drop-oldest":
        out = drop_oldest(args.dir)
    else:
        out = info(args.dir)
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
