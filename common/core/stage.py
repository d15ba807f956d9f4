"""Running one stage: logging, resume-by-manifest, local staging for S3, and the manifest written last.

A stage's outputs live at ``<artifacts>/<run-id>/<stage>/``. Its ``_manifest.json`` is written last and
atomically: its presence means the stage succeeded. When the manifest's fingerprint (code version, the
settings that matter, the inputs' fingerprints) matches the current one, the stage is skipped.

For a local store the stage writes straight into its folder. For S3 it writes into a local staging folder
that is uploaded file by file (``ctx.sync()``, also usable mid-way, e.g. after each checkpoint) before the
manifest is put.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.core.faults import fault_point
from common.core.faults import set_scope as set_fault_scope
from common.core.preempt import Preempted, stop_signals
from common.core.runlock import RunLocked, run_lock
from common.core.settings import SECRET_MASK, StageSettings, fingerprint_fields, redacted, secret_values
from common.core.store import S3Store, Store, StoreError, atomic_write_bytes, open_store, sha256_file

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
CHECKPOINT_MARKER = "checkpoint_complete.json"  # common.training.checkpoints.MARKER: uploaded last
# While a stage runs, <run>/.state/<stage>.running.json holds (host, pid, start); a failure leaves
# <run>/.state/<stage>.failed.json (its message). Outside the stage folder: never an output. `asr-ft status`
# reads them.
STATE_DIR, RUNNING, FAILED = ".state", "running", "failed"
PIPELINE_ENV = "ASRFT_PIPELINE"  # set by `asr-ft run` for its steps
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
TERMINATION_LOG = Path("/dev/termination-log")  # Kubernetes shows this file's text as the pod's failure reason


class StageFailed(Exception):
    """The stage cannot produce its outputs; the message says why and how to fix it (exit 1, or 2 for bad input)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = exit_code


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("asr-ft")
    except PackageNotFoundError:  # running from a source tree without install
        v = "0+unknown"
    return os.environ.get("ASRFT_CODE_VERSION", v)


def cache_dir() -> Path:
    return Path(os.environ.get("ASRFT_CACHE") or Path.home() / ".cache" / "asr-ft")


_LOG_HANDLER = "asr-ft"
_SECRETS: set[str] = set()  # secret values masked in every log line (register_secrets)


def register_secrets(values: set[str]) -> None:
    """Mask these strings in every line the console handler writes (DEBUG output of boto3 & co. included)."""
    _SECRETS.update(v for v in values if v)


class RedactingFormatter(logging.Formatter):
    """Masks every registered secret (register_secrets) in the formatted line."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in sorted(_SECRETS, key=len, reverse=True):
            if secret in text:
                text = text.replace(secret, SECRET_MASK)
        return text


def setup_logging(level: str = "INFO") -> None:
    """One console handler on stderr at ``level``. Calling it again replaces that handler (and any plain
    console handler, e.g. from basicConfig) but keeps the host's other handlers (files, pytest's caplog)."""
    root = logging.getLogger()
    consoles = (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
    for h in list(root.handlers):
        if h.get_name() == _LOG_HANDLER or (type(h) is logging.StreamHandler and h.stream in consoles):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_LOG_HANDLER)
    register_secrets(secret_values())  # secret-looking environment variables (AWS_SECRET_ACCESS_KEY, ...)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level))


@dataclass
class StageContext:
    stage: str
    settings: StageSettings
    store: Store
    run_prefix: str  # "<run-id>"
    out: Path  # local folder the stage writes into
    manifest_extra: dict[str, Any] = field(default_factory=dict)
    # path → (size, mtime_ns, sha256) of files hashed so far, and key → (size, sha256) of files uploaded by sync()
    _hashes: dict[Path, tuple[int, int, str]] = field(default_factory=dict, repr=False)
    _synced: dict[str, tuple[int, str]] = field(default_factory=dict, repr=False)

    def key(self, *parts: str) -> str:
        """Store key inside this stage's folder."""
        return self.store.join(self.run_prefix, self.stage, *parts)

    def uri(self, *parts: str) -> str:
        return self.store.uri_for(self.key(*parts))

    def input_dir(self, stage: str) -> Path:
        """Local folder holding another stage's outputs of this run (downloaded from S3 when needed)."""
        return stage_dir(self.store, self.run_prefix, stage)

    def sync(self) -> None:
        """Upload what the stage wrote so far (no-op for a local store). Files already uploaded by this
        process with the same size and sha256 are not sent again, so calling it after each checkpoint is cheap."""
        if self.store.local_path(self.key()) is not None:
            return
        # completion markers (a checkpoint's) go after the files they vouch for
        files = sorted(_output_files(self.out), key=lambda p: p.name == CHECKPOINT_MARKER)
        for path in files:
            key = self.key(path.relative_to(self.out).as_posix())
            digest = self.digest(path)
            if self._synced.get(key) != digest:
                fault_point("store.upload")
                self.store.put_file(path, key)
                self._synced[key] = digest
        # files this process uploaded and has since removed (rotated checkpoints): markers first
        gone = {self.key(p.relative_to(self.out).as_posix()) for p in files}
        stale = sorted((k for k in self._synced if k not in gone), key=lambda k: not k.endswith(CHECKPOINT_MARKER))
        for key in stale:
            self.store.delete_prefix(key)
            del self._synced[key]

    def upload_record(self) -> dict[str, Any]:
        """What this context has hashed and uploaded so far (picklable): another process that wrote into the same
        ``out`` folder (e.g. a launched training worker) hands it back with ``adopt_upload_record``."""
        return {"synced": dict(self._synced), "hashes": dict(self._hashes)}

    def adopt_upload_record(self, record: dict[str, Any]) -> None:
        """Take over another context's ``upload_record()``: files it already uploaded are not sent again."""
        self._synced.update(record.get("synced") or {})
        self._hashes.update(record.get("hashes") or {})

    def digest(self, path: Path) -> tuple[int, str]:
        """(size, sha256) of a local file, hashed again only when its size or mtime changed."""
        st = path.stat()
        cached = self._hashes.get(path)
        if cached is None or cached[:2] != (st.st_size, st.st_mtime_ns):
            cached = (st.st_size, st.st_mtime_ns, sha256_file(path))
            self._hashes[path] = cached
        return cached[0], cached[2]


def stage_dir(store: Store, run_prefix: str, stage: str) -> Path:
    prefix = store.join(run_prefix, stage)
    local = store.local_path(prefix)
    if local is not None:
        if not (local / MANIFEST).exists():
            raise StageFailed(
                f"stage '{stage}' has not completed in run '{run_prefix}' ({local}/{MANIFEST} missing). "
                f"Run `asr-ft {stage}` first (or `asr-ft run`)."
            )
        return local
    if not store.exists(store.join(prefix, MANIFEST)):
        raise StageFailed(f"stage '{stage}' has not completed in {store.uri_for(prefix)}; run `asr-ft {stage}` first.")
    manifest = store.read_json(store.join(prefix, MANIFEST))
    dest = cache_dir() / "s3" / hashlib.sha256(store.uri_for(prefix).encode()).hexdigest()[:16] / stage
    # The local copy keeps the manifest it was made from: a file is fresh when that manifest gave it the same
    # sha256 (a redone upstream stage can write a file of the same size with other content).
    try:
        have = {o["path"]: o["sha256"] for o in json.loads((dest / MANIFEST).read_text())["outputs"]}
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        have = {}
    wanted = {out["path"] for out in manifest["outputs"]}
    for out in manifest["outputs"]:
        path = dest / out["path"]
        if not (path.exists() and path.stat().st_size == out["size"] and have.get(out["path"]) == out["sha256"]):
            store.get_file(store.join(prefix, out["path"]), path)
    for path in _output_files(dest):  # files of an older version of that stage
        if path.relative_to(dest).as_posix() not in wanted:
            path.unlink()
    atomic_write_bytes(dest / MANIFEST, json.dumps(manifest, ensure_ascii=False).encode())
    return dest


def manifest_fingerprint(stage: str, settings: StageSettings, inputs: dict[str, Any]) -> str:
    payload = {"stage": stage, "code": code_version(), "settings": fingerprint_fields(settings), "inputs": inputs}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def read_manifest(store: Store, run_prefix: str, stage: str) -> dict[str, Any] | None:
    key = store.join(run_prefix, stage, MANIFEST)
    return store.read_json(key) if store.exists(key) else None


def upstream_fingerprint(store: Store, run_prefix: str, stage: str) -> str:
    """An upstream stage's fingerprint (what downstream manifests record as their input)."""
    m = read_manifest(store, run_prefix, stage)
    if m is None:
        raise StageFailed(f"stage '{stage}' has not completed in run '{run_prefix}'. Run `asr-ft {stage}` first.")
    return m["fingerprint"]


def _output_files(out: Path) -> list[Path]:
    """A stage folder's outputs: every file but the manifest and hidden/temp files (".<name>.<random>.tmp")."""
    return [p for p in sorted(out.rglob("*")) if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")]


def _outputs(out: Path, ctx: StageContext) -> list[dict[str, Any]]:
    rows = []
    for p in _output_files(out):
        size, sha = ctx.digest(p)
        rows.append({"path": p.relative_to(out).as_posix(), "size": size, "sha256": sha})
    return rows


def run_stage(
    stage: str,
    settings: StageSettings,
    inputs: dict[str, Any] | Callable[[Store], dict[str, Any]],
    body: Callable[[StageContext], dict[str, Any] | None],
) -> int:
    """settings → log them → lock the run → skip if done → run body → write manifest → exit code.

    Every failure ends as one logged message and the stage contract's exit code (1 failed, 2 bad input,
    143/130 stopped by SIGTERM/SIGINT); the traceback only with --log-level DEBUG."""
    setup_logging(settings.log_level)
    register_secrets(secret_values(settings))
    set_fault_scope(stage)
    log.info("%s settings: %s", stage, json.dumps(redacted(settings), ensure_ascii=False))
    try:
        with stop_signals():
            store = open_store(settings.artifacts, settings.s3)
            with run_lock(store, settings.run_id, stage, ttl=settings.s3.lease_seconds):
                return _run_locked(stage, settings, store, inputs, body)
    except RunLocked as e:  # another run holds the run-id: its state markers are its own
        return fail(stage, str(e), EXIT_FAILED)
    except StageFailed as e:
        return _failed(settings, stage, str(e), e.exit_code)
    except StoreError as e:  # its message names the URI and what to check
        return _failed(settings, stage, str(e), EXIT_FAILED)
    except Preempted as e:
        return _failed(settings, stage, f"{e}; nothing half-written was published. Re-run the same command to resume",
                       e.exit_code)
    except KeyboardInterrupt:
        return _failed(settings, stage, "interrupted; re-run the same command to resume", 130)
    except Exception as e:  # noqa: BLE001 - the stage's last line of defence: one clean message, not a traceback
        log.debug("%s: traceback", stage, exc_info=True)
        return _failed(settings, stage, describe_error(e), EXIT_FAILED)


def describe_error(e: BaseException) -> str:
    """One line for an unexpected error: what happened and what to do."""
    import errno as _errno

    if isinstance(e, OSError) and e.errno == _errno.ENOSPC:
        where = f" writing {e.filename}" if e.filename else ""
        return (f"the disk is full{where} ({e}). Free space where the artifacts and the cache (ASRFT_CACHE, "
                f"{cache_dir()}) live, then re-run the same command: finished work is kept")
    if isinstance(e, OSError):
        return f"{e}. Check the path and its permissions, then re-run the same command (--log-level DEBUG shows where)"
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(e, (BotoCoreError, ClientError)):
            return (f"S3 request failed: {e}. Check ASRFT_S3__ENDPOINT_URL, the credentials and the network, then "
                    "re-run the same command")
    except ImportError:
        pass
    if type(e).__module__.startswith(("common.", "jobs.")) and str(e):  # asr-ft's own errors say what to do
        return str(e)
    return (f"unexpected error {type(e).__name__}: {e}. Re-run with --log-level DEBUG for the traceback and report it "
            "if it persists")


def _run_locked(stage: str, settings: StageSettings, store: Store,
                inputs: dict[str, Any] | Callable[[Store], dict[str, Any]],
                body: Callable[[StageContext], dict[str, Any] | None]) -> int:
    if callable(inputs):
        inputs = inputs(store)
    fingerprint = manifest_fingerprint(stage, settings, inputs)
    old = read_manifest(store, settings.run_id, stage)
    if old and old.get("fingerprint") == fingerprint and not settings.force:
        log.info("%s: skipped — %s matches its inputs and settings (use --force to redo)",
                 stage, store.uri_for(store.join(settings.run_id, stage, MANIFEST)))
        return EXIT_OK
    local = store.local_path(store.join(settings.run_id, stage))
    if local is None:
        local = cache_dir() / "staging" / hashlib.sha256(settings.artifacts.encode()).hexdigest()[:16] / settings.run_id / stage
    if old is not None and not settings.force and not os.environ.get(PIPELINE_ENV):
        changed = settings_changes(old.get("settings") or {}, fingerprint_fields(settings))
        if changed:
            raise StageFailed(
                f"run '{settings.run_id}' already holds {stage} results made with other settings "
                f"({'; '.join(changed)}). Pass --force to replace them, or choose another --run-id "
                f"(`asr-ft status {settings.run_id}` shows the run).", exit_code=EXIT_BAD_INPUT)
    if old is not None:
        # Outdated (or --force): the manifest goes first so a half-redone stage never looks complete, then
        # the old outputs, so none of them is listed in the new manifest. A stage that crashed (no
        # manifest) keeps its files: the body may resume from them.
        log.info("%s: redoing (%s); removing the previous outputs",
                 stage, "--force" if settings.force and old.get("fingerprint") == fingerprint else "inputs or settings changed")
        store.delete_prefix(store.join(settings.run_id, stage, MANIFEST))
        store.delete_prefix(store.join(settings.run_id, stage))
        if store.local_path(store.join(settings.run_id, stage)) is None:
            shutil.rmtree(local, ignore_errors=True)
    elif settings.force:  # no manifest (a crashed run): --force still starts clean
        log.info("%s: --force: removing what an unfinished earlier run left", stage)
        store.delete_prefix(store.join(settings.run_id, stage))
        shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True, exist_ok=True)
    remove_temp_files(local)
    if isinstance(store, S3Store):  # under the run's lock: no live upload of this stage can be among them
        store.abort_open_uploads(store.join(settings.run_id, stage))
    remove_temp_files(cache_dir(), older_than=CACHE_TEMP_AGE, depth=1)
    marks = (store, settings.run_id, stage)
    _mark(*marks, FAILED, None)
    _mark(*marks, RUNNING, {"host": socket.gethostname(), "pid": os.getpid(),
                            "started": datetime.now(UTC).isoformat(timespec="seconds")})
    ctx = StageContext(stage, settings, store, settings.run_id, local)
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    summary = body(ctx) or {}
    ctx.sync()
    manifest = {
        "stage": stage,
        "code_version": code_version(),
        "fingerprint": fingerprint,
        "settings": redacted(settings),
        "inputs": inputs,
        "outputs": _outputs(local, ctx),
        "summary": summary,
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 3),
        **ctx.manifest_extra,
    }
    fault_point("stage.manifest")
    store.write_json(store.join(settings.run_id, stage, MANIFEST), manifest)
    _mark(*marks, RUNNING, None)
    log.info("%s: done in %.1f s → %s", stage, manifest["seconds"], store.uri_for(store.join(settings.run_id, stage)))
    return EXIT_OK


TEMP_SUFFIXES = (".tmp", ".old", ".staging")  # what atomic writes and checkpoint saves leave when killed
CACHE_TEMP_AGE = 6 * 3600.0  # the shared cache: only temp files this old (no live writer takes that long)


def remove_temp_files(folder: Path, older_than: float = 0.0, depth: int | None = None) -> list[Path]:
    """Remove the hidden temp files and folders (``.<name>.<random>.tmp``, ``.old``, ``.staging``, e.g.
    ``.model.tmp-*`` copies of a whole model) a killed earlier run left under ``folder`` (down to ``depth``
    levels; only those not modified for ``older_than`` seconds); returns them. The stage folder is the
    locked run's own: everything there goes."""
    found: list[Path] = []
    if not folder.is_dir():
        return found
    pattern = folder.glob(".*") if depth == 1 else folder.rglob(".*")
    now = time.time()
    for p in sorted(pattern, key=lambda p: len(p.parts)):
        if not p.exists() or p.name == MANIFEST:
            continue
        if older_than and now - p.lstat().st_mtime < older_than:
            continue
        if any(p.name.endswith(sfx) or f"{sfx}-" in p.name for sfx in TEMP_SUFFIXES):
            found.append(p)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    if found:
        log.info("removed %d temporary file(s) an interrupted earlier run left, e.g. %s", len(found), found[0])
    return found


def settings_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old → new`` for each setting that changes a result (fingerprint fields) and differs."""
    skip = {"artifacts", "run_id", "force", "log_level", "s3"}
    keys = [k for k in dict.fromkeys([*new, *old]) if k not in skip]
    return [f"{k}: {json.dumps(old.get(k), ensure_ascii=False)} → {json.dumps(new.get(k), ensure_ascii=False)}"
            for k in keys if old.get(k) != new.get(k)]


def state_key(store: Store, run_id: str, stage: str, name: str) -> str:
    """Store key of a stage's RUNNING / FAILED marker."""
    return store.join(run_id, STATE_DIR, f"{stage}.{name}.json")


def _mark(store: Store, run_id: str, stage: str, name: str, content: dict[str, Any] | None) -> None:
    """Write (or with None remove) a state marker of the stage; best effort, never fails the stage."""
    key = state_key(store, run_id, stage, name)
    try:
        if content is None:
            if store.exists(key):
                store.delete_prefix(key)
        else:
            store.write_json(key, content)
    except (StoreError, OSError) as e:
        log.debug("cannot update %s: %s", key, e)


def _failed(settings: StageSettings, stage: str, message: str, code: int) -> int:
    try:
        store = open_store(settings.artifacts, settings.s3)
        if store.exists(state_key(store, settings.run_id, stage, RUNNING)):  # the stage had started
            _mark(store, settings.run_id, stage, RUNNING, None)
            _mark(store, settings.run_id, stage, FAILED, {
                "message": message[-2000:], "exit_code": code,
                "finished": datetime.now(UTC).isoformat(timespec="seconds")})
    except (StoreError, OSError):
        pass
    return fail(stage, message, code)


def fail(stage: str, message: str, code: int) -> int:
    log.error("%s failed: %s", stage, message)
    if TERMINATION_LOG.parent.exists() and os.access(TERMINATION_LOG, os.W_OK):
        try:
            TERMINATION_LOG.write_text(f"{stage}: {message}"[-4000:])  # the kubelet keeps at most 4096 bytes
        except OSError:
            pass
    return code


def stage_main(cls: type[StageSettings], argv: list[str] | None, doc: str, examples: str = ""):
    """Parse flags/env/YAML into settings; on bad settings print every problem and return None (exit 2)."""
    from common.core.settings import SettingsError, parse_args, stage_name

    name = stage_name(cls)
    title, _, rest = (doc or "").strip().partition("\n")
    try:
        return parse_args(cls, argv, prog=f"asr-ft {name}", description=title + ("\n" + rest if rest else ""),
                          epilog=examples)
    except SettingsError as e:
        setup_logging("INFO")
        print(f"asr-ft {name}: {e}", file=sys.stderr)
        fail(name, str(e), EXIT_BAD_INPUT)
        return None
