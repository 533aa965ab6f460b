"""SftpBackend against a real OpenSSH sshd on loopback (started by tests/servers.py)."""

from __future__ import annotations

import os
import signal
import stat
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from backend_conformance import BackendConformance
from servers import (  # noqa: F401
    SshServer,
    free_port,
    generate_key,
    kill_ssh_sessions,
    signal_ssh_sessions,
    sshd_server,
)
from kyrorepo.backends import SftpBackend, open_backend
from kyrorepo.backends.wrappers import FaultInjectingBackend, RetryBackend
from kyrorepo.errors import PermanentBackendError, TransientBackendError

pytestmark = pytest.mark.network


@pytest.fixture
def ssh_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Keep the developer's ~/.ssh, agent and KYROREPO_* settings out of the tests."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("SSH_AUTH_SOCK", "KYROREPO_SFTP_KEY", "KYROREPO_SSH_KNOWN_HOSTS"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def make_backend(server: SshServer, **kwargs) -> SftpBackend:
    kwargs.setdefault("key_filename", server.user_key)
    kwargs.setdefault("known_hosts", server.known_hosts)
    path = os.path.join(server.root, uuid.uuid4().hex)
    return SftpBackend(server.host, path, user=server.user, port=server.port, **kwargs)


@pytest.fixture
def sftp(sshd_server: SshServer, ssh_env: Path) -> Iterator[SftpBackend]:
    backend = make_backend(sshd_server)
    yield backend
    backend.close()


class TestSftpConformance(BackendConformance):
    @pytest.fixture
    def backend(self, sftp: SftpBackend) -> SftpBackend:
        return sftp


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_owner_only_permissions_and_no_temp_files_listed(sftp: SftpBackend) -> None:
    sftp.save("data/ab/x", b"secret")
    path = os.path.join(sftp.root, "data", "ab", "x")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    Path(path).with_name(".tmp-dead").write_bytes(b"partial")
    assert list(sftp.list("data/")) == [("data/ab/x", 6)]
    assert sorted(os.listdir(os.path.dirname(path))) == [".tmp-dead", "x"]


def test_open_backend_url_with_env(
    sshd_server: SshServer, ssh_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KYROREPO_SFTP_KEY", sshd_server.user_key)
    monkeypatch.setenv("KYROREPO_SSH_KNOWN_HOSTS", sshd_server.known_hosts)
    path = os.path.join(sshd_server.root, uuid.uuid4().hex)
    backend = open_backend(sshd_server.url(path))
    try:
        assert isinstance(backend, RetryBackend)
        assert backend.describe() == sshd_server.url(path)
        backend.save("config", b"cfg")
        assert backend.load("config") == b"cfg"
        assert os.path.exists(os.path.join(path, "config"))
    finally:
        backend.close()


def test_unknown_host_key_is_one_clear_permanent_error(
    sshd_server: SshServer, ssh_env: Path
) -> None:
    empty = ssh_env / "known_hosts"
    empty.write_text("")
    backend = RetryBackend(make_backend(sshd_server, known_hosts=str(empty)))
    with pytest.raises(PermanentBackendError) as exc:
        backend.stat("config")
    message = one_line(exc)
    assert f"ssh-keyscan -p {sshd_server.port} {sshd_server.host} >> {empty}" in message
    assert "SHA256:" in message and "unknown" in message


def test_changed_host_key_is_refused(sshd_server: SshServer, ssh_env: Path) -> None:
    other = generate_key(ssh_env / "other_host_key")
    known_hosts = ssh_env / "known_hosts"
    known_hosts.write_text(f"[{sshd_server.host}]:{sshd_server.port} {other}\n")
    with pytest.raises(PermanentBackendError) as exc:
        make_backend(sshd_server, known_hosts=str(known_hosts)).stat("config")
    message = one_line(exc)
    assert "does NOT match" in message and "ssh-keygen" in message


def test_unauthorized_key_is_a_permanent_auth_error(sshd_server: SshServer, ssh_env: Path) -> None:
    generate_key(ssh_env / "stranger_key")
    backend = make_backend(sshd_server, key_filename=str(ssh_env / "stranger_key"))
    with pytest.raises(PermanentBackendError) as exc:
        backend.stat("config")
    assert "authentication" in one_line(exc)


def test_missing_identity_file(sshd_server: SshServer, ssh_env: Path) -> None:
    backend = make_backend(sshd_server, key_filename=str(ssh_env / "nope"))
    with pytest.raises(PermanentBackendError) as exc:
        backend.stat("config")
    assert "does not exist" in one_line(exc)


def test_refused_first_connection_is_permanent(sshd_server: SshServer, ssh_env: Path) -> None:
    port = free_port()
    backend = SftpBackend(
        "127.0.0.1", "/srv/repo", user=sshd_server.user, port=port,
        key_filename=sshd_server.user_key, known_hosts=sshd_server.known_hosts,
    )
    started = time.monotonic()
    with pytest.raises(PermanentBackendError) as exc:
        RetryBackend(backend).stat("config")
    assert f"127.0.0.1:{port}" in one_line(exc)
    assert time.monotonic() - started < 5


def test_dropped_connection_recovers_on_next_call(sshd_server: SshServer, sftp: SftpBackend) -> None:
    sftp.save("index/a", b"a")
    assert kill_ssh_sessions(sshd_server) > 0
    try:
        assert sftp.load("index/a") == b"a"  # the drop may already have been noticed
    except TransientBackendError as exc:
        assert "connection lost" in str(exc)
    assert sftp.load("index/a") == b"a"
    sftp.save("index/b", b"b")
    assert dict(sftp.list("index/")) == {"index/a": 1, "index/b": 1}


def test_dropped_connection_is_transparent_behind_retry(
    sshd_server: SshServer, sftp: SftpBackend
) -> None:
    backend = RetryBackend(sftp, base_delay=0.01)
    backend.save("index/a", b"a")
    for _ in range(3):
        kill_ssh_sessions(sshd_server)
        assert backend.load("index/a") == b"a"
        backend.save("index/a", b"a")


def test_hung_server_times_out_as_transient_then_reconnects(
    sshd_server: SshServer, ssh_env: Path
) -> None:
    backend = make_backend(sshd_server, timeout=1.0)
    backend.save("index/a", b"a")
    signal_ssh_sessions(sshd_server, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(TransientBackendError):
            backend.load("index/a")
        assert time.monotonic() - started < 5
    finally:
        kill_ssh_sessions(sshd_server)
    assert backend.load("index/a") == b"a"
    backend.close()


def test_injected_faults_are_retried_on_real_backend(sftp: SftpBackend) -> None:
    faulty = FaultInjectingBackend(sftp, fail_every=2)
    backend = RetryBackend(faulty, sleep=lambda _: None)
    for i in range(5):
        backend.save(f"snapshots/{i}", bytes([i]) * 100)
    assert sorted(dict(backend.list("snapshots/"))) == [f"snapshots/{i}" for i in range(5)]
    assert backend.load("snapshots/3", 10, 5) == bytes([3]) * 5
    for i in range(5):
        backend.remove(f"snapshots/{i}")
    assert dict(sftp.list("snapshots/")) == {}
    assert faulty.faults >= 5


def test_more_threads_than_channels(sshd_server: SshServer, ssh_env: Path) -> None:
    backend = make_backend(sshd_server, max_channels=2)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(5):
                backend.save(f"data/{k}/{i}", os.urandom(40_000))
                assert len(backend.load(f"data/{k}/{i}")) == 40_000
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    backend.close()
    assert not errors
