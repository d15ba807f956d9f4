"""Atomic files and folders: readers see the old version or the new one, never half of either.

    atomic_write_bytes(path, data)                 # temp file beside it, fsync, rename
    with atomic_path(path) as tmp: np.save(tmp, a) # any writer: renamed into place when the block succeeds
    with atomic_dir(folder) as tmp: …              # a whole folder, published in one step (publish_dir)

Every publish (the rename) is a named fault point (common.core.faults): ``files.atomic_write``,
``files.atomic_path``, ``files.publish_dir``. Data reaches the disk (fsync) before it is renamed into place.

Standard library only: also used where only a few modules are installed (the image's model bundle step).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from common.core.faults import fault_point


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename: readers never see half a file.
    The file gets the permissions open() would give it (mkstemp's are 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fault_point("files.atomic_write")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it into place if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        fsync_file(Path(tmp))
        fault_point("files.atomic_path")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temp folder beside ``path``; when the block succeeds it replaces ``path`` in one step
    (``publish_dir``), when it fails it is removed: ``path`` never holds half a folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        publish_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_dir(tmp: Path, path: Path) -> None:
    """Put the finished folder ``tmp`` at ``path`` (same file system). An existing ``path`` is first renamed
    aside and deleted after the swap, so a reader finds the old folder or the new one, never a mix."""
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes the folder private; give it what mkdir would
    fsync_tree(tmp)
    fault_point("files.publish_dir")
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
        os.replace(path, old / path.name)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fsync_file(path: Path) -> None:
    """Flush a written file's data to the disk (what a rename after a crash relies on)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames, new files) to the disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not fsync folders
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder`` and every folder in it (the folder itself included)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fsync_file(Path(root) / name)
        fsync_dir(Path(root))
