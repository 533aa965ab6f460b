"""``python -m bench {compare,scale,chunksize}``: see bench/__init__.py."""

from __future__ import annotations

import argparse
import sys

from bench import chunksize, compare, scale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    compare.add_arguments(sub.add_parser("compare", help="kyrorepo vs restic vs borg on the same data"))
    scale.add_arguments(sub.add_parser("scale", help="kyrorepo's phases against repositories holding N GiB"))
    chunksize.add_arguments(sub.add_parser("chunksize", help="stored bytes after a mutation vs throughput per chunk size"))
    args = parser.parse_args(argv)
    module = {"compare": compare, "scale": scale, "chunksize": chunksize}[args.command]
    return module.run(args)


if __name__ == "__main__":
    sys.exit(main())
