"""Key objects: the master key sealed under a passphrase-derived key (Argon2id).

A key file ``keys/<key id>`` is UTF-8 JSON (docs/format.md, "Key objects"):
``{"version", "kdf": "argon2id", "memory_kib", "iterations", "lanes", "salt",
"created", "host", "username", "nonce", "sealed_master"}`` with base64 byte fields.
The master key is sealed with AES-256-GCM under the Argon2id output; the associated
data binds the key file's version and id, so a key file cannot be renamed or altered.
Several key files may open one repository.
"""

from __future__ import annotations

import base64
import hashlib
import getpass
import json
import os
import socket
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from kyrorepo.crypto import MASTER_KEY_LEN, MasterKey
from kyrorepo.errors import IntegrityError, UsageError, WrongPasswordError
from kyrorepo.format import check_version

KEY_VERSION = 1
DEFAULT_MEMORY_KIB = 64 * 1024
DEFAULT_ITERATIONS = 3
DEFAULT_LANES = 1
MIN_MEMORY_KIB = 8


@dataclass(frozen=True)
class KdfParams:
    memory_kib: int = DEFAULT_MEMORY_KIB
    iterations: int = DEFAULT_ITERATIONS
    lanes: int = DEFAULT_LANES

    def validate(self) -> "KdfParams":
        if self.memory_kib < max(MIN_MEMORY_KIB, 8 * self.lanes) or self.iterations < 1 or self.lanes < 1:
            raise UsageError(f"invalid Argon2id parameters {self}: memory >= 8 KiB per lane, iterations >= 1")
        return self


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _derive(password: bytes, salt: bytes, params: KdfParams) -> bytes:
    kdf = Argon2id(salt=salt, length=32, iterations=params.iterations, lanes=params.lanes,
                   memory_cost=params.memory_kib)
    return kdf.derive(password)


def _ad(key_id: str) -> bytes:
    return f"kyrorepo key v{KEY_VERSION} {key_id}".encode()


def make_key_file(master: MasterKey, password: bytes, key_id: str, params: KdfParams) -> bytes:
    params.validate()
    salt = os.urandom(16)
    nonce = os.urandom(12)
    kek = _derive(password, salt, params)
    sealed = AESGCM(kek).encrypt(nonce, master.secret, _ad(key_id))
    doc = {
        "version": KEY_VERSION,
        "kdf": "argon2id",
        "memory_kib": params.memory_kib,
        "iterations": params.iterations,
        "lanes": params.lanes,
        "salt": _b64(salt),
        "created": int(time.time()),
        "host": socket.gethostname(),
        "username": getpass.getuser(),
        "nonce": _b64(nonce),
        "sealed_master": _b64(sealed),
    }
    doc["checksum"] = _checksum(doc)
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def _checksum(doc: dict) -> str:
    """SHA-256 over the canonical JSON of every other field: tells damage from a wrong passphrase."""
    body = {k: v for k, v in doc.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    created: int
    host: str
    username: str
    params: KdfParams


def parse_key_file(data: bytes, key_id: str) -> tuple[KeyInfo, dict]:
    what = f"key object keys/{key_id}"
    try:
        doc = json.loads(data.decode("utf-8"))
        if doc.get("checksum") != _checksum(doc):
            raise ValueError("checksum mismatch")
        check_version(int(doc["version"]), what)
        if doc["kdf"] != "argon2id":
            raise IntegrityError(f"{what}: unknown KDF {doc['kdf']!r}")
        params = KdfParams(int(doc["memory_kib"]), int(doc["iterations"]), int(doc["lanes"]))
        info = KeyInfo(key_id, int(doc["created"]), str(doc["host"]), str(doc["username"]), params)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{what} is damaged ({exc.__class__.__name__}): use another key or a copy") from None
    return info, doc


def open_key_file(data: bytes, key_id: str, password: bytes) -> MasterKey:
    """Return the master key, or raise WrongPasswordError / IntegrityError."""
    info, doc = parse_key_file(data, key_id)
    try:
        salt, nonce, sealed = _unb64(doc["salt"]), _unb64(doc["nonce"]), _unb64(doc["sealed_master"])
    except (ValueError, KeyError) as exc:
        raise IntegrityError(f"key object keys/{key_id} is damaged ({exc})") from None
    kek = _derive(password, salt, info.params.validate())
    try:
        secret = AESGCM(kek).decrypt(nonce, sealed, _ad(key_id))
    except InvalidTag:
        raise WrongPasswordError("wrong passphrase") from None
    if len(secret) != MASTER_KEY_LEN:
        raise IntegrityError(f"key object keys/{key_id} holds a master key of the wrong length")
    return MasterKey(secret)


def key_opens(data: bytes, key_id: str, password: bytes) -> bool:
    """Whether ``password`` opens this key object (a damaged one opens with nothing)."""
    try:
        open_key_file(data, key_id, password)
    except (WrongPasswordError, IntegrityError):
        return False
    return True
