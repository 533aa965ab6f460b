"""Backend wrappers (retry, rate limit, dry run, fault injection), URLs and open_backend."""

from __future__ import annotations

import itertools

import pytest

from backend_conformance import BackendConformance
from kyrorepo.backends import LocalBackend, MemoryBackend, S3Backend, SftpBackend, open_backend
from kyrorepo.backends.url import LocalLocation, S3Location, SftpLocation, parse_location
from kyrorepo.backends.wrappers import (
    DryRunBackend,
    FaultInjectingBackend,
    RateLimitBackend,
    RetryBackend,
)
from kyrorepo.errors import (
    ObjectNotFoundError,
    PermanentBackendError,
    TransientBackendError,
    UsageError,
)


def no_sleep(_: float) -> None:
    pass


class TestRetryOverFaultsConformance(BackendConformance):
    @pytest.fixture
    def backend(self) -> RetryBackend:
        return RetryBackend(FaultInjectingBackend(MemoryBackend(), fail_every=3), sleep=no_sleep)


class TestRetryOverLostAnswersConformance(BackendConformance):
    @pytest.fixture
    def backend(self) -> RetryBackend:
        # Lost answers: the call took effect but failed. Not for remove, whose retry
        # then rightly reports the object as missing (see the test below).
        counter = itertools.count(1)
        faulty = FaultInjectingBackend(
            MemoryBackend(), lambda op, _: op != "remove" and next(counter) % 4 == 0, after=True
        )
        return RetryBackend(faulty, sleep=no_sleep)


class TestRateLimitConformance(BackendConformance):
    @pytest.fixture
    def backend(self) -> RateLimitBackend:
        return RateLimitBackend(MemoryBackend(), 10**12, 10**12)


class TestFaultInjectingConformance(BackendConformance):
    @pytest.fixture
    def backend(self) -> FaultInjectingBackend:
        return FaultInjectingBackend(MemoryBackend())


# --- RetryBackend ---------------------------------------------------------------------------


def test_retry_gives_up_with_one_line() -> None:
    sleeps: list[float] = []
    inner = FaultInjectingBackend(MemoryBackend(), fail_every=1)
    backend = RetryBackend(inner, attempts=4, base_delay=1, max_delay=3, sleep=sleeps.append)
    with pytest.raises(TransientBackendError) as exc:
        backend.load("config")
    assert "gave up after 4 attempts" in str(exc.value) and "\n" not in str(exc.value)
    assert inner.calls == 4 and backend.retries == 3
    # exponential with jitter in [0.5, 1) of the cap, capped at max_delay
    for pause, cap in zip(sleeps, [1, 2, 3]):
        assert cap / 2 <= pause < cap


@pytest.mark.parametrize("error", [PermanentBackendError, ObjectNotFoundError, ValueError])
def test_retry_only_transient(error: type[Exception]) -> None:
    inner = FaultInjectingBackend(MemoryBackend(), fail_every=1, exception=error)
    with pytest.raises(error):
        RetryBackend(inner, sleep=no_sleep).stat("config")
    assert inner.calls == 1


def test_retry_hook_and_recovery() -> None:
    seen: list[tuple[str, int]] = []
    inner = FaultInjectingBackend(MemoryBackend(), fail_every=lambda op, name: op == "save" and seen == [])
    backend = RetryBackend(inner, sleep=no_sleep, on_retry=lambda what, exc, n, pause: seen.append((what, n)))
    backend.save("config", b"c")
    assert seen == [("save config", 1)] and backend.load("config") == b"c"


def test_retried_remove_whose_answer_was_lost_reports_missing() -> None:
    memory = MemoryBackend()
    memory.save("locks/l", b"x")
    faulty = FaultInjectingBackend(memory, lambda op, _: op == "remove", after=True)
    with pytest.raises(ObjectNotFoundError):
        RetryBackend(faulty, sleep=no_sleep).remove("locks/l")
    assert faulty.calls == 2 and dict(memory.list()) == {}


def test_retry_gives_up_when_every_answer_is_lost() -> None:
    memory = MemoryBackend()
    faulty = FaultInjectingBackend(memory, fail_every=1, after=True)
    with pytest.raises(TransientBackendError):
        RetryBackend(faulty, attempts=2, sleep=no_sleep).save("locks/m", b"y")
    assert memory.load("locks/m") == b"y"


def test_retry_rejects_bad_settings() -> None:
    with pytest.raises(UsageError):
        RetryBackend(MemoryBackend(), attempts=0)


# --- RateLimitBackend --------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept += seconds
        self.now += seconds


def test_rate_limit_throttles_uploads_and_downloads() -> None:
    clock = FakeClock()
    backend = RateLimitBackend(MemoryBackend(), 1000, 500, clock=clock, sleep=clock.sleep)
    backend.save("a", b"x" * 1000)  # the one-second burst
    assert clock.slept == 0
    for _ in range(3):
        backend.save("a", b"x" * 1000)
    assert clock.slept == pytest.approx(3.0)
    clock.now += 60  # idle time does not build up more than one second of burst
    clock.slept = 0
    backend.load("a")
    backend.load("a")
    backend.load("a", 0, 500)
    assert clock.slept == pytest.approx(4.0)  # 2500 bytes at 500/s, 500 of them burst
    assert backend.stat("a") == 1000 and dict(backend.list()) == {"a": 1000}


def test_rate_limit_unlimited_and_invalid() -> None:
    clock = FakeClock()
    backend = RateLimitBackend(MemoryBackend(), clock=clock, sleep=clock.sleep)
    backend.save("a", b"x" * 10**6)
    assert backend.load("a") == b"x" * 10**6 and clock.slept == 0
    with pytest.raises(UsageError):
        RateLimitBackend(MemoryBackend(), upload_bytes_per_sec=-1)


# --- DryRunBackend --------------------------------------------------------------------------


def test_dry_run_records_and_reads_through() -> None:
    memory = MemoryBackend()
    memory.save("snapshots/old", b"old")
    dry = DryRunBackend(memory)
    dry.save("snapshots/new", b"12345")
    dry.remove("snapshots/old")
    dry.remove("snapshots/new")  # saved in this dry run: removable too
    assert dict(memory.list()) == {"snapshots/old": 3}
    assert dry.load("snapshots/old") == b"old" and dry.stat("snapshots/old") == 3
    assert dict(dry.list("snapshots/")) == {"snapshots/old": 3}
    assert dry.saved == [("snapshots/new", 5)] and dry.bytes_saved == 5
    assert dry.removed == ["snapshots/old", "snapshots/new"]
    assert dry.describe() == "memory: (dry run)"
    with pytest.raises(ObjectNotFoundError):
        dry.remove("snapshots/missing")
    with pytest.raises(ObjectNotFoundError):
        dry.load("snapshots/new")
    with pytest.raises(PermanentBackendError):
        dry.save("../escape", b"x")


# --- FaultInjectingBackend ---------------------------------------------------------------------


def test_fault_injection_counts_and_picks() -> None:
    backend = FaultInjectingBackend(MemoryBackend(), fail_every=lambda op, name: name.startswith("data/"))
    backend.save("index/1", b"i")
    with pytest.raises(TransientBackendError, match="injected fault in save 'data/x'"):
        backend.save("data/x", b"d")
    assert (backend.calls, backend.faults) == (2, 1)
    assert list(backend.inner.list()) == [("index/1", 1)]
    with pytest.raises(UsageError):
        FaultInjectingBackend(MemoryBackend(), fail_every=0)


# --- URLs and open_backend ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "location, expected",
    [
        ("/srv/repo", LocalLocation("/srv/repo")),
        ("rel/repo", LocalLocation("rel/repo")),
        ("file:///srv/repo", LocalLocation("/srv/repo")),
        ("sftp://bob@host.example/srv/repo/", SftpLocation("host.example", "/srv/repo", "bob", 22)),
        ("sftp://bob@host:2222/srv/repo", SftpLocation("host", "/srv/repo", "bob", 2222)),
        ("sftp://host/~/backups", SftpLocation("host", "backups", None, 22)),
        ("sftp://[::1]:23/r", SftpLocation("::1", "/r", None, 23)),
        ("s3://bucket", S3Location("bucket", "")),
        ("s3://bucket/a/b/", S3Location("bucket", "a/b")),
    ],
)
def test_parse_location(location: str, expected: object) -> None:
    assert parse_location(location) == expected


@pytest.mark.parametrize(
    "location",
    ["", "ftp://host/x", "sftp://host", "sftp://u:pw@host/x", "sftp://host:99999/x",
     "s3://x", "s3://bucket/a b", "s3://bucket/p?versionId=1"],
)
def test_bad_locations_are_usage_errors(location: str) -> None:
    with pytest.raises(UsageError) as exc:
        parse_location(location)
    assert "\n" not in str(exc.value)


def test_sftp_location_url_roundtrip() -> None:
    for url in ["sftp://bob@host:2222/srv/repo", "sftp://host/~/backups", "sftp://[::1]/r"]:
        location = parse_location(url)
        assert isinstance(location, SftpLocation) and location.url() == url


def test_open_backend_wraps_network_backends(tmp_path) -> None:
    local = open_backend(str(tmp_path))
    assert isinstance(local, LocalBackend)
    sftp = open_backend("sftp://bob@host:2222/srv/repo")
    assert isinstance(sftp, RetryBackend) and isinstance(sftp.inner, SftpBackend)
    assert sftp.describe() == "sftp://bob@host:2222/srv/repo"
    s3 = open_backend("s3://bucket/pre", s3_endpoint="http://minio.local:9000", retry=False)
    assert isinstance(s3, S3Backend) and s3.path_style
    assert s3.describe() == "s3://bucket/pre at http://minio.local:9000"
    # the CLI passes $AWS_ENDPOINT_URL along whatever the location is
    assert isinstance(open_backend(str(tmp_path), s3_endpoint="http://minio.local:9000"), LocalBackend)
    with pytest.raises(UsageError):
        open_backend("s3://bucket/pre", s3_endpoint="minio.local:9000")
