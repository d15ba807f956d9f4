"""Artifact store: one API over a local folder (or PVC mount) and ``s3://bucket/prefix``.

Keys are ``/``-separated paths relative to the store root, e.g. ``demo/prepare/train.jsonl``.

Atomicity: locally every write goes to a temp file in the same folder and is renamed into place; on S3 an
object becomes visible only when its PUT (or multipart upload) completes, and a failed multipart upload is
aborted, so a reader never sees a partial object (uploads a killed process left open are aborted by the next
stage of that run: ``abort_open_uploads``).

Outages: every S3 request has connect/read timeouts and botocore's adaptive retries; on top of that each
operation is retried with backoff (logged) until ``S3Settings.retry_seconds`` have passed, then fails with a
StoreError saying what failed and for how long it was retried.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO, Any

from common.core.faults import fault_point
from common.core.files import atomic_dir, atomic_path, atomic_write_bytes, publish_dir  # noqa: F401 (re-exported)
from common.core.settings import S3Settings

log = logging.getLogger(__name__)

CHUNK = 8 * 1024 * 1024  # 8 MiB: read/hash chunk and S3 multipart part size (S3 minimum part is 5 MiB)
BOTO_ATTEMPTS = 3  # botocore's own (adaptive) attempts per request; the store's retry budget is on top of them
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0  # seconds between the store's retries: doubling, capped
RETRYABLE_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
                   "Throttling", "ThrottlingException", "RequestTimeTooSkewed", "BadGateway", "GatewayTimeout"}


class StoreError(Exception):
    """A store operation failed; the message says which URI and what to check."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_key(key: str) -> str:
    parts = PurePosixPath(key).parts
    if not key or key.startswith("/") or ".." in parts:
        raise StoreError(f"invalid artifact key {key!r}: expected a relative path without '..'")
    return str(PurePosixPath(*parts))


class Store:
    """Common API; ``open_store`` returns a LocalStore or an S3Store."""

    uri: str

    def join(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in parts if p)

    def uri_for(self, key: str) -> str:
        return self.uri.rstrip("/") + "/" + _check_key(key)

    # Text/JSON helpers shared by both backends.
    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def write_json(self, key: str, obj: Any) -> None:
        self.write_bytes(key, (json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=False) + "\n").encode())

    # Backends implement these.
    def exists(self, key: str) -> bool: raise NotImplementedError
    def read_bytes(self, key: str) -> bytes: raise NotImplementedError
    def write_bytes(self, key: str, data: bytes) -> None: raise NotImplementedError
    def put_file(self, local: Path, key: str) -> None: raise NotImplementedError
    def get_file(self, key: str, local: Path) -> None: raise NotImplementedError
    def list(self, prefix: str = "") -> list[str]: raise NotImplementedError
    def delete_prefix(self, prefix: str) -> None: raise NotImplementedError
    def local_path(self, key: str) -> Path | None:
        """The file system path of ``key`` when the store is local, else None."""
        return None

    def put_dir(self, local: Path, prefix: str) -> list[str]:
        keys = []
        for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            key = self.join(prefix, path.relative_to(local).as_posix())
            self.put_file(path, key)
            keys.append(key)
        return keys

    def get_dir(self, prefix: str, local: Path) -> Path:
        """Download every file under ``prefix`` into ``local``; files already there are kept as they are."""
        base = prefix.strip("/")
        for key in self.list(prefix):
            rel = key[len(base) + 1:] if base else key
            dest = Path(local) / rel
            if not dest.exists():
                self.get_file(key, dest)
        return Path(local)


class LocalStore(Store):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _p(self, key: str) -> Path:
        return self.root / _check_key(key)

    def local_path(self, key: str) -> Path:
        return self._p(key)

    def uri_for(self, key: str) -> str:
        return str(self._p(key))

    def exists(self, key: str) -> bool:
        return self._p(key).exists()

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._p(key).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"{self._p(key)} does not exist") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        atomic_write_bytes(self._p(key), data)

    def put_file(self, local: Path, key: str) -> None:
        dest = self._p(key)
        if Path(local).resolve() == dest:
            return
        with atomic_path(dest) as tmp:
            shutil.copyfile(local, tmp)

    def get_file(self, key: str, local: Path) -> None:
        src = self._p(key)
        if not src.exists():
            raise StoreError(f"{src} does not exist")
        with atomic_path(Path(local)) as tmp:
            shutil.copyfile(src, tmp)

    def list(self, prefix: str = "") -> list[str]:
        base = self._p(prefix) if prefix else self.root
        if not base.exists():
            return []
        if base.is_file():
            return [_check_key(prefix)]
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".")  # temp files are ".<name>.<random>.tmp"
        )

    def delete_prefix(self, prefix: str) -> None:
        path = self._p(prefix)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class S3Store(Store):
    def __init__(self, uri: str, s3: S3Settings | None = None, client: Any = None):
        rest = uri[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StoreError(f"{uri!r}: expected s3://bucket/optional/prefix")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        s3 = s3 or S3Settings()
        self.retry_seconds = s3.retry_seconds
        self.client = client or make_s3_client(s3)

    def _k(self, key: str) -> str:
        key = _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _wrap(self, err: Exception, key: str, action: str, waited: float = 0.0) -> StoreError:
        retried = f" (retried for {waited:.0f} s, the limit ASRFT_S3__RETRY_SECONDS)" if waited else ""
        return StoreError(
            f"S3 {action} of s3://{self.bucket}/{self._k(key)} failed{retried}: {err}. Check the bucket exists, "
            "the credentials (ASRFT_S3__ACCESS_KEY_ID / AWS_ACCESS_KEY_ID), ASRFT_S3__ENDPOINT_URL and the network; "
            "then re-run the same command (finished work is kept)."
        )

    def _retry(self, action: str, key: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, retried with backoff through transient errors (connection, timeouts, 5xx, throttling) until
        ``retry_seconds`` have passed; then (or on any other error) a StoreError naming the request."""
        start = time.monotonic()
        delay = BACKOFF_FIRST
        while True:
            try:
                return fn()
            except _boto_errors() as e:
                waited = time.monotonic() - start
                if not _retryable(e):
                    raise self._wrap(e, key, action) from None
                if waited + delay > self.retry_seconds:
                    raise self._wrap(e, key, action, waited) from None
                log.warning("S3 %s of s3://%s/%s failed (%s); retrying in %.0f s (%.0f of %.0f s spent)", action,
                            self.bucket, self._k(key), _short(e), delay, waited, self.retry_seconds)
                time.sleep(delay)  # back-off between retries of a failed request
                delay = min(delay * 2, BACKOFF_MAX)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        def head() -> bool:
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._k(key))
                return True
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise

        return self._retry("HEAD", key, head)

    def read_bytes(self, key: str) -> bytes:
        return self._retry("GET", key, lambda: self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read())

    def write_bytes(self, key: str, data: bytes) -> None:
        fault_point("store.put")
        # a single PUT: the object appears whole or not at all
        self._retry("PUT", key, lambda: self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data))

    def put_stream(self, stream: IO[bytes], key: str) -> None:
        """Multipart upload from a stream; aborted on any error, so no partial object is ever visible."""
        fault_point("store.put")
        k = self._k(key)
        upload_id = self._retry("start of a multipart upload", key, lambda: self.client.create_multipart_upload(
            Bucket=self.bucket, Key=k)["UploadId"])
        parts = []
        try:
            number = 1
            while True:
                chunk = _read_full(stream, CHUNK)
                if not chunk and parts:
                    break
                # each part is retried on its own through an outage (S3 needs at least one part, maybe empty)
                etag = self._retry(f"upload of part {number}", key, lambda chunk=chunk, number=number:
                                   self.client.upload_part(Bucket=self.bucket, Key=k, UploadId=upload_id,
                                                           PartNumber=number, Body=chunk)["ETag"])
                parts.append({"ETag": etag, "PartNumber": number})
                number += 1
                if not chunk:
                    break
            fault_point("store.complete_multipart")
            self._retry("completion of the multipart upload", key, lambda: self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=k, UploadId=upload_id, MultipartUpload={"Parts": parts}))
        except BaseException:
            with contextlib.suppress(StoreError):  # if this fails too, the next stage of the run aborts it
                self._retry("abort of the multipart upload", key,
                            lambda: self.client.abort_multipart_upload(Bucket=self.bucket, Key=k, UploadId=upload_id))
            raise

    def put_file(self, local: Path, key: str) -> None:
        size = Path(local).stat().st_size
        if size <= CHUNK:
            self.write_bytes(key, Path(local).read_bytes())
            return
        with open(local, "rb") as f:
            self.put_stream(f, key)

    def get_file(self, key: str, local: Path) -> None:
        with atomic_path(Path(local)) as tmp:
            self._retry("download", key, lambda: self.client.download_file(self.bucket, self._k(key), str(tmp)))

    def abort_open_uploads(self, prefix: str) -> int:
        """Abort the multipart uploads under ``prefix`` that a killed process left open (S3 bills their parts);
        call it only while holding the run's lock, so none of them is a live upload. Returns how many."""
        full = self._k(prefix).rstrip("/") + "/"
        uploads = self._retry("LIST of open multipart uploads", prefix, lambda: self.client.list_multipart_uploads(
            Bucket=self.bucket, Prefix=full).get("Uploads", []))
        for up in uploads:
            self._retry("abort of a stale multipart upload", prefix, lambda up=up: self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"]))
        if uploads:
            log.info("aborted %d multipart upload(s) an interrupted earlier run left open under s3://%s/%s",
                     len(uploads), self.bucket, full)
        return len(uploads)

    def list(self, prefix: str = "") -> list[str]:
        full = self._k(prefix) if prefix else self.prefix
        full = full.rstrip("/") + "/" if full else ""
        strip = len(self.prefix) + 1 if self.prefix else 0
        def listing() -> list[str]:
            paginator = self.client.get_paginator("list_objects_v2")
            return [obj["Key"][strip:] for page in paginator.paginate(Bucket=self.bucket, Prefix=full)
                    for obj in page.get("Contents", [])]

        keys = self._retry("LIST", prefix, listing)
        if prefix and not keys and self.exists(prefix):
            return [_check_key(prefix)]
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> None:
        keys = self.list(prefix)
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self._k(k)} for k in keys[i:i + 1000]]
            errors = self._retry("DELETE", prefix, lambda batch=batch: self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}).get("Errors", []))
            if errors:  # Quiet mode reports only the keys that failed
                raise StoreError(
                    f"S3 DELETE under s3://{self.bucket}/{self._k(prefix)} failed for {len(errors)} key(s), e.g. "
                    f"{errors[0].get('Key')}: {errors[0].get('Message')}. Check the credentials allow s3:DeleteObject."
                )


def _boto_errors() -> tuple[type[Exception], ...]:
    """Errors of a request (ClientError) and of the client itself (no credentials, endpoint unreachable)."""
    from botocore.exceptions import BotoCoreError, ClientError

    return ClientError, BotoCoreError


def _retryable(err: Exception) -> bool:
    """A transient error worth retrying: no connection, a timeout, a dropped connection, 5xx, throttling."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, ReadTimeoutError

    if isinstance(err, ClientError):
        error = err.response.get("Error", {})
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return str(error.get("Code")) in RETRYABLE_CODES or status >= 500
    try:
        from botocore.exceptions import ResponseStreamingError

        streaming: tuple[type[Exception], ...] = (ResponseStreamingError,)
    except ImportError:
        streaming = ()
    return isinstance(err, (ConnectionError, HTTPClientError, ReadTimeoutError, *streaming))


def _short(err: Exception) -> str:
    text = str(err)
    return text if len(text) < 200 else text[:200] + "…"


def _read_full(stream: IO[bytes], size: int) -> bytes:
    """Up to ``size`` bytes; fewer only at the end. Pipes and sockets return short reads, and S3 rejects a
    non-final part under 5 MiB, so parts are filled up before they are sent."""
    buf = bytearray()
    while len(buf) < size and (data := stream.read(size - len(buf))):
        buf += data
    return bytes(buf)


def make_s3_client(s3: S3Settings):
    import boto3
    from botocore.config import Config

    def secret(v):
        return v.get_secret_value() if v is not None else None

    # its own session: credentials resolved for this client, not cached process-wide by boto3's default session
    return boto3.session.Session().client(
        "s3",
        endpoint_url=s3.endpoint_url,
        region_name=s3.region,
        aws_access_key_id=secret(s3.access_key_id),
        aws_secret_access_key=secret(s3.secret_access_key),
        aws_session_token=secret(s3.session_token),
        config=Config(s3={"addressing_style": s3.addressing_style},
                      retries={"max_attempts": BOTO_ATTEMPTS, "mode": "adaptive"},
                      connect_timeout=s3.connect_timeout, read_timeout=s3.read_timeout),
    )


def open_store(uri: str, s3: S3Settings | None = None) -> Store:
    if uri.startswith("s3://"):
        return S3Store(uri, s3)
    if "://" in uri and not uri.startswith("file://"):
        raise StoreError(f"unsupported artifacts URI {uri!r}: use a folder path or s3://bucket/prefix")
    return LocalStore(uri.removeprefix("file://"))


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://b/p/x/y.wav`` → (``s3://b``, ``p/x/y.wav``); a local path → (parent folder, file name)."""
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://"):].partition("/")
        return f"s3://{bucket}", key
    p = Path(uri)
    return str(p.parent), p.name
