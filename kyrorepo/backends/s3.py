"""S3 backend over boto3, for AWS S3 and S3-compatible stores (MinIO, Ceph, R2, ...).

* Credentials: boto3's standard chain (environment, ``AWS_PROFILE``, config files,
  container and instance roles).
* Endpoint: ``endpoint`` argument, else ``$AWS_ENDPOINT_URL_S3``, else
  ``$AWS_ENDPOINT_URL``, else AWS. With a custom endpoint path-style addressing is
  the default (``$KYROREPO_S3_PATH_STYLE=0`` or ``path_style=False`` turns it off).
* Objects larger than ``MULTIPART_THRESHOLD`` are uploaded in parallel parts.
  PUT is atomic in S3, so ``save`` needs no temporary object.
* botocore retries a bounded number of times itself; what still fails is
  classified. The first request checks bucket, credentials and endpoint (a listing
  of at most one key under the prefix) so a misconfiguration is one clear permanent
  error. After that check succeeded, connection failures are transient.
"""

from __future__ import annotations

import io
import os
import re
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from boto3.s3.transfer import TransferConfig
from boto3.session import Session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)

from kyrorepo.backends.base import validate_name, validate_prefix
from kyrorepo.backends.url import S3Location
from kyrorepo.errors import (
    BackendError,
    ObjectNotFoundError,
    PermanentBackendError,
    TransientBackendError,
    UsageError,
)

ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
PATH_STYLE_ENV = "KYROREPO_S3_PATH_STYLE"
MULTIPART_THRESHOLD = 8 * 1024 * 1024
MULTIPART_CHUNK = 8 * 1024 * 1024
BOTO_MAX_ATTEMPTS = 3  # botocore's own attempts per request ("standard" retry mode)

_NOT_FOUND = {"NoSuchKey", "NotFound", "404"}
_TRANSIENT = {
    "SlowDown", "Throttling", "ThrottlingException", "TooManyRequests", "RequestTimeout",
    "RequestTimeoutException", "RequestLimitExceeded", "InternalError", "ServiceUnavailable",
    "OperationAborted", "503", "500", "502", "504",
}
_HINTS = {
    "NoSuchBucket": "create the bucket first, or check its name, the region and the endpoint",
    "AccessDenied": "check the policy: kyrorepo needs s3:ListBucket, s3:GetObject, "
    "s3:PutObject and s3:DeleteObject",
    "403": "access denied: check the credentials and the policy (s3:ListBucket, "
    "s3:GetObject, s3:PutObject, s3:DeleteObject)",
    "InvalidAccessKeyId": "the access key is unknown to this endpoint (check AWS_ACCESS_KEY_ID "
    "/ AWS_PROFILE and the endpoint)",
    "SignatureDoesNotMatch": "the secret key is wrong (check AWS_SECRET_ACCESS_KEY / AWS_PROFILE)",
    "PermanentRedirect": "the bucket is in another region: set AWS_REGION",
    "AuthorizationHeaderMalformed": "wrong region for this bucket: set AWS_REGION",
}


_ERRNO_TEXT = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


def _flag(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _connection_reason(exc: BaseException) -> str:
    """'Connection refused' rather than botocore's long repr of the urllib3 error."""
    match = _ERRNO_TEXT.search(str(getattr(exc, "kwargs", {}).get("error", exc)))
    return match.group(1).strip() if match else type(exc).__name__


class S3Backend:
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        path_style: bool | None = None,
        region: str | None = None,
        max_concurrency: int = 4,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._key_prefix = self.prefix + "/" if self.prefix else ""
        env_endpoint = next((os.environ[e] for e in ENDPOINT_ENVS if os.environ.get(e)), None)
        self.endpoint = endpoint or env_endpoint
        if self.endpoint and not self.endpoint.startswith(("http://", "https://")):
            raise UsageError(
                f"invalid S3 endpoint {self.endpoint!r}: it must start with http:// or https://"
            )
        if path_style is None:
            env = os.environ.get(PATH_STYLE_ENV)
            path_style = _flag(env) if env else bool(self.endpoint)
        self.path_style = path_style
        self.region = region
        self._transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=MULTIPART_CHUNK,
            max_concurrency=max_concurrency,
            use_threads=True,
        )
        self._pool_size = 10 + 2 * max_concurrency
        self._url = S3Location(bucket, self.prefix).url()
        self._lock = threading.Lock()
        self._client_obj: Any = None
        self._verified = False

    # --- client and error handling ----------------------------------------------------

    def _where(self) -> str:
        return f"{self._url} at {self.endpoint}" if self.endpoint else self._url

    def _client(self) -> Any:
        with self._lock:
            if self._client_obj is None:
                config = Config(
                    retries={"max_attempts": BOTO_MAX_ATTEMPTS, "mode": "standard"},
                    connect_timeout=10,
                    read_timeout=60,
                    max_pool_connections=self._pool_size,
                    s3={"addressing_style": "path" if self.path_style else "auto"},
                    user_agent_extra="kyrorepo",
                )
                try:
                    session = Session(region_name=self.region)
                    self._client_obj = session.client(
                        "s3", endpoint_url=self.endpoint, config=config
                    )
                except (BotoCoreError, ValueError) as exc:
                    raise PermanentBackendError(f"cannot set up S3 for {self._where()}: {exc}") from exc
            client = self._client_obj
        if not self._verified:
            self._verify(client)
        return client

    def _verify(self, client: Any) -> None:
        """Check endpoint, credentials and bucket with one small request."""
        try:
            client.list_objects_v2(Bucket=self.bucket, Prefix=self._key_prefix, MaxKeys=1)
        except BotoConnectionError as exc:
            raise PermanentBackendError(
                f"cannot connect to S3 endpoint {client.meta.endpoint_url} for {self._url} "
                f"({_connection_reason(exc)}, {BOTO_MAX_ATTEMPTS} attempts): check the "
                "endpoint (--s3-endpoint / AWS_ENDPOINT_URL)"
            ) from exc
        except Exception as exc:
            raise self._classify(exc, f"opening {self._where()}") from exc
        self._verified = True

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turn boto3 and botocore failures into classified backend errors."""
        try:
            yield
        except BackendError:
            raise
        except Exception as exc:
            raise self._classify(exc, what) from exc

    def _classify(self, exc: Exception, what: str) -> BackendError:
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            detail = f"{code} ({error['Message']})" if error.get("Message") else code
            if code in _NOT_FOUND:
                return ObjectNotFoundError(f"{what}: not found")
            if code in _TRANSIENT or status >= 500 or status == 429:
                return TransientBackendError(f"{what}: {detail} (HTTP {status})")
            hint = _HINTS.get(code)
            return PermanentBackendError(f"{what}: {detail}" + (f": {hint}" if hint else ""))
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return PermanentBackendError(
                f"{what}: no usable AWS credentials ({exc}): set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or use an instance role"
            )
        if isinstance(exc, BotoConnectionError):
            endpoint = self.endpoint or "the S3 endpoint"
            return TransientBackendError(
                f"{what}: cannot connect to {endpoint} ({_connection_reason(exc)})"
            )
        if isinstance(exc, (HTTPClientError, IncompleteReadError, OSError)):
            return TransientBackendError(f"{what}: {exc}")
        if isinstance(exc, BotoCoreError):
            return PermanentBackendError(f"{what}: {exc}")
        raise exc  # a programming error: let it through unchanged

    def _key(self, name: str) -> str:
        return self._key_prefix + validate_name(name)

    # --- Backend protocol -------------------------------------------------------------

    def save(self, name: str, data: bytes | memoryview) -> None:
        key = self._key(name)
        with self._errors(f"saving {name} to {self._where()}"):
            client = self._client()
            if len(data) < MULTIPART_THRESHOLD:
                client.put_object(Bucket=self.bucket, Key=key, Body=bytes(data))
            else:
                client.upload_fileobj(io.BytesIO(data), self.bucket, key, Config=self._transfer)

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        key = self._key(name)
        what = f"loading {name} from {self._where()}"
        if offset < 0 or (length is not None and length < 0):
            raise PermanentBackendError(f"{what}: invalid range {offset}+{length}")
        if length == 0:
            self.stat(name)  # a missing object must still raise ObjectNotFoundError
            return b""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            args["Range"] = f"bytes={offset}-{end}"
        with self._errors(what):
            try:
                response = self._client().get_object(**args)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                    return b""  # the range starts at or past the end
                raise
            body = response["Body"]
            try:
                data: bytes = body.read()
            finally:
                body.close()
        return data

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        validate_prefix(prefix)
        skip = len(self._key_prefix)
        with self._errors(f"listing {prefix!r} in {self._where()}"):
            paginator = self._client().get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key_prefix + prefix):
                for item in page.get("Contents", ()):
                    name = item["Key"][skip:]
                    try:
                        validate_name(name)
                    except PermanentBackendError:
                        continue  # not ours, e.g. a "folder/" marker made by a console
                    yield name, int(item["Size"])

    def stat(self, name: str) -> int:
        key = self._key(name)
        with self._errors(f"stat of {name} in {self._where()}"):
            response = self._client().head_object(Bucket=self.bucket, Key=key)
        return int(response["ContentLength"])

    def remove(self, name: str) -> None:
        key = self._key(name)
        with self._errors(f"removing {name} from {self._where()}"):
            client = self._client()
            client.head_object(Bucket=self.bucket, Key=key)  # deleting a missing key succeeds
            client.delete_object(Bucket=self.bucket, Key=key)

    def describe(self) -> str:
        return self._where()

    def close(self) -> None:
        with self._lock:
            client, self._client_obj = self._client_obj, None
            self._verified = False
        if client is not None:
            client.close()
