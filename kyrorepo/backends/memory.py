"""In-memory backend: the reference implementation for tests and the conformance suite."""

from __future__ import annotations

import threading
from typing import Iterator

from kyrorepo.backends.base import validate_name, validate_prefix
from kyrorepo.errors import ObjectNotFoundError


class MemoryBackend:
    def __init__(self) -> None:
        self._objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def save(self, name: str, data: bytes | memoryview) -> None:
        validate_name(name)
        with self._lock:
            self._objects[name] = bytes(data)

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        validate_name(name)
        with self._lock:
            try:
                data = self._objects[name]
            except KeyError:
                raise ObjectNotFoundError(f"object {name} not found in memory backend") from None
        end = len(data) if length is None else offset + length
        return data[offset:end]

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        validate_prefix(prefix)
        with self._lock:
            items = [(n, len(d)) for n, d in self._objects.items() if n.startswith(prefix)]
        yield from items

    def stat(self, name: str) -> int:
        validate_name(name)
        with self._lock:
            try:
                return len(self._objects[name])
            except KeyError:
                raise ObjectNotFoundError(f"object {name} not found in memory backend") from None

    def remove(self, name: str) -> None:
        validate_name(name)
        with self._lock:
            if self._objects.pop(name, None) is None:
                raise ObjectNotFoundError(f"object {name} not found in memory backend")

    def describe(self) -> str:
        return "memory:"

    def close(self) -> None:
        pass
