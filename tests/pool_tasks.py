"""Tasks for tests of kyrorepo.procpool, importable by its worker processes (the tests put
this directory on their PYTHONPATH)."""

from __future__ import annotations

import time
from typing import Any


def echo_after(ctx: Any, arg: tuple[float, str]) -> str:
    time.sleep(arg[0])
    return arg[1]


def environ(ctx: Any, name: str) -> str | None:
    import os

    return os.environ.get(name)
