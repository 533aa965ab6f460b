"""The CLI's lazily loaded command table matches what the command modules register."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import click

import kyrorepo.cli
from kyrorepo.cli.main import COMMANDS


def test_command_table_is_complete():
    seen: dict[str, str] = {}
    for info in pkgutil.iter_modules(kyrorepo.cli.__path__):
        if not info.name.endswith("_cmds"):
            continue
        group = click.Group()
        importlib.import_module(f"kyrorepo.cli.{info.name}").register(group)
        for name in group.commands:
            seen[name] = info.name
    assert seen == COMMANDS


def test_help_lists_every_command_and_a_command_loads_only_its_module():
    out = subprocess.run([sys.executable, "-m", "kyrorepo", "--help"], capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert f"  {name} " in out or f"  {name}\n" in out
    probe = ("import sys; from kyrorepo.cli.main import main; main(['list', '--help']); "
             "print(sorted(m for m in sys.modules if m.startswith(('kyrorepo.cli.', 'kyrorepo.prune', 'rich', 'boto3', 'paramiko'))))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "kyrorepo.cli.list_cmds" in loaded
    for other in ("kyrorepo.cli.prune_cmds", "kyrorepo.cli.wal_cmds", "kyrorepo.prune", "rich", "boto3", "paramiko"):
        assert f"'{other}" not in loaded
