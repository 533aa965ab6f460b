"""SFTP backend over paramiko.

* Authentication: ssh-agent and the default keys in ``~/.ssh`` (paramiko's
  ``allow_agent``/``look_for_keys``), plus an explicit identity file given as
  ``key_filename`` or ``$KYROREPO_SFTP_KEY``. Passwords are not supported.
* Host keys are checked against ``$KYROREPO_SSH_KNOWN_HOSTS`` (default
  ``~/.ssh/known_hosts`` plus ``/etc/ssh/ssh_known_hosts``); an unknown or changed key
  is a ``PermanentBackendError`` whose one line says how to fix it.
* Atomic save: write ``.tmp-<random>`` in the target directory (created 0700 as
  needed), chmod 0600, fsync (``fsync@openssh.com`` when the server has it), then
  ``posix-rename@openssh.com`` over the name.
* Threads share one SSH connection with up to ``max_channels`` SFTP channels, each
  used by one thread at a time. A dropped connection raises
  ``TransientBackendError`` and the next call reconnects. Failing to establish the
  very first connection is permanent (wrong host or port, server down); once a
  connection has worked, connection failures are transient.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import logging
import os
import posixpath
import secrets
import stat
import threading
from contextlib import contextmanager
from typing import Iterator

import paramiko
from paramiko.sftp import CMD_EXTENDED

from kyrorepo.backends.base import validate_name, validate_prefix
from kyrorepo.backends.url import SFTP_DEFAULT_PORT, SftpLocation
from kyrorepo.errors import (
    BackendError,
    ObjectNotFoundError,
    PermanentBackendError,
    TransientBackendError,
)

# paramiko logs transport errors itself; without a handler Python would print them
# to stderr next to our own one-line error. Applications can still attach handlers.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

KEY_ENV = "KYROREPO_SFTP_KEY"
KNOWN_HOSTS_ENV = "KYROREPO_SSH_KNOWN_HOSTS"
SYSTEM_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"
_TMP_PREFIX = ".tmp-"
_READ_AHEAD = 64  # concurrent read requests for large loads
_NETWORK_ERRORS = (OSError, EOFError, paramiko.SSHException, paramiko.SFTPError)


def key_fingerprint(key: paramiko.PKey) -> str:
    """The OpenSSH-style ``SHA256:...`` fingerprint of a key."""
    digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode()
    return "SHA256:" + digest.rstrip("=")


def _reason(exc: BaseException) -> str:
    errors = getattr(exc, "errors", None)  # paramiko.NoValidConnectionsError
    if isinstance(errors, dict) and errors:
        exc = next(iter(errors.values()))
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).rstrip(": ") or type(exc).__name__


def _quiet_close(resource: paramiko.SFTPClient | paramiko.SSHClient) -> None:
    try:
        resource.close()
    except Exception:  # closing a dead connection may fail in many ways
        pass


class _UnknownHostKey(paramiko.SSHException):
    def __init__(self, hostname: str, key: paramiko.PKey) -> None:
        super().__init__(hostname)
        self.hostname = hostname
        self.key = key


class _RejectUnknownHost(paramiko.MissingHostKeyPolicy):
    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise _UnknownHostKey(hostname, key)


class _Connection:
    """One SSH transport and its idle SFTP channels."""

    def __init__(self, client: paramiko.SSHClient) -> None:
        self.client = client
        self.idle: list[paramiko.SFTPClient] = []

    def alive(self) -> bool:
        transport = self.client.get_transport()
        return transport is not None and transport.is_active()

    def close(self) -> None:
        for sftp in self.idle:
            _quiet_close(sftp)
        self.idle.clear()
        _quiet_close(self.client)


class SftpBackend:
    def __init__(
        self,
        host: str,
        path: str,
        *,
        user: str | None = None,
        port: int = SFTP_DEFAULT_PORT,
        key_filename: str | None = None,
        known_hosts: str | None = None,
        max_channels: int = 4,
        timeout: float = 30.0,
    ) -> None:
        self.host = host
        self.port = port
        self.user = user
        self.root = path.rstrip("/") or ("/" if path.startswith("/") else "")
        key = key_filename or os.environ.get(KEY_ENV) or None
        self.key_filename = os.path.expanduser(key) if key else None
        explicit_known_hosts = known_hosts or os.environ.get(KNOWN_HOSTS_ENV) or None
        self.known_hosts = os.path.expanduser(explicit_known_hosts or "~/.ssh/known_hosts")
        self._use_system_known_hosts = explicit_known_hosts is None
        self.timeout = timeout
        self._url = SftpLocation(host=host, path=self.root, user=user, port=port).url()
        self._slots = threading.BoundedSemaphore(max_channels)
        self._lock = threading.Lock()
        self._conn: _Connection | None = None
        self._connected_once = False
        self._fsync_supported = True

    # --- connection management ----------------------------------------------------

    def _connect(self) -> _Connection:
        if self.key_filename and not os.path.isfile(self.key_filename):
            raise PermanentBackendError(
                f"SSH identity file {self.key_filename} does not exist (set with {KEY_ENV})"
            )
        client = paramiko.SSHClient()
        try:
            if self._use_system_known_hosts and os.path.isfile(SYSTEM_KNOWN_HOSTS):
                client.load_system_host_keys(SYSTEM_KNOWN_HOSTS)
            if os.path.isfile(self.known_hosts):
                client.load_host_keys(self.known_hosts)
        except (OSError, paramiko.SSHException) as exc:
            raise PermanentBackendError(
                f"cannot read SSH known_hosts file {self.known_hosts}: {_reason(exc)}"
            ) from exc
        client.set_missing_host_key_policy(_RejectUnknownHost())
        try:
            client.connect(
                self.host,
                port=self.port,
                username=self.user,
                key_filename=self.key_filename,
                allow_agent=True,
                look_for_keys=True,
                timeout=self.timeout,
                banner_timeout=self.timeout,
                auth_timeout=self.timeout,
                channel_timeout=self.timeout,
            )
        except Exception as exc:
            _quiet_close(client)
            raise self._connect_error(exc) from exc
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(30)
        self._connected_once = True
        return _Connection(client)

    def _connect_error(self, exc: Exception) -> BackendError:
        if isinstance(exc, _UnknownHostKey):
            target = self.host if self.port == SFTP_DEFAULT_PORT else f"-p {self.port} {self.host}"
            return PermanentBackendError(
                f"SSH host key of {exc.hostname} is unknown (not in {self.known_hosts}); the "
                f"server offered {exc.key.get_name()} {key_fingerprint(exc.key)}. If that is "
                f"the server's key, add it with: ssh-keyscan {target} >> {self.known_hosts}"
            )
        if isinstance(exc, paramiko.BadHostKeyException):
            return PermanentBackendError(
                f"SSH host key of {exc.hostname} does NOT match {self.known_hosts} (got "
                f"{key_fingerprint(exc.key)}, expected {key_fingerprint(exc.expected_key)}): "
                "possible man-in-the-middle attack; if the key really changed, remove the old "
                f"entry with: ssh-keygen -f {self.known_hosts} -R '{exc.hostname}'"
            )
        if isinstance(exc, paramiko.PasswordRequiredException):
            return PermanentBackendError(
                f"SSH key for {self._url} is encrypted: load it into ssh-agent (ssh-add) first"
            )
        no_method = isinstance(exc, paramiko.SSHException) and "authentication methods" in str(exc)
        if isinstance(exc, paramiko.AuthenticationException) or no_method:
            tried = "ssh-agent, ~/.ssh keys" + (f", {self.key_filename}" if self.key_filename else "")
            return PermanentBackendError(
                f"SSH authentication to {self._url} failed ({_reason(exc)}; tried {tried}): "
                f"authorize your public key on the server or set {KEY_ENV} to the identity file"
            )
        message = f"cannot connect to {self._url}: {_reason(exc)}"
        if isinstance(exc, _NETWORK_ERRORS) and self._connected_once:
            return TransientBackendError(message)
        return PermanentBackendError(message + " (check host, port and that sshd is running)")

    def _checkout(self, what: str) -> tuple[_Connection, paramiko.SFTPClient]:
        stale: _Connection | None = None
        with self._lock:
            conn = self._conn
            if conn is not None and not conn.alive():
                stale, conn, self._conn = conn, None, None
            if conn is None:
                conn = self._conn = self._connect()
            sftp = conn.idle.pop() if conn.idle else None
        if stale is not None:
            stale.close()
        if sftp is not None:
            return conn, sftp
        try:
            sftp = conn.client.open_sftp()
        except _NETWORK_ERRORS as exc:
            if not conn.alive():
                self._drop(conn)
            raise TransientBackendError(
                f"{what}: cannot open an SFTP channel ({_reason(exc)}; is the sftp subsystem "
                "enabled on the server?)"
            ) from exc
        sftp.get_channel().settimeout(self.timeout)
        return conn, sftp

    def _checkin(self, conn: _Connection, sftp: paramiko.SFTPClient, reusable: bool) -> None:
        with self._lock:
            if reusable and conn is self._conn and conn.alive():
                conn.idle.append(sftp)
                return
        _quiet_close(sftp)

    def _drop(self, conn: _Connection) -> None:
        with self._lock:
            if self._conn is conn:
                self._conn = None
        conn.close()

    @contextmanager
    def _channel(self, what: str) -> Iterator[paramiko.SFTPClient]:
        """Borrow an SFTP channel; classify what goes wrong while it is used."""
        with self._slots:
            conn, sftp = self._checkout(what)
            lost = True  # also when interrupted: the channel's state is unknown
            try:
                yield sftp
                lost = False
            except BackendError:
                lost = False
                raise
            except _NETWORK_ERRORS as exc:
                lost = self._lost(exc, conn, sftp)
                if lost:
                    raise TransientBackendError(f"{what}: connection lost ({_reason(exc)})") from exc
                if isinstance(exc, FileNotFoundError):
                    raise ObjectNotFoundError(f"{what}: not found") from exc
                raise PermanentBackendError(f"{what}: {_reason(exc)}") from exc
            finally:
                self._checkin(conn, sftp, reusable=not lost)

    def _lost(self, exc: BaseException, conn: _Connection, sftp: paramiko.SFTPClient) -> bool:
        """Whether ``exc`` broke the channel (else it is an SFTP status like ENOENT)."""
        lost = (
            not isinstance(exc, OSError)
            or isinstance(exc, (TimeoutError, ConnectionError))
            or sftp.get_channel().closed
            or not conn.alive()
        )
        if lost and (isinstance(exc, TimeoutError) or not conn.alive()):
            self._drop(conn)  # a timeout on a live transport: the peer may be gone
        return lost

    # --- paths ----------------------------------------------------------------------

    def _join(self, relative: str) -> str:
        if not relative:
            return self.root or "."
        if not self.root:
            return relative
        return posixpath.join(self.root, relative)

    def _path(self, name: str) -> str:
        return self._join(validate_name(name))

    def _makedirs(self, sftp: paramiko.SFTPClient, directory: str) -> None:
        """Create ``directory`` and its missing parents, mode 0700."""
        missing = []
        while directory not in ("", ".", "/") and not self._is_dir(sftp, directory):
            missing.append(directory)
            directory = posixpath.dirname(directory)
        for path in reversed(missing):
            try:
                sftp.mkdir(path, 0o700)
            except OSError:
                if not self._is_dir(sftp, path):  # else another thread made it
                    raise

    def _open_in_new_dir(
        self, sftp: paramiko.SFTPClient, tmp: str, directory: str
    ) -> paramiko.SFTPFile:
        try:
            self._makedirs(sftp, directory)
            return sftp.open(tmp, "wx")
        except FileNotFoundError as exc:
            raise PermanentBackendError(
                f"cannot create directory {directory} on {self.host}: a parent is missing "
                "or not a directory"
            ) from exc

    @staticmethod
    def _is_dir(sftp: paramiko.SFTPClient, path: str) -> bool:
        try:
            return stat.S_ISDIR(sftp.stat(path).st_mode or 0)
        except FileNotFoundError:
            return False

    def _fsync(self, sftp: paramiko.SFTPClient, handle: bytes) -> None:
        if not self._fsync_supported:
            return
        try:
            # paramiko has no public fsync; this sends the OpenSSH extension request.
            sftp._request(CMD_EXTENDED, "fsync@openssh.com", handle)
        except OSError as exc:
            if exc.errno is None and "unsupported" in str(exc).lower():
                self._fsync_supported = False
                return
            raise

    @staticmethod
    def _discard(sftp: paramiko.SFTPClient, tmp: str, cause: BaseException) -> None:
        if isinstance(cause, (TimeoutError, EOFError, paramiko.SSHException)):
            return  # the channel is unusable; a stray .tmp- file is never listed
        try:
            sftp.remove(tmp)
        except Exception:  # best effort, see above
            pass

    # --- Backend protocol -------------------------------------------------------------

    def save(self, name: str, data: bytes | memoryview) -> None:
        path = self._path(name)
        directory = posixpath.dirname(path)
        tmp = posixpath.join(directory, _TMP_PREFIX + secrets.token_hex(8))
        payload = bytes(data)
        with self._channel(f"saving {name} to {self._url}") as sftp:
            try:
                try:
                    f = sftp.open(tmp, "wx")
                except FileNotFoundError:
                    f = self._open_in_new_dir(sftp, tmp, directory)
                with f:
                    f.chmod(0o600)
                    f.set_pipelined(True)
                    f.write(payload)
                    f.flush()
                    self._fsync(sftp, f.handle)
                sftp.posix_rename(tmp, path)
            except BaseException as exc:
                if not sftp.get_channel().closed:
                    self._discard(sftp, tmp, exc)
                raise

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(name)
        if offset < 0 or (length is not None and length < 0):
            raise PermanentBackendError(f"invalid range {offset}+{length} for {name}")
        with self._channel(f"loading {name} from {self._url}") as sftp:
            with sftp.open(path, "rb") as f:
                size = f.stat().st_size or 0
                end = size if length is None else min(size, offset + length)
                if end <= offset:
                    return b""
                if end - offset <= f.MAX_REQUEST_SIZE:
                    f.seek(offset)
                    data = f.read(end - offset)
                else:
                    data = b"".join(f.readv([(offset, end - offset)], _READ_AHEAD))
        if len(data) != end - offset:
            raise TransientBackendError(
                f"loading {name} from {self._url}: short read ({len(data)} of {end - offset} bytes)"
            )
        return data

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        validate_prefix(prefix)
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        with self._channel(f"listing {prefix!r} in {self._url}") as sftp:
            found = self._walk(sftp, base, prefix)
        yield from found

    def _walk(self, sftp: paramiko.SFTPClient, start: str, prefix: str) -> "builtins.list[tuple[str, int]]":
        found: builtins.list[tuple[str, int]] = []
        pending = [start]
        while pending:
            directory = pending.pop()
            try:
                entries = sftp.listdir_attr(self._join(directory))
            except FileNotFoundError:
                continue
            for entry in entries:
                name = f"{directory}/{entry.filename}" if directory else entry.filename
                if entry.filename.startswith(_TMP_PREFIX):
                    continue
                try:
                    validate_name(name)
                except PermanentBackendError:
                    continue  # not ours: a name kyrorepo never writes
                mode = entry.st_mode or 0
                if stat.S_ISDIR(mode):
                    if (name + "/").startswith(prefix) or prefix.startswith(name + "/"):
                        pending.append(name)
                elif stat.S_ISREG(mode) and name.startswith(prefix):
                    found.append((name, entry.st_size or 0))
        return found

    def stat(self, name: str) -> int:
        path = self._path(name)
        with self._channel(f"stat of {name} in {self._url}") as sftp:
            attrs = sftp.stat(path)
        if stat.S_ISDIR(attrs.st_mode or 0):
            raise ObjectNotFoundError(f"stat of {name} in {self._url}: not found (a directory)")
        return attrs.st_size or 0

    def remove(self, name: str) -> None:
        path = self._path(name)
        with self._channel(f"removing {name} from {self._url}") as sftp:
            sftp.remove(path)

    def describe(self) -> str:
        return self._url

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
