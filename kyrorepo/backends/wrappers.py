"""Backends that wrap another backend: retry, rate limit, dry run, fault injection.

Each wrapper implements the whole Backend protocol and delegates to ``inner``, so
wrappers stack: ``RetryBackend(RateLimitBackend(SftpBackend(...)))``.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

from kyrorepo.backends.base import Backend, load_view, validate_name
from kyrorepo.errors import TransientBackendError, UsageError

T = TypeVar("T")
RetryHook = Callable[[str, TransientBackendError, int, float], None]
FaultPredicate = Callable[[str, str], bool]


@dataclass(frozen=True)
class RetrySpec:
    """How a worker process reopens a ``RetryBackend``: the inner backend's spec and the policy."""

    inner: Any  # the inner backend's reopen spec (an object with ``open()``)
    attempts: int
    base_delay: float
    max_delay: float

    def open(self) -> "RetryBackend":
        return RetryBackend(self.inner.open(), self.attempts, self.base_delay, self.max_delay)


class RetryBackend:
    """Repeat calls that fail with ``TransientBackendError``, with exponential backoff.

    The n-th retry waits ``min(max_delay, base_delay * 2**(n-1))`` scaled by a random
    factor in [0.5, 1) (jitter, so parallel workers do not retry in lock step). After
    ``attempts`` failed attempts the last error is raised, its message saying so.
    ``list`` is read completely inside the retry, so a retried listing never yields
    a name twice. Only transient errors are retried, so the wrapped backend keeps
    its contract; note that when a ``remove`` took effect but its answer was lost,
    the retry raises ``ObjectNotFoundError`` (callers removing objects treat a
    missing object as removed).
    """

    def __init__(
        self,
        inner: Backend,
        attempts: int = 5,
        base_delay: float = 0.2,
        max_delay: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
        on_retry: RetryHook | None = None,
    ) -> None:
        if attempts < 1 or base_delay < 0 or max_delay < 0:
            raise UsageError("retry attempts must be >= 1 and delays >= 0")
        self.inner = inner
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._sleep = sleep
        self._on_retry = on_retry
        self._lock = threading.Lock()
        self.retries = 0  # total retries made, for statistics

    def reopen_spec(self) -> RetrySpec | None:
        """The spec another process reopens this backend from, or None when the inner one has none
        (network backends: their workers stay threads, the network is the bound)."""
        inner = getattr(self.inner, "reopen_spec", None)
        spec = inner() if inner is not None else None
        return None if spec is None else RetrySpec(spec, self.attempts, self.base_delay, self.max_delay)

    def delay(self, retry: int) -> float:
        """The pause before retry number ``retry`` (1-based), with jitter."""
        cap = min(self.max_delay, self.base_delay * (2 ** (retry - 1)))
        return cap * (0.5 + random.random() / 2)

    def _run(self, what: str, call: Callable[[], T]) -> T:
        for attempt in range(1, self.attempts + 1):
            try:
                return call()
            except TransientBackendError as exc:
                if attempt == self.attempts:
                    raise TransientBackendError(
                        f"{exc.message} (gave up after {attempt} attempts)"
                    ) from exc
                pause = self.delay(attempt)
                with self._lock:
                    self.retries += 1
                if self._on_retry is not None:
                    self._on_retry(what, exc, attempt, pause)
                self._sleep(pause)
        raise AssertionError("unreachable")  # pragma: no cover

    def save(self, name: str, data: bytes | memoryview) -> None:
        self._run(f"save {name}", lambda: self.inner.save(name, data))

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self._run(f"load {name}", lambda: self.inner.load(name, offset, length))

    def load_view(self, name: str, offset: int, length: int) -> bytes | memoryview:
        """The inner backend's ``load_view`` (kyrorepo.backends.base.load_view), retried."""
        return self._run(f"load {name}", lambda: load_view(self.inner, name, offset, length))

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        yield from self._run(f"list {prefix}", lambda: [*self.inner.list(prefix)])

    def stat(self, name: str) -> int:
        return self._run(f"stat {name}", lambda: self.inner.stat(name))

    def remove(self, name: str) -> None:
        self._run(f"remove {name}", lambda: self.inner.remove(name))

    def describe(self) -> str:
        return self.inner.describe()

    def close(self) -> None:
        self.inner.close()


class _TokenBucket:
    """Bytes per second with a one-second burst; callers may go into debt and wait."""

    def __init__(
        self, rate: float, clock: Callable[[], float], sleep: Callable[[float], None]
    ) -> None:
        if rate <= 0:
            raise UsageError(f"rate limit must be positive, got {rate}")
        self.rate = float(rate)
        self._tokens = self.rate
        self._clock = clock
        self._sleep = sleep
        self._last = clock()
        self._lock = threading.Lock()

    def consume(self, amount: int) -> None:
        with self._lock:
            now = self._clock()
            self._tokens = min(self.rate, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= amount
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)


class RateLimitBackend:
    """Limit upload (save) and download (load) bandwidth with token buckets.

    ``None`` means unlimited. Uploads are charged before they start, downloads after
    they finished (their size is known only then); each bucket holds at most one
    second's worth of bytes, so idle time does not build up a large burst.
    """

    def __init__(
        self,
        inner: Backend,
        upload_bytes_per_sec: float | None = None,
        download_bytes_per_sec: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.inner = inner
        self._up = _TokenBucket(upload_bytes_per_sec, clock, sleep) if upload_bytes_per_sec else None
        self._down = (
            _TokenBucket(download_bytes_per_sec, clock, sleep) if download_bytes_per_sec else None
        )

    def save(self, name: str, data: bytes | memoryview) -> None:
        if self._up is not None:
            self._up.consume(len(data))
        self.inner.save(name, data)

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        data = self.inner.load(name, offset, length)
        if self._down is not None:
            self._down.consume(len(data))
        return data

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        return self.inner.list(prefix)

    def stat(self, name: str) -> int:
        return self.inner.stat(name)

    def remove(self, name: str) -> None:
        self.inner.remove(name)

    def describe(self) -> str:
        return self.inner.describe()

    def close(self) -> None:
        self.inner.close()


class DryRunBackend:
    """Reads go to ``inner``; saves and removes are validated and recorded, not done.

    Reads do not see recorded saves. ``remove`` of a name that neither exists in
    ``inner`` nor was saved in this dry run raises ``ObjectNotFoundError``, as the
    real remove would.
    """

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.saved: list[tuple[str, int]] = []  # (name, size) in call order
        self.removed: list[str] = []
        self._lock = threading.Lock()

    @property
    def bytes_saved(self) -> int:
        with self._lock:
            return sum(size for _, size in self.saved)

    def save(self, name: str, data: bytes | memoryview) -> None:
        validate_name(name)
        with self._lock:
            self.saved.append((name, len(data)))

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.inner.load(name, offset, length)

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        return self.inner.list(prefix)

    def stat(self, name: str) -> int:
        return self.inner.stat(name)

    def remove(self, name: str) -> None:
        validate_name(name)
        with self._lock:
            saved_here = any(n == name for n, _ in self.saved)
        if not saved_here:
            self.inner.stat(name)
        with self._lock:
            self.removed.append(name)

    def describe(self) -> str:
        return f"{self.inner.describe()} (dry run)"

    def close(self) -> None:
        self.inner.close()


class FaultInjectingBackend:
    """Make calls fail on purpose, for tests of retry and error handling.

    ``fail_every=N`` fails every N-th call (counting save, load, list, stat and
    remove together); a predicate ``(operation, name) -> bool`` fails the calls it
    picks (``name`` is the prefix for ``list``); ``None`` never fails. ``exception``
    builds the error from a message. With ``after=True`` the call is carried out
    first and its answer is lost, like a connection dropping after the server acted.
    """

    def __init__(
        self,
        inner: Backend,
        fail_every: int | FaultPredicate | None = None,
        exception: Callable[[str], BaseException] = TransientBackendError,
        *,
        after: bool = False,
    ) -> None:
        if isinstance(fail_every, int) and fail_every < 1:
            raise UsageError("fail_every must be >= 1")
        self.inner = inner
        self.fail_every = fail_every
        self.exception = exception
        self.after = after
        self.calls = 0
        self.faults = 0
        self._lock = threading.Lock()

    def _should_fail(self, operation: str, name: str) -> bool:
        with self._lock:
            self.calls += 1
            count = self.calls
        if self.fail_every is None:
            return False
        if isinstance(self.fail_every, int):
            return count % self.fail_every == 0
        return self.fail_every(operation, name)

    def _call(self, operation: str, name: str, call: Callable[[], T]) -> T:
        fail = self._should_fail(operation, name)
        if fail and not self.after:
            raise self._fault(operation, name)
        result = call()
        if fail:
            raise self._fault(operation, name)
        return result

    def _fault(self, operation: str, name: str) -> BaseException:
        with self._lock:
            self.faults += 1
        return self.exception(f"injected fault in {operation} {name!r} of {self.describe()}")

    def save(self, name: str, data: bytes | memoryview) -> None:
        self._call("save", name, lambda: self.inner.save(name, data))

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self._call("load", name, lambda: self.inner.load(name, offset, length))

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        yield from self._call("list", prefix, lambda: [*self.inner.list(prefix)])

    def stat(self, name: str) -> int:
        return self._call("stat", name, lambda: self.inner.stat(name))

    def remove(self, name: str) -> None:
        self._call("remove", name, lambda: self.inner.remove(name))

    def describe(self) -> str:
        return self.inner.describe()

    def close(self) -> None:
        self.inner.close()
