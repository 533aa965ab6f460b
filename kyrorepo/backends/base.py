"""The storage interface: five methods over opaque, validated names.

Rules every backend keeps (the conformance suite in ``tests/backend_conformance.py``
checks them against every implementation):

* Names are relative, '/'-separated, made of ``[A-Za-z0-9._-]`` components, none of
  them empty, ``.`` or ``..``. ``validate_name`` enforces this before any I/O.
* ``save`` is atomic: a reader sees either no object or the whole object, never part
  of it, also when the writer is killed. When ``save`` returns the object is durable.
  Saving a name that exists replaces it atomically (kyrorepo only does that for
  content-addressed names, where the content is the same, and for locks).
* ``load`` returns the whole object or the byte range ``[offset, offset+length)``; a
  range past the end is cut at the end. A missing object raises
  ``ObjectNotFoundError``.
* ``list(prefix)`` yields ``(name, size)`` of every object whose name starts with the
  prefix, in no particular order. Objects saved before the call started are listed.
* ``stat`` returns the size of an object, ``remove`` deletes it; both raise
  ``ObjectNotFoundError`` for a missing name.
* Failures are classified: ``ObjectNotFoundError``, ``TransientBackendError`` (worth a
  retry), ``PermanentBackendError`` (not). Retry, rate limit and dry-run are wrappers
  around a backend (``kyrorepo.backends.wrappers``), never branches inside one.
"""

from __future__ import annotations

import re
from typing import Iterator, Protocol, runtime_checkable

from kyrorepo.errors import PermanentBackendError

_COMPONENT = re.compile(r"^[A-Za-z0-9_.-]+$")


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid object name, else raise PermanentBackendError."""
    if not isinstance(name, str) or not name or len(name) > 1024:
        raise PermanentBackendError(f"invalid object name {name!r}: must be a non-empty string")
    for part in name.split("/"):
        if part in ("", ".", "..") or not _COMPONENT.match(part):
            raise PermanentBackendError(
                f"invalid object name {name!r}: components must match [A-Za-z0-9._-]+"
            )
    return name


def validate_prefix(prefix: str) -> str:
    """A list prefix is empty or a valid name, optionally ending in '/'."""
    if prefix == "":
        return prefix
    validate_name(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


@runtime_checkable
class Backend(Protocol):
    """Storage of opaque, immutable-by-convention objects under validated names."""

    def save(self, name: str, data: bytes | memoryview) -> None:
        """Store ``data`` under ``name`` atomically and durably.

        ``data`` may be a view of a buffer the caller reuses once this returns (the
        backup's pack buffers): write or copy it before returning, never keep it."""

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Return the object's bytes, or the range starting at ``offset``."""

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """Yield ``(name, size)`` for every object whose name starts with ``prefix``."""

    def stat(self, name: str) -> int:
        """Return the object's size in bytes."""

    def remove(self, name: str) -> None:
        """Delete the object."""

    def describe(self) -> str:
        """A short human description (a path or URL) for messages."""

    def close(self) -> None:
        """Release connections; the backend is not used afterwards."""


def load_view(backend: Backend, name: str, offset: int, length: int) -> bytes | memoryview:
    """``backend.load(name, offset, length)``; from a backend that has a ``load_view`` (a local one,
    wrapped or not), a view of a buffer of this thread, valid only until the thread's next
    ``load_view``: the bulk reads of restore and the full data check, which open the blobs in a
    range and let it go."""
    view = getattr(backend, "load_view", None)
    return view(name, offset, length) if view is not None else backend.load(name, offset, length)
