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


# Commands run often or by scripts (an archive command runs wal-push once per WAL file):
# their modules import the repository's modules only once the passphrase is being
# stretched on a thread (kyrorepo.opening, RepoOptions.open), so that the two overlap.
QUICK_STARTS = ("backup", "create-full", "create-incremental", "restore", "list", "snapshots", "ls",
                "wal-push", "wal-fetch", "restore-pitr", "pitr-window", "verify")


def test_often_run_commands_parse_their_arguments_before_the_repository_modules_load():
    probe = ("import sys; from kyrorepo.cli.main import main; "
             f"[main([c, '--help']) for c in {QUICK_STARTS!r}]; "
             "print(sorted(m for m in sys.modules if m.startswith('kyrorepo.')))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    for module in ("kyrorepo.cli.backup_cmds", "kyrorepo.cli.restore_cmds", "kyrorepo.cli.wal_cmds",
                   "kyrorepo.cli.verify_cmds", "kyrorepo.opening"):
        assert f"'{module}'" in loaded
    for heavy in ("kyrorepo.repository", "kyrorepo.index", "kyrorepo.backup", "kyrorepo.restore", "kyrorepo.snapshot",
                  "kyrorepo.walcapture", "kyrorepo.pitr", "kyrorepo.procpool", "kyrorepo.verify", "kyrorepo.repair"):
        assert f"'{heavy}'" not in loaded


def test_worker_task_modules_named_for_prestart_are_those_of_the_task_functions():
    from kyrorepo import procpool
    from kyrorepo.restore_worker import write_range, write_segment
    from kyrorepo.verify_pack import scan_pack

    assert procpool.RESTORE_TASKS == write_range.__module__ == write_segment.__module__
    assert procpool.SCAN_TASKS == scan_pack.__module__
