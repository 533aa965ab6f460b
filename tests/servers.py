"""Real servers on loopback for the network backend tests: OpenSSH sshd and moto.

``sshd_server`` and ``moto_server`` are session-scoped fixtures; import them into
a test module to use them. A missing server program skips the tests, except when
the ``CI`` environment variable is set: there it fails them, so CI cannot go green
by silently skipping (``.ci/install-test-servers.sh`` installs what is needed).
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from boto3.session import Session
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = "/run/sshd"
LOOPBACK = "127.0.0.1"
BUCKET = "kyrorepo-test"
DUMMY_KEY_ID = "testing"
DUMMY_SECRET = "testing"
REGION = "us-east-1"
INSTALL_HINT = "run .ci/install-test-servers.sh"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(available: bool, what: str) -> None:
    """Skip when ``what`` is unavailable, but fail under CI."""
    if available:
        return
    if in_ci():
        pytest.fail(f"{what} ({INSTALL_HINT}); CI is set, so this is not skipped", pytrace=False)
    pytest.skip(f"{what} ({INSTALL_HINT})")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    stop_process(proc)
    raise RuntimeError(f"server did not listen on port {port} in {timeout}s: {log.read_text()[-2000:]}")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def generate_key(path: Path) -> str:
    """Write an OpenSSH ed25519 private key to ``path``; return the public key line."""
    key = Ed25519PrivateKey.generate()
    write_private(
        path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return public.decode()


# --- sshd --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SshServer:
    host: str
    port: int
    user: str
    pid: int
    root: str  # a directory the tests may use for repositories
    user_key: str  # private key authorized for ``user``
    known_hosts: str  # contains the server's host key
    host_public_key: str  # "ssh-ed25519 AAAA..."

    def url(self, path: str) -> str:
        return f"sftp://{self.user}@{self.host}:{self.port}{path}"


def _sshd_config(workdir: Path, port: int) -> str:
    return "\n".join(
        [
            f"Port {port}",
            f"ListenAddress {LOOPBACK}",
            f"HostKey {workdir / 'host_key'}",
            f"PidFile {workdir / 'sshd.pid'}",
            f"AuthorizedKeysFile {workdir / 'authorized_keys'}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "UsePAM no",
            "StrictModes no",
            "MaxSessions 20",
            "LogLevel ERROR",
            "Subsystem sftp internal-sftp",
            "",
        ]
    )


def start_sshd(workdir: Path) -> tuple[subprocess.Popen[bytes], SshServer]:
    host_public = generate_key(workdir / "host_key")
    user_public = generate_key(workdir / "user_key")
    (workdir / "authorized_keys").write_text(user_public + "\n")
    port = free_port()
    config = workdir / "sshd_config"
    config.write_text(_sshd_config(workdir, port))
    known_hosts = workdir / "known_hosts"
    known_hosts.write_text(f"[{LOOPBACK}]:{port} {host_public}\n")
    root = workdir / "repos"
    root.mkdir()
    log = workdir / "sshd.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    wait_for_port(port, proc, log)
    server = SshServer(
        host=LOOPBACK,
        port=port,
        user=pwd.getpwuid(os.getuid()).pw_name,
        pid=proc.pid,
        root=str(root),
        user_key=str(workdir / "user_key"),
        known_hosts=str(known_hosts),
        host_public_key=host_public,
    )
    return proc, server


def _ensure_privsep_dir() -> bool:
    try:
        os.makedirs(PRIVSEP_DIR, 0o755, exist_ok=True)
    except OSError:
        return False
    return True


@pytest.fixture(scope="session")
def sshd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    require(os.access(SSHD, os.X_OK), f"{SSHD} (openssh-server) is not installed")
    require(_ensure_privsep_dir(), f"sshd's privilege separation directory {PRIVSEP_DIR} is missing")
    proc, server = start_sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        stop_process(proc)


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def signal_ssh_sessions(server: SshServer, signum: int) -> int:
    """Signal the sshd processes serving connections (not the listener)."""
    pending, signalled = _children(server.pid), 0
    while pending:
        pid = pending.pop()
        pending.extend(_children(pid))
        try:
            os.kill(pid, signum)
            signalled += 1
        except ProcessLookupError:
            pass
    return signalled


def kill_ssh_sessions(server: SshServer) -> int:
    """SIGKILL the processes serving connections: every connection drops."""
    return signal_ssh_sessions(server, signal.SIGKILL)


# --- moto (S3) -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MotoServer:
    endpoint: str
    bucket: str
    port: int
    pid: int

    def client(self) -> Any:
        """A boto3 S3 client with the dummy credentials."""
        return Session(
            aws_access_key_id=DUMMY_KEY_ID, aws_secret_access_key=DUMMY_SECRET, region_name=REGION
        ).client("s3", endpoint_url=self.endpoint)


def start_moto(workdir: Path) -> tuple[subprocess.Popen[bytes], MotoServer]:
    port = free_port()
    log = workdir / "moto.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    wait_for_port(port, proc, log)
    server = MotoServer(endpoint=f"http://{LOOPBACK}:{port}", bucket=BUCKET, port=port, pid=proc.pid)
    server.client().create_bucket(Bucket=BUCKET)
    return proc, server


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    require(
        importlib.util.find_spec("moto") is not None and importlib.util.find_spec("flask") is not None,
        "moto[server] is not installed (pip install -e '.[test]')",
    )
    proc, server = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        stop_process(proc)


def set_dummy_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials, and nothing from the developer's AWS setup."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "AWS_REGION", "KYROREPO_S3_PATH_STYLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", DUMMY_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DUMMY_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
