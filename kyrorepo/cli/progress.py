"""Progress bars (rich) on stderr when it is a terminal; nothing otherwise.

rich is imported only when a bar is shown: it is 70 ms of start-up that scripted and
scheduled runs (stderr not a terminal) would otherwise pay on every command.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from kyrorepo.cli.common import STATE, stderr_is_tty

Callback = Callable[[int, int], None]


@contextlib.contextmanager
def byte_progress(label: str, total_bytes: int | None) -> Iterator[Callback | None]:
    """Yield a (bytes delta, files delta) callback, or None when no bar is shown."""
    if STATE["json"] or not stderr_is_tty():
        yield None
        return
    from rich.console import Console  # here, not at the top: see the module docstring
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TextColumn("{task.fields[files]} files"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(label, total=total_bytes, files=0)
        counts = {"files": 0}

        def update(nbytes: int, nfiles: int) -> None:
            counts["files"] += nfiles
            progress.update(task, advance=nbytes, files=counts["files"])

        yield update
