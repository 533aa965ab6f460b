"""Error hierarchy and exit codes, shared by every layer.

Every error carries the exit code the CLI turns it into and a one-line message that
says what happened, to which object, and what to do. The CLI converts errors to exit
codes in exactly one place (``kyrorepo.cli.main``).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FATAL = 1
    USAGE = 2
    INCOMPLETE = 3
    NO_REPOSITORY = 10
    LOCKED = 11
    WRONG_PASSWORD = 12
    DAMAGE = 13
    PITR_UNREACHABLE = 14
    REFUSED = 15
    INTERRUPTED = 130


class KyroError(Exception):
    """Base of every error kyrorepo raises on purpose."""

    exit_code: ExitCode = ExitCode.FATAL
    kind: str = "fatal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(KyroError):
    exit_code = ExitCode.USAGE
    kind = "usage"


class NoRepositoryError(KyroError):
    exit_code = ExitCode.NO_REPOSITORY
    kind = "no-repository"


class RepositoryExistsError(KyroError):
    exit_code = ExitCode.FATAL
    kind = "repository-exists"


class LockedError(KyroError):
    exit_code = ExitCode.LOCKED
    kind = "locked"


class WrongPasswordError(KyroError):
    exit_code = ExitCode.WRONG_PASSWORD
    kind = "wrong-password"


class IntegrityError(KyroError):
    """Data read from the repository does not match what it claims to be."""

    exit_code = ExitCode.DAMAGE
    kind = "damage"


class UnsupportedVersionError(KyroError):
    exit_code = ExitCode.FATAL
    kind = "unsupported-version"


class NotFoundError(KyroError):
    """A named object (backup, path, blob) does not exist."""

    exit_code = ExitCode.FATAL
    kind = "not-found"


class PitrUnreachableError(KyroError):
    exit_code = ExitCode.PITR_UNREACHABLE
    kind = "pitr-unreachable"


class RefusedError(KyroError):
    exit_code = ExitCode.REFUSED
    kind = "refused"


class IncompleteError(KyroError):
    exit_code = ExitCode.INCOMPLETE
    kind = "incomplete"


# --- backend errors ------------------------------------------------------------------


class BackendError(KyroError):
    """A storage backend failed. Subclasses classify the failure."""

    kind = "backend"


class ObjectNotFoundError(BackendError):
    """The named object does not exist in the backend."""

    kind = "object-not-found"


class TransientBackendError(BackendError):
    """A failure that may go away when the call is repeated (timeouts, throttling)."""

    kind = "transient"


class PermanentBackendError(BackendError):
    """A failure that repeating will not fix (permissions, bad credentials, bad name)."""

    kind = "permanent"
