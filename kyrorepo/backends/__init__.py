"""Storage backends and the URL -> backend factory.

The network backends pull in large libraries (boto3/botocore for S3, paramiko for
SFTP: together ~30 MiB and a quarter of a second of start-up), so their modules are
imported only when a location of their kind is opened, through ``_NETWORK_BACKENDS``.
``kyrorepo.backends.S3Backend`` and ``.SftpBackend`` still resolve, on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

from kyrorepo.backends.base import Backend, validate_name
from kyrorepo.backends.local import LocalBackend
from kyrorepo.backends.memory import MemoryBackend
from kyrorepo.backends.url import LocalLocation, S3Location, SftpLocation, parse_location
from kyrorepo.backends.wrappers import RetryBackend

__all__ = [
    "Backend",
    "LocalBackend",
    "MemoryBackend",
    "S3Backend",
    "SftpBackend",
    "open_backend",
    "validate_name",
]

# location kind -> (module, class) of its backend; imported on first use
_NETWORK_BACKENDS: dict[type, tuple[str, str]] = {
    SftpLocation: ("kyrorepo.backends.sftp", "SftpBackend"),
    S3Location: ("kyrorepo.backends.s3", "S3Backend"),
}
_BY_CLASS_NAME = {cls: mod for mod, cls in _NETWORK_BACKENDS.values()}


def _network_class(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


def __getattr__(name: str) -> Any:
    if name in _BY_CLASS_NAME:
        return _network_class(_BY_CLASS_NAME[name], name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_backend(
    location: str,
    *,
    s3_endpoint: str | None = None,
    sftp_key: str | None = None,
    retry: bool = True,
) -> Backend:
    """Return the backend for a repository location (a path or a URL).

    ``sftp://[user@]host[:port]/path`` and ``s3://bucket[/prefix]`` give network
    backends, wrapped in ``RetryBackend`` unless ``retry`` is false. ``s3_endpoint``
    (else ``$AWS_ENDPOINT_URL``) selects an S3-compatible store; ``sftp_key`` (else
    ``$KYROREPO_SFTP_KEY``) is an SSH identity file used besides agent and ~/.ssh.
    Both are ignored for other kinds of location (the CLI fills ``s3_endpoint`` from
    ``$AWS_ENDPOINT_URL`` whatever the repository is). No network I/O happens here;
    connection errors surface on the first call.
    """
    parsed = parse_location(location)
    if isinstance(parsed, LocalLocation):
        return LocalBackend(parsed.path)
    cls = _network_class(*_NETWORK_BACKENDS[type(parsed)])
    backend: Backend
    if isinstance(parsed, SftpLocation):
        backend = cls(parsed.host, parsed.path, user=parsed.user, port=parsed.port, key_filename=sftp_key)
    else:
        backend = cls(parsed.bucket, parsed.prefix, endpoint=s3_endpoint)
    return RetryBackend(backend) if retry else backend
