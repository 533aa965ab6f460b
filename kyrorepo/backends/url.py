"""Parse repository locations: local paths, ``sftp://`` and ``s3://`` URLs.

Accepted forms:

* ``/some/path``, ``relative/path`` or ``file:///some/path``: a local directory.
* ``sftp://[user@]host[:port]/absolute/path``; ``sftp://host/~/path`` is relative to
  the remote user's home directory. IPv6 hosts go in brackets: ``sftp://[::1]/srv``.
* ``s3://bucket[/prefix]``: objects live under ``prefix/`` in ``bucket``.

Every malformed location raises ``UsageError`` with one line saying what is wrong.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit

from kyrorepo.backends.base import validate_name
from kyrorepo.errors import PermanentBackendError, UsageError

SFTP_DEFAULT_PORT = 22
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
_FORMS = "use a local path, sftp://user@host[:port]/path or s3://bucket/prefix"


@dataclass(frozen=True)
class LocalLocation:
    path: str


@dataclass(frozen=True)
class SftpLocation:
    host: str
    path: str  # absolute ("/srv/repo") or relative to the remote home ("repo", "")
    user: str | None = None
    port: int = SFTP_DEFAULT_PORT

    def url(self) -> str:
        user = f"{self.user}@" if self.user else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f":{self.port}" if self.port != SFTP_DEFAULT_PORT else ""
        path = self.path if self.path.startswith("/") else "/~/" + self.path
        return f"sftp://{user}{host}{port}{path}"


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str = ""  # without leading or trailing '/'

    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


Location = LocalLocation | SftpLocation | S3Location


def parse_location(location: str) -> Location:
    """Classify and parse a repository location."""
    if not location:
        raise UsageError("no repository given: pass --repo or set KYROREPO_REPO")
    if location.startswith("file://"):
        return LocalLocation(location[len("file://"):])
    if "://" not in location:
        return LocalLocation(location)
    scheme = location.split("://", 1)[0].lower()
    if scheme == "sftp":
        return _parse_sftp(location)
    if scheme == "s3":
        return _parse_s3(location)
    raise UsageError(
        f"unsupported repository location {location!r}: scheme {scheme}:// is unknown ({_FORMS})"
    )


def _split(location: str) -> SplitResult:
    try:
        parts = urlsplit(location)
        _ = parts.port  # raises ValueError for a malformed port
    except ValueError as exc:
        raise UsageError(f"invalid repository URL {location!r}: {exc}") from None
    if parts.query or parts.fragment:
        raise UsageError(f"invalid repository URL {location!r}: '?' and '#' are not allowed")
    return parts


def _parse_sftp(location: str) -> SftpLocation:
    parts = _split(location)
    if parts.password is not None:
        raise UsageError(
            f"invalid repository URL {location!r}: passwords in URLs are not supported, "
            "use an SSH key (ssh-agent, ~/.ssh or KYROREPO_SFTP_KEY)"
        )
    host = parts.hostname
    if not host:
        raise UsageError(f"invalid repository URL {location!r}: no host (sftp://user@host/path)")
    path = unquote(parts.path)
    if path in ("", "/"):
        raise UsageError(
            f"invalid repository URL {location!r}: no path (sftp://user@host/absolute/path "
            "or sftp://user@host/~/path-in-home)"
        )
    if path == "/~" or path.startswith("/~/"):
        path = path[3:].strip("/")
    else:
        path = posixpath.normpath(path)
    user = unquote(parts.username) if parts.username else None
    return SftpLocation(host=host, path=path, user=user, port=parts.port or SFTP_DEFAULT_PORT)


def _parse_s3(location: str) -> S3Location:
    parts = _split(location)
    bucket = parts.netloc
    if not _BUCKET.match(bucket):
        raise UsageError(
            f"invalid repository URL {location!r}: {bucket!r} is not a valid bucket name "
            "(s3://bucket/prefix)"
        )
    prefix = unquote(parts.path).strip("/")
    if prefix:
        try:
            validate_name(prefix)
        except PermanentBackendError:
            raise UsageError(
                f"invalid repository URL {location!r}: the prefix must be '/'-separated "
                "components of [A-Za-z0-9._-]"
            ) from None
    return S3Location(bucket=bucket, prefix=prefix)
