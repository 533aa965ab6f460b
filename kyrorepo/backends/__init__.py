"""Storage backends and the URL -> backend factory."""

from __future__ import annotations

from kyrorepo.backends.base import Backend, validate_name
from kyrorepo.backends.local import LocalBackend
from kyrorepo.backends.memory import MemoryBackend
from kyrorepo.backends.s3 import S3Backend
from kyrorepo.backends.sftp import SftpBackend
from kyrorepo.backends.url import LocalLocation, SftpLocation, parse_location
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
    backend: Backend
    if isinstance(parsed, SftpLocation):
        backend = SftpBackend(
            parsed.host, parsed.path, user=parsed.user, port=parsed.port, key_filename=sftp_key
        )
    else:
        backend = S3Backend(parsed.bucket, parsed.prefix, endpoint=s3_endpoint)
    return RetryBackend(backend) if retry else backend
