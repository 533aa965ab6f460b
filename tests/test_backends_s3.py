"""S3Backend against a real moto S3 server on loopback (started by tests/servers.py)."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from backend_conformance import BackendConformance
from servers import (  # noqa: F401
    MotoServer,
    free_port,
    moto_server,
    set_dummy_aws_env,
    start_moto,
    stop_process,
)
from kyrorepo.backends import S3Backend, open_backend
from kyrorepo.backends.wrappers import FaultInjectingBackend, RetryBackend
from kyrorepo.errors import ObjectNotFoundError, PermanentBackendError, TransientBackendError

pytestmark = pytest.mark.network


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    set_dummy_aws_env(monkeypatch, tmp_path)


def unique_prefix() -> str:
    return f"repos/{uuid.uuid4().hex}"


@pytest.fixture
def s3(moto_server: MotoServer, aws_env: None) -> Iterator[S3Backend]:
    backend = S3Backend(moto_server.bucket, unique_prefix(), endpoint=moto_server.endpoint)
    yield backend
    backend.close()


class TestS3Conformance(BackendConformance):
    @pytest.fixture
    def backend(self, s3: S3Backend) -> S3Backend:
        return s3


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_large_objects_use_multipart(s3: S3Backend, moto_server: MotoServer) -> None:
    data = os.urandom(17 * 1024 * 1024)
    s3.save("data/ff/big", data)
    head = moto_server.client().head_object(Bucket=s3.bucket, Key=f"{s3.prefix}/data/ff/big")
    assert head["ETag"].strip('"').endswith("-3")  # 3 parts of at most 8 MiB
    assert s3.load("data/ff/big", 16 * 1024 * 1024, 10) == data[16 * 1024 * 1024:][:10]


def test_prefixes_are_isolated_and_foreign_keys_skipped(
    s3: S3Backend, moto_server: MotoServer
) -> None:
    other = S3Backend(moto_server.bucket, unique_prefix(), endpoint=moto_server.endpoint)
    s3.save("config", b"mine")
    other.save("config", b"theirs")
    client = moto_server.client()
    client.put_object(Bucket=s3.bucket, Key=f"{s3.prefix}/folder/", Body=b"")
    assert dict(s3.list()) == {"config": 4}
    assert client.get_object(Bucket=s3.bucket, Key=f"{s3.prefix}/config")["Body"].read() == b"mine"
    other.remove("config")
    assert s3.load("config") == b"mine"


def test_load_range_edges(s3: S3Backend) -> None:
    s3.save("index/e", b"")
    assert s3.load("index/e", 0, 10) == b""
    assert s3.load("index/e", 5) == b""
    s3.save("index/x", b"0123456789")
    assert s3.load("index/x", 10) == b""
    assert s3.load("index/x", 20, 5) == b""
    with pytest.raises(ObjectNotFoundError):
        s3.load("index/missing", 0, 0)


def test_open_backend_with_endpoint_env(
    moto_server: MotoServer, aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint)
    prefix = unique_prefix()
    backend = open_backend(f"s3://{moto_server.bucket}/{prefix}")
    assert isinstance(backend, RetryBackend)
    backend.save("keys/k1", b"key")
    explicit = open_backend(f"s3://{moto_server.bucket}/{prefix}/", s3_endpoint=moto_server.endpoint)
    assert explicit.load("keys/k1") == b"key"
    assert moto_server.endpoint in explicit.describe()


def test_wrong_endpoint_is_one_clear_error(moto_server: MotoServer, aws_env: None) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    backend = open_backend(f"s3://{moto_server.bucket}/x", s3_endpoint=endpoint)
    started = time.monotonic()
    with pytest.raises(PermanentBackendError) as exc:
        backend.stat("config")
    message = one_line(exc)
    assert endpoint in message and "cannot connect" in message
    assert time.monotonic() - started < 10


def test_missing_credentials_is_one_clear_error(
    moto_server: MotoServer, aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    backend = open_backend(f"s3://{moto_server.bucket}/x", s3_endpoint=moto_server.endpoint)
    with pytest.raises(PermanentBackendError) as exc:
        backend.save("config", b"x")
    assert "AWS_ACCESS_KEY_ID" in one_line(exc)


def test_missing_bucket_is_permanent(moto_server: MotoServer, aws_env: None) -> None:
    backend = S3Backend("no-such-bucket-here", endpoint=moto_server.endpoint)
    with pytest.raises(PermanentBackendError) as exc:
        backend.load("config")
    assert "NoSuchBucket" in one_line(exc)


def test_injected_faults_are_retried_on_real_backend(s3: S3Backend) -> None:
    faulty = FaultInjectingBackend(s3, fail_every=2)
    backend = RetryBackend(faulty, sleep=lambda _: None)
    for i in range(4):
        backend.save(f"snapshots/{i}", bytes([i]) * 10)
    assert len(list(backend.list("snapshots/"))) == 4
    assert backend.load("snapshots/2", 3, 2) == b"\x02\x02"
    for i in range(4):
        backend.remove(f"snapshots/{i}")
    assert list(s3.list("snapshots/")) == []
    assert faulty.faults >= 4


def test_server_going_away_after_first_contact_is_transient(
    aws_env: None, tmp_path: Path
) -> None:
    proc, server = start_moto(tmp_path)
    try:
        backend = S3Backend(server.bucket, "p", endpoint=server.endpoint)
        backend.save("config", b"c")
    finally:
        stop_process(proc)
    with pytest.raises(TransientBackendError) as exc:
        backend.load("config")
    assert server.endpoint in one_line(exc)
