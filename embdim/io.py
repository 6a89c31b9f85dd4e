"""Files and folders: atomic artifact writes, file-system faults named in one line, and the lock
that keeps two jobs out of one output folder.

Atomic writes go to a temporary file beside the target, are fsynced, then renamed: a crash while
writing leaves the previous version (or nothing) in place, never half a file. A write that fails
on the file system (full disk, quota, permissions, read-only mount, a path through a file) removes
its temporary file and raises ``StorageError`` naming the target and the cause, which the CLI
prints as one ``embdim: error:`` line.

``output_lock`` holds an exclusive ``fcntl.flock`` on a lock file for as long as a job writes a
run or dataset folder. The kernel drops the lock when the process dies (also by SIGKILL), so a
killed job never leaves a folder locked. The lock file holds the holder's pid, host and command
for the message that refuses a second job. Child processes of the holder (torchrun ranks of
``embdim run`` or ``embdim launch``) inherit the right to write through ``EMBDIM_LOCKED``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

LOCKED_ENV = "EMBDIM_LOCKED"
"""os.pathsep-separated folders whose lock a parent embdim process holds for this process."""
RUN_LOCK = ".embdim.lock"
"""The lock file inside a run folder."""


# ------------------------------------------------------------------------------- file-system faults
class StorageError(OSError):
    """A file or folder could not be written or created; ``str()`` names the path and the cause."""

    def __init__(self, path: str | Path, cause: str, hint: str = "") -> None:
        super().__init__(f"{path}: {cause}" + (f"; {hint}" if hint else ""))
        self.path, self.cause = Path(path), cause

    def __str__(self) -> str:
        return self.args[0]


_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.EISDIR: "is a folder, not a file",
    errno.ENOTDIR: "a component of the path is a file, not a folder",
    errno.EEXIST: "exists and is not a folder",
    errno.ENAMETOOLONG: "file name too long",
    errno.EIO: "input/output error",
    errno.EFBIG: "file too large",
}
# Libraries that write in C++ report these without an errno (pyarrow: "IOError: ... No space left
# on device"; torch.save: "[enforce fail at inline_container.cc] ... unexpected pos", "file write
# failed"): recognised by their text.
_TEXT_CAUSES = {
    "no space left on device": errno.ENOSPC,
    "disk quota exceeded": errno.EDQUOT,
    "permission denied": errno.EACCES,
    "read-only file system": errno.EROFS,
}
_TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception, its causes and contexts, and the per-rank failures a
    ``torch.distributed.checkpoint`` ``CheckpointException`` wraps."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            for failure in failures.values():
                todo.append(failure[0] if isinstance(failure, tuple) else failure)
        todo += [e.__cause__, e.__context__]


def storage_cause(exc: BaseException, where: str | Path | None = None) -> str | None:
    """What went wrong on the file system, in words ("no space left on device", ...), when ``exc``
    (or one of its causes) is a file-system failure; else None. ``where``: a path on the file
    system written to, to tell a torch.save failure on a full disk from other ones."""
    for e in _causes(exc):
        if isinstance(e, StorageError):
            return e.cause
        if isinstance(e, OSError) and e.errno in _CAUSES:
            return _CAUSES[e.errno]
        text = str(e).lower()
        for needle, code in _TEXT_CAUSES.items():
            if needle in text:
                return _CAUSES[code]
        if isinstance(e, RuntimeError) and any(s.lower() in text for s in _TORCH_WRITE_FAILURES):
            return "no space left on device" if where is not None and _disk_full(where) else \
                f"write failed ({str(e).splitlines()[0].strip()})"
    return None


def _disk_full(path: str | Path) -> bool:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def as_storage_error(exc: BaseException, path: str | Path, hint: str = "") -> StorageError | None:
    """``StorageError(path, cause)`` when ``exc`` is a file-system failure, else None."""
    if isinstance(exc, StorageError):
        return exc
    cause = storage_cause(exc, path)
    return None if cause is None else StorageError(path, cause, hint)


@contextmanager
def naming_storage_errors(path: str | Path, hint: str = "") -> Iterator[None]:
    """Re-raises file-system failures inside the block as ``StorageError`` naming ``path``."""
    try:
        yield
    except StorageError:
        raise
    except (OSError, RuntimeError) as e:
        err = as_storage_error(e, path, hint)
        if err is None:
            raise
        raise err from e


def make_dirs(path: str | Path) -> Path:
    """``mkdir -p``, with a path through a file or an unwritable parent named in one line."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StorageError(path, "exists and is a file, not a folder")
    with naming_storage_errors(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------- atomic writes
@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yields a temporary path in the target's folder; renames it onto ``target`` on success.

    The temporary file is removed on any failure; a file-system failure (in the caller's writes,
    the fsync or the rename) is raised as ``StorageError`` naming ``target``."""
    target = Path(target)
    make_dirs(target.parent)
    with naming_storage_errors(target):
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with naming_storage_errors(target):
            yield tmp_path
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            # mkstemp creates the file 0600; give it the mode a plain open() would (0666 & ~umask)
            # so reports, plans and metrics stay readable by the rest of a team or a serving job.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
            os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def atomic_write_json(target: str | Path, obj: Any) -> None:
    atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_npy(target: str | Path, array: np.ndarray) -> None:
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


# ------------------------------------------------------------------------------- one job per folder
class FolderBusy(RuntimeError):
    """Another live process holds the lock of an output folder."""


_held: dict[Path, list] = {}  # lock file -> [folder, nesting depth], in this process


def locked_by_parent(folder: str | Path) -> bool:
    """True when a parent embdim process holds the lock of ``folder`` or of a folder above it
    (``EMBDIM_LOCKED``): this process is one of that job's ranks or phases."""
    folder = Path(os.path.abspath(folder))
    for entry in os.environ.get(LOCKED_ENV, "").split(os.pathsep):
        if entry and (folder == Path(entry) or Path(entry) in folder.parents):
            return True
    return False


def held_locks_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``environ`` (default ``os.environ``) whose ``EMBDIM_LOCKED`` also lists the folders
    this process holds: the environment of a child that writes into them for this job."""
    env = dict(os.environ if environ is None else environ)
    folders = [e for e in env.get(LOCKED_ENV, "").split(os.pathsep) if e]
    folders += [str(folder) for folder, _ in _held.values() if str(folder) not in folders]
    if folders:
        env[LOCKED_ENV] = os.pathsep.join(folders)
    return env


def _holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text())
        return f"pid {info['pid']} on {info['host']} since {info['since']}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (no details in the lock file)"


def _acquire(lock: Path, folder: Path) -> int:
    """An fd holding an exclusive flock on ``lock``; raises FolderBusy when another holds it."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except FileNotFoundError:  # a failed job removed its empty folder meanwhile
            make_dirs(lock.parent)
            continue
        except OSError as e:
            raise StorageError(lock, storage_cause(e) or os.strerror(e.errno or 0)) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderBusy(f"{folder}: in use by another embdim job ({_holder(lock)}); wait for it to finish, "
                             f"or give another --out") from None
        except OSError as e:  # a file system without flock support
            os.close(fd)
            raise StorageError(lock, f"cannot lock ({os.strerror(e.errno or 0)})") from e
        # The releasing holder unlinks the file; a lock taken on an unlinked file guards nothing.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextmanager
def output_lock(folder: str | Path, *, inside: bool = True, command: str | None = None) -> Iterator[Path | None]:
    """Holds the lock of an output folder for the block; yields the lock file (None when a parent
    process holds it for this one).

    Args:
        folder: the run or dataset folder.
        inside: lock file ``folder/.embdim.lock`` (a run folder, created here; when the block
            fails, a folder this call created is removed again if it holds no file), else
            ``.<name>.lock`` beside it (a dataset, which is built beside and renamed into place).
        command: what to tell a refused job (default: this process's command line).

    Raises:
        FolderBusy: another live process holds the lock.
        StorageError: the folder or the lock file cannot be created.
    """
    folder = Path(os.path.abspath(folder))
    if locked_by_parent(folder):
        yield None
        return
    lock = folder / RUN_LOCK if inside else folder.parent / f".{folder.name}.lock"
    if lock in _held:  # nested in this process: the same job
        _held[lock][1] += 1
        try:
            yield lock
        finally:
            _held[lock][1] -= 1
        return
    created = not folder.exists()
    make_dirs(folder if inside else folder.parent)
    fd = _acquire(lock, folder)
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command or " ".join(["embdim", *sys.argv[1:]])}
    try:
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
    except OSError:
        pass  # the details are for messages only; the lock itself holds
    _held[lock] = [folder, 1]
    failed = True
    try:
        yield lock
        failed = False
    finally:
        del _held[lock]
        try:
            os.unlink(lock)  # before unlocking: a waiter that opened it re-checks (see _acquire)
        except OSError:
            pass
        if failed and inside and created:
            remove_if_empty(folder)  # still locked: no other job can be starting in it
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# ------------------------------------------------------------------------------- orphaned writers
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int, expected_parent: int | None = None) -> None:
    """A process that writes for a job must not outlive it: asks the kernel to send ``sig`` to this
    process when its parent dies (``PR_SET_PDEATHSIG``; Linux, elsewhere a no-op). When the parent
    is already gone (``getppid() != expected_parent``), sends it now."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if expected_parent is not None and os.getppid() != expected_parent:
        os.kill(os.getpid(), sig)


def remove_if_empty(folder: str | Path) -> bool:
    """Removes ``folder`` when it holds no file (only empty subfolders); True when removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    for _, _, files in os.walk(folder):
        if files:
            return False
    shutil.rmtree(folder, ignore_errors=True)
    return not folder.exists()
