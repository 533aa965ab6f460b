"""Storage backends and the URL -> backend factory."""

from __future__ import annotations

from kyrorepo.backends.base import Backend, validate_name
from kyrorepo.backends.local import LocalBackend
from kyrorepo.backends.memory import MemoryBackend
from kyrorepo.errors import UsageError

__all__ = ["Backend", "LocalBackend", "MemoryBackend", "open_backend", "validate_name"]


def open_backend(location: str) -> Backend:
    """Return the backend for a repository location (a path or a URL)."""
    if not location:
        raise UsageError("no repository given: pass --repo or set KYROREPO_REPO")
    if location.startswith("file://"):
        return LocalBackend(location[len("file://"):])
    if "://" in location:
        scheme = location.split("://", 1)[0]
        raise UsageError(
            f"unsupported repository location {location!r}: scheme {scheme}:// is unknown "
            "(use a local path)"
        )
    return LocalBackend(location)
