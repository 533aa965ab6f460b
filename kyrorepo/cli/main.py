"""The ``kyrorepo`` command: a click group, and the one place errors become exit codes."""

from __future__ import annotations

import json
import sys
import traceback

import click

from kyrorepo import __version__
from kyrorepo.cli import backup_cmds, copy_cmds, list_cmds, prune_cmds, repo_cmds, restore_cmds, stats_cmds, verify_cmds, wal_cmds
from kyrorepo.cli.common import STATE
from kyrorepo.errors import ExitCode, KyroError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="kyrorepo")
def cli() -> None:
    """kyrorepo: deduplicating, encrypted backups of database data directories.

    Passphrase: $KYROREPO_PASSWORD, --password-file, --password-command, or a prompt.
    Repository: --repo (alias --backup-dir) or $KYROREPO_REPO.
    """


for module in (repo_cmds, backup_cmds, list_cmds, restore_cmds, prune_cmds, stats_cmds, copy_cmds, verify_cmds, wal_cmds):
    module.register(cli)


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
