"""The ``kyrorepo`` command: a click group, and the one place errors become exit codes."""

from __future__ import annotations

import importlib
import json
import sys
import traceback

import click

from kyrorepo import __version__
from kyrorepo.cli.common import STATE
from kyrorepo.errors import ExitCode, KyroError

# command -> module of kyrorepo.cli that registers it; a command imports only its own
# module (backup does not load prune, verify, the WAL codecs...), which takes ~100 ms
# off the start-up of every command. tests/test_cli_commands.py keeps this table complete.
COMMANDS = {
    "init": "repo_cmds", "key": "repo_cmds", "unlock": "repo_cmds",
    "backup": "backup_cmds", "create-full": "backup_cmds", "create-incremental": "backup_cmds",
    "list": "list_cmds", "snapshots": "list_cmds", "ls": "list_cmds",
    "restore": "restore_cmds",
    "forget": "prune_cmds", "prune": "prune_cmds",
    "stats": "stats_cmds",
    "copy": "copy_cmds", "sync": "copy_cmds", "upload-s3": "copy_cmds", "download-s3": "copy_cmds",
    "sync-s3": "copy_cmds",
    "verify": "verify_cmds", "repair": "verify_cmds",
    "wal-archive": "wal_cmds", "wal-push": "wal_cmds", "wal-fetch": "wal_cmds", "restore-pitr": "wal_cmds",
    "pitr-window": "wal_cmds",
}


class LazyGroup(click.Group):
    """A group that imports a command's module when the command is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            importlib.import_module(f"kyrorepo.cli.{COMMANDS[cmd_name]}").register(self)
        return self.commands.get(cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="kyrorepo")
def cli() -> None:
    """kyrorepo: deduplicating, encrypted backups of database data directories.

    Passphrase: $KYROREPO_PASSWORD, --password-file, --password-command, or a prompt.
    Repository: --repo (alias --backup-dir) or $KYROREPO_REPO.
    """



def _report(code: int, kind: str, message: str) -> None:
    if STATE["json"]:
        click.echo(json.dumps({"error": {"code": code, "kind": kind, "message": message}}), err=True)
    else:
        click.echo(f"kyrorepo: error: {message}", err=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    STATE["json"] = False
    STATE["debug"] = "--debug" in args
    try:
        # Without standalone mode click returns the code of a ctx.exit / Exit(code).
        rv = cli.main(args=args, prog_name="kyrorepo", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        _report(ExitCode.USAGE, "usage", exc.format_message())
        code = ExitCode.USAGE
    except click.exceptions.Abort:
        _report(ExitCode.INTERRUPTED, "interrupted", "aborted")
        code = ExitCode.INTERRUPTED
    except KyroError as exc:
        if STATE["debug"]:
            traceback.print_exc()
        _report(int(exc.exit_code), exc.kind, exc.message)
        code = int(exc.exit_code)
    except KeyboardInterrupt:
        _report(ExitCode.INTERRUPTED, "interrupted", "interrupted; the repository is consistent, run the command again")
        code = ExitCode.INTERRUPTED
    except BrokenPipeError:
        code = ExitCode.OK
    except Exception as exc:  # noqa: BLE001 - the last line of defence
        if STATE["debug"]:
            traceback.print_exc()
        _report(ExitCode.FATAL, "internal", f"internal error: {exc.__class__.__name__}: {exc} (run with --debug for a traceback)")
        code = ExitCode.FATAL
    if isinstance(code, int) and code != 0:
        sys.stdout.flush()
    return int(code or 0)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
