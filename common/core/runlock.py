"""One run per run-id at a time: a lock held while a stage (or ``asr-ft run``) works on ``<artifacts>/<run-id>/``.

    with run_lock(store, run_id, "finetune", ttl=300):   # RunLocked at once if another process holds it
        ...

- Local folder / PVC: an OS file lock (``fcntl.flock``) on ``<run-id>/.asr-ft.lock``; the file also names the
  holder (host, pid, stage, since). The kernel drops the lock when the holder dies, so a crashed run never
  blocks the next one.
- S3: a lease object ``<run-id>/_lock.json`` created with a conditional put (``If-None-Match: *``): only one
  writer can create it. The holder renews it (``If-Match`` its own version) every third of ``ttl``; a lease
  not renewed for ``ttl`` seconds (a killed pod) is stale and is taken over with a conditional put on the stale
  version, so two runs taking over at once cannot both win.

``asr-ft run`` takes the lock for the whole pipeline and passes its token to its steps (ASRFT_RUN_LOCK_TOKEN):
a step whose token matches the holder's works under its parent's lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger(__name__)

TOKEN_ENV = "ASRFT_RUN_LOCK_TOKEN"
LOCAL_LOCK = ".asr-ft.lock"  # hidden: never listed as an output
S3_LEASE = "_lock.json"


class RunLocked(Exception):
    """Another process works on this run-id; the message names it and since when."""


def _holder(stage: str, token: str, ttl: float | None = None) -> dict[str, Any]:
    now = time.time()
    info = {"stage": stage, "host": socket.gethostname(), "pid": os.getpid(), "token": token,
            "since": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"), "since_epoch": now}
    if ttl is not None:
        info["expires_epoch"] = now + ttl
    return info


def _refusal(run_id: str, where: str, info: dict[str, Any]) -> RunLocked:
    who = (f"'{info.get('stage', '?')}' (pid {info.get('pid', '?')} on {info.get('host', '?')}) since "
           f"{info.get('since', '?')}") if info else "another process"
    return RunLocked(f"run '{run_id}' is in use by {who} ({where}). Wait for it to finish, stop it, or use another "
                     "--run-id; two runs on one run-id would overwrite each other's outputs")


@contextlib.contextmanager
def run_lock(store, run_id: str, stage: str, ttl: float = 300.0) -> Iterator[str]:
    """Hold the run's lock while the block runs; yields the token (pass it to child steps as TOKEN_ENV)."""
    parent = os.environ.get(TOKEN_ENV) or None
    local = store.local_path(store.join(run_id))
    if local is not None:
        with _local_lock(local / LOCAL_LOCK, run_id, stage, parent) as token:
            yield token
    else:
        with _s3_lease(store, store.join(run_id, S3_LEASE), run_id, stage, parent, ttl) as token:
            yield token


@contextlib.contextmanager
def _local_lock(path, run_id: str, stage: str, parent: str | None) -> Iterator[str]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read_json_fd(fd)
            if parent and info.get("token") == parent:  # our `asr-ft run` holds it
                yield parent
                return
            raise _refusal(run_id, str(path), info) from None
        token = uuid.uuid4().hex
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder(stage, token)).encode(), 0)
        try:
            yield token
        finally:
            os.ftruncate(fd, 0)  # the holder's name goes with the lock (unlocked by close)
    finally:
        os.close(fd)


def _read_json_fd(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 65536, 0)
        return json.loads(data) if data else {}
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def _s3_lease(store, key: str, run_id: str, stage: str, parent: str | None, ttl: float) -> Iterator[str]:
    lease = _S3Lease(store, key, run_id, stage, ttl)
    token = lease.acquire(parent)
    if token == parent:
        yield token
        return
    try:
        yield token
    finally:
        lease.release()


class _S3Lease:
    def __init__(self, store, key: str, run_id: str, stage: str, ttl: float):
        self.store, self.key, self.run_id, self.stage, self.ttl = store, key, run_id, stage, ttl
        self.client, self.bucket, self.full = store.client, store.bucket, store._k(key)
        self.token = uuid.uuid4().hex
        self.etag: str | None = None
        self.info: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _put(self, **condition) -> str:
        self.info = {**_holder(self.stage, self.token, self.ttl),
                     **({"since": self.info["since"], "since_epoch": self.info["since_epoch"]} if self.info else {})}
        return self.client.put_object(Bucket=self.bucket, Key=self.full, Body=json.dumps(self.info).encode(),
                                      ContentType="application/json", **condition)["ETag"]

    def _call(self, what: str, fn) -> tuple[str, Any]:
        """``fn()`` through the store's retries (outages); ("ok", result), ("conflict", None) when a condition
        failed (someone else's lease), ("missing", None) when the object is gone."""
        from botocore.exceptions import ClientError

        def call() -> tuple[str, Any]:
            try:
                return "ok", fn()
            except ClientError as e:
                if _code(e) in CONFLICT:
                    return "conflict", None
                if _code(e) in MISSING:
                    return "missing", None
                raise

        return self.store._retry(what, self.key, call)

    def acquire(self, parent: str | None) -> str:
        for _attempt in range(3):
            status, etag = self._call("PUT of the run lock", lambda: self._put(IfNoneMatch="*"))
            if status == "ok":
                self.etag = etag
                break
            status, got = self._call("GET of the run lock", lambda: self.client.get_object(
                Bucket=self.bucket, Key=self.full))
            if status != "ok":
                continue  # released meanwhile: try to create it again
            try:
                held = json.loads(got["Body"].read())
            except ValueError:
                held = {}
            if parent and held.get("token") == parent:
                return parent
            if held.get("expires_epoch", 0) > time.time():
                raise _refusal(self.run_id, self.store.uri_for(self.key), held)
            log.warning("taking over the stale lock %s of %s (not renewed since it expired at %s)",
                        self.store.uri_for(self.key), held.get("stage", "?"),
                        datetime.fromtimestamp(held.get("expires_epoch", 0), UTC).isoformat(timespec="seconds"))
            status, etag = self._call("PUT of the run lock", lambda got=got: self._put(IfMatch=got["ETag"]))
            if status == "ok":
                self.etag = etag
                break
            # someone else took it over (or released it) first: look again
        else:
            raise _refusal(self.run_id, self.store.uri_for(self.key), {})
        self._thread = threading.Thread(target=self._heartbeat, name="asr-ft-lease", daemon=True)
        self._thread.start()
        return self.token

    def _heartbeat(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        while not self._stop.wait(self.ttl / 3):
            try:
                self.etag = self._put(IfMatch=self.etag)
            except ClientError as e:
                if _code(e) in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                    log.error("lost the lock %s to another run: its outputs and this one's may mix; stop one of them",
                              self.store.uri_for(self.key))
                    return
                log.warning("could not renew the lock %s (%s); retrying", self.store.uri_for(self.key), e)
            except BotoCoreError as e:
                log.warning("could not renew the lock %s (%s); retrying", self.store.uri_for(self.key), e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.full)
            if head["ETag"] == self.etag:  # still ours
                self.client.delete_object(Bucket=self.bucket, Key=self.full)
        except Exception as e:  # noqa: BLE001 - an outage at the end: the lease expires on its own
            log.warning("could not remove the run lock %s (%s); the next run can take it over after %.0f s",
                        self.store.uri_for(self.key), str(e)[:200], self.ttl)


CONFLICT = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")
MISSING = ("NoSuchKey", "404", "NotFound")


def _code(err) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))
