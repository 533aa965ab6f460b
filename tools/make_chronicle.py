#!/usr/bin/env python3
"""Deterministic generator of Chronicle-format data directories (stdlib only).

Writes the database file ``<db>`` (default ``data.db``, opaque bytes), the active WAL
``<db>.wal`` and rotated segments ``<db>.wal.<YYYYMMDDTHHMMSS>`` (UTC). Frames are
``[u32 len][u32 crc32(payload)][payload]``; a payload is ``[u32 count]`` then per point
metric, tags, f64 value and i64 Unix-nanosecond timestamp. It is independent of
kyrorepo's codec on purpose, so tests cross-check the two. Format: docs/wal-codecs.md.

Frame times are controlled exactly: frame ``i`` (0-based) of a batch lands in second
``s = floor(base + i * seconds_per_frame)``; its points get nanosecond timestamps inside
that second, so the frame's time (its newest point) truncates to ``s``. ``base`` is
``--start`` or, for ``append`` without it, the previous frame's second plus
``seconds_per_frame``.

  create DIR [--db data.db] [--start UNIX] [--frames N] [--seed S]
             [--seconds-per-frame F] [--points-per-frame K]
  append DIR --frames N [--db ...] [--start UNIX] [--seconds-per-frame F] [--seed S]
             [--points-per-frame K] [--torn-tail]
  rotate DIR [--db ...]       rename <db>.wal to <db>.wal.<stamp of its last frame>
  drop-oldest DIR [--db ...]  delete the oldest rotated segment
  info DIR [--db ...]         JSON summary of the segments

Importable: ``encode_points``, ``frame_bytes``, ``write_frame``, ``create``, ``append``,
``rotate``, ``drop_oldest``, ``read_frames``, ``segments``, ``info``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import struct
import sys
import time
import zlib

DEFAULT_START = 1_700_000_000
DEFAULT_DB = "data.db"
STAMP = "%Y%m%dT%H%M%S"
METRICS = ("cpu.usage", "mem.free", "disk.io", "net.rx", "temp")
HOSTS = ("web-1", "web-2", "db-1", "cache-1")


def encode_points(points):
    """``points``: [(metric, [(tag key, tag value)], value, timestamp_ns)]."""
    out = [struct.pack("<I", len(points))]
    for metric, tags, value, ts in points:
        out.append(struct.pack("<I", len(metric.encode())) + metric.encode())
        out.append(struct.pack("<I", len(tags)))
        for k, v in tags:
            for s in (k.encode(), v.encode()):
                out.append(struct.pack("<I", len(s)) + s)
        out.append(struct.pack("<dq", value, ts))
    return b"".join(out)


def frame_bytes(payload):
    return struct.pack("<II", len(payload), zlib.crc32(payload)) + payload


def write_frame(f, payload):
    f.write(frame_bytes(payload))


def random_points(rng, second, k):
    """``k`` points whose timestamps lie inside Unix second ``second``."""
    offsets = sorted(rng.randrange(10**9) for _ in range(k))
    return [
        (
            rng.choice(METRICS),
            [("host", rng.choice(HOSTS))],
            rng.uniform(0, 100),
            second * 10**9 + off,
        )
        for off in offsets
    ]


def newest_ns(payload):
    (count,) = struct.unpack_from("<I", payload, 0)
    pos, newest = 4, None
    for _ in range(count):
        (n,) = struct.unpack_from("<I", payload, pos)
        pos += 4 + n
        (nt,) = struct.unpack_from("<I", payload, pos)
        pos += 4
        for _ in range(2 * nt):
            (n,) = struct.unpack_from("<I", payload, pos)
            pos += 4 + n
        ts = struct.unpack_from("<q", payload, pos + 8)[0]
        pos += 16
        newest = ts if newest is None else max(newest, ts)
    return newest


def read_frames(path):
    """[(offset, end, newest point ns)] of the valid frames, and the valid length."""
    with open(path, "rb") as f:
        data = f.read()
    out, off = [], 0
    while off + 8 <= len(data):
        n, crc = struct.unpack_from("<II", data, off)
        end = off + 8 + n
        if end > len(data) or n < 4 or zlib.crc32(data[off + 8 : end]) != crc:
            break
        out.append((off, end, newest_ns(data[off + 8 : end])))
        off = end
    return out, off


def segments(root, db=DEFAULT_DB):
    """Segment file names, oldest first: rotated by stamp, then the active one."""
    pat = re.compile(re.escape(db) + r"\.wal\.(\d{8}T\d{6})$")
    rotated = sorted(n for n in os.listdir(root) if pat.match(n))
    active = db + ".wal"
    return rotated + ([active] if os.path.exists(os.path.join(root, active)) else [])


def _last_second(root, db):
    for name in reversed(segments(root, db)):
        frames, _ = read_frames(os.path.join(root, name))
        for fr in reversed(frames):
            if fr[2] is not None:
                return fr[2] // 10**9, len(frames)
    return None, 0


def _frame_count(root, db):
    return sum(len(read_frames(os.path.join(root, n))[0]) for n in segments(root, db))


def _append(root, db, frames, base, spf, seed, k, torn_tail):
    rng = random.Random("%s:%s:%d" % (seed, db, _frame_count(root, db)))
    path = os.path.join(root, db + ".wal")
    valid = read_frames(path)[1] if os.path.exists(path) else 0
    with open(path, "ab") as f:
        f.truncate(valid)  # drop a torn tail, as the database does on restart
        f.seek(0, os.SEEK_END)
        for i in range(frames):
            write_frame(f, encode_points(random_points(rng, int(math.floor(base + i * spf)), k)))
        if torn_tail:
            whole = frame_bytes(encode_points(random_points(rng, int(math.floor(base)), k)))
            f.write(whole[: len(whole) // 2])


def create(
    root,
    start=DEFAULT_START,
    frames=10,
    seed=42,
    seconds_per_frame=1.0,
    points_per_frame=3,
    db=DEFAULT_DB,
):
    os.makedirs(root, exist_ok=True)
    rng = random.Random("%s:%s:db" % (seed, db))
    with open(os.path.join(root, db), "wb") as f:
        f.write(b"CHRONDB\x00" + rng.randbytes(4096))
    open(os.path.join(root, db + ".wal"), "wb").close()
    _append(root, db, frames, float(start), seconds_per_frame, seed, points_per_frame, False)
    return info(root, db)


def append(
    root,
    frames,
    start=None,
    seconds_per_frame=1.0,
    seed=42,
    points_per_frame=3,
    db=DEFAULT_DB,
    torn_tail=False,
):
    if start is None:
        last, _ = _last_second(root, db)
        base = (DEFAULT_START if last is None else last) + seconds_per_frame
    else:
        base = float(start)
    _append(root, db, frames, base, seconds_per_frame, seed, points_per_frame, torn_tail)
    return info(root, db)


def rotate(root, db=DEFAULT_DB):
    """Rename the active segment after its last frame's second (bumped while taken)."""
    active = os.path.join(root, db + ".wal")
    last, _ = _last_second(root, db)
    second = DEFAULT_START if last is None else last
    while True:
        name = "%s.wal.%s" % (db, time.strftime(STAMP, time.gmtime(second)))
        if not os.path.exists(os.path.join(root, name)):
            break
        second += 1
    os.replace(active, os.path.join(root, name))
    open(active, "wb").close()
    return name


def drop_oldest(root, db=DEFAULT_DB):
    segs = segments(root, db)
    if len(segs) < 2 or segs[0] == db + ".wal":
        return None
    os.remove(os.path.join(root, segs[0]))
    return segs[0]


def info(root, db=DEFAULT_DB):
    out = []
    for name in segments(root, db):
        frames, valid = read_frames(os.path.join(root, name))
        secs = [fr[2] // 10**9 for fr in frames if fr[2] is not None]
        out.append(
            {
                "name": name,
                "frames": len(frames),
                "valid_length": valid,
                "size": os.path.getsize(os.path.join(root, name)),
                "time": [secs[0], secs[-1]] if secs else None,
            }
        )
    return {"db": db, "segments": out}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create")
    a = sub.add_parser("append")
    for sp in (c, a):
        sp.add_argument("--seed", type=int, default=42)
        sp.add_argument("--seconds-per-frame", type=float, default=1.0)
        sp.add_argument("--points-per-frame", type=int, default=3)
    c.add_argument("--start", type=int, default=DEFAULT_START)
    c.add_argument("--frames", type=int, default=10)
    a.add_argument("--start", type=int, default=None)
    a.add_argument("--frames", type=int, required=True)
    a.add_argument("--torn-tail", action="store_true")
    for sp in (c, a) + tuple(sub.add_parser(n) for n in ("rotate", "drop-oldest", "info")):
        sp.add_argument("dir")
        sp.add_argument("--db", default=DEFAULT_DB)
    args = p.parse_args(argv)
    if args.cmd == "create":
        out = create(
            args.dir,
            args.start,
            args.frames,
            args.seed,
            args.seconds_per_frame,
            args.points_per_frame,
            args.db,
        )
    elif args.cmd == "append":
        out = append(
            args.dir,
            args.frames,
            args.start,
            args.seconds_per_frame,
            args.seed,
            args.points_per_frame,
            args.db,
            args.torn_tail,
        )
    elif args.cmd == "rotate":
        out = rotate(args.dir, args.db)
    elif args.cmd == "drop-oldest":
        out = drop_oldest(args.dir, args.db)
    else:
        out = info(args.dir, args.db)
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
