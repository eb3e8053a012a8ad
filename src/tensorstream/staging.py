"""Writing a store atomically and resumably: the store's lock, its staging folder, files written whole, the rename
that publishes it, and `StorageFullError` for a full disk (`tensorstream.reshard` and the diffusers reshard).

A store is written into ``<root>/.<fingerprint>.partial/`` under an exclusive ``flock`` on ``.<fingerprint>.lock``
(`store_lock`, `staging_folder`), each file through a temporary name renamed into place (`write_json`, and
`tensorstream.format.save_to_ts` for block files), and renamed to ``<root>/<fingerprint>/`` when complete
(`publish`; with ``--force`` over an existing store, exchanged atomically where the kernel can).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import FormatError, LockTimeoutError, StorageFullError

__all__ = [
    "DISK_FULL",
    "fsync_dir",
    "publish",
    "remove_trash",
    "staging_folder",
    "storage_full",
    "store_lock",
    "write_json",
]

logger = logging.getLogger(__name__)

#: The errors of a full disk or quota (EFBIG: a file size limit, RLIMIT_FSIZE).
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextlib.contextmanager
def store_lock(root: Path, fingerprint: str, timeout: float | None = None) -> Iterator[None]:
    """An exclusive ``flock`` on ``<root>/.<fingerprint>.lock``; other processes wait (and say so in the log)."""
    path = root / f".{fingerprint}.lock"
    fd = _open_own_file(path, os.O_RDWR | os.O_CREAT)
    try:
        start = time.monotonic()
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if not announced:
                # a warning, so it shows without logging set up: a silent wait looks like a hang
                logger.warning(
                    "tensorstream: another process is resharding into %s; waiting for it to finish%s",
                    root / fingerprint,
                    _holder(fd),
                )
                announced = True
            if timeout is not None and time.monotonic() - start > timeout:
                raise LockTimeoutError(
                    f"{path} was held by another process for over {timeout:.0f} s; if no reshard is running, "
                    "delete the lock file and retry."
                )
            time.sleep(0.05)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except OSError as err:
            if err.errno not in DISK_FULL:
                raise
            raise storage_full(root, f"the lock file {path.name}", err, None) from err
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _holder(fd: int) -> str:
    """`` (pid N holds the lock)`` from the lock file the holder wrote its pid into, or ``""``."""
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {pid} holds the lock)" if pid.isdigit() else ""


def _open_own_file(path: Path, flags: int) -> int:
    """Open a file tensorstream owns in the storage folder, refusing a link or anything but a regular file there.

    A link planted as ``.<fingerprint>.lock`` would make reshard truncate and write the link's target.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise FormatError(f"{path} is a symbolic link, which is never followed; delete it and retry.") from None
        if err.errno in DISK_FULL:
            raise storage_full(path.parent, f"the lock file {path.name}", err, None) from err
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FormatError(f"{path} is not a regular file; tensorstream refuses to use it. Delete it and retry.")
    return fd


@contextlib.contextmanager
def staging_folder(root: Path, fingerprint: str, what: str, needed_bytes: int | None) -> Iterator[Path]:
    """``<root>/.<fingerprint>.partial``, ready to (re)write a store into; enter it holding the store lock.

    What an interrupted run left is cleaned first: its temporary files (complete block files stay, to be reused)
    and the previous store moved aside by an interrupted ``--force``. A full disk (``ENOSPC``, ``EDQUOT``) removes
    the whole partial store, to give the space back, and raises `StorageFullError`. The scratch offload folder
    is always removed, and the staging folder too while it is still empty.
    """
    remove_trash(root, fingerprint)
    staging = root / f".{fingerprint}.partial"
    if staging.is_symlink() or (os.path.lexists(staging) and not staging.is_dir()):
        raise FormatError(
            f"{staging} is a symbolic link or not a folder; reshard would write (and delete) through it. "
            "Delete it and retry."
        )
    try:
        staging.mkdir(exist_ok=True)
        for tmp in staging.rglob(".*.tmp-*"):  # temporary files of save_to_ts and write_json that a kill left
            tmp.unlink(missing_ok=True)
        yield staging
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        shutil.rmtree(staging, ignore_errors=True)
        raise storage_full(root, what, err, needed_bytes) from err
    finally:
        shutil.rmtree(staging / "_offload", ignore_errors=True)
        with contextlib.suppress(OSError):
            staging.rmdir()  # only succeeds while nothing was written


def storage_full(root: Path, what: str, err: OSError, needed_bytes: int | None) -> StorageFullError:
    try:
        free = f"{shutil.disk_usage(root).free / 1e9:.3g} GB free"
    except OSError:
        free = "free space unknown"
    needs = f", about {needed_bytes / 1e9:.3g} GB needed" if needed_bytes else ""
    return StorageFullError(
        f"{root}: {os.strerror(err.errno or errno.ENOSPC)} while writing the store of {what} ({free}{needs}); the "
        "partial store was removed. Free some space or choose another storage_path (Config(storage_path=...) or "
        "TENSORSTREAM_STORAGE_PATH), then retry.",
        err.errno or errno.ENOSPC,
        str(err.filename) if err.filename else None,
    )


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def publish(staging: Path, final: Path) -> None:
    """Rename the complete ``staging`` folder to ``final``.

    With ``--force`` over an existing store, the two are exchanged atomically (Linux ``renameat2``), so a process
    loading the store at that moment finds the old or the new one, never none; the old one is then deleted.
    Elsewhere the old store is moved aside first (a short window without a store).
    """
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{os.getpid()}")
        if _exchange(staging, final):
            os.replace(staging, trash)  # the old store, out of the staging path at once (never resumed from)
        else:
            os.replace(final, trash)
            os.replace(staging, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, final)
    fsync_dir(final.parent)


def remove_trash(root: Path, fingerprint: str) -> None:
    """Delete old stores that a killed ``--force`` left moved aside."""
    for trash in root.glob(f".{fingerprint}.old-*"):
        shutil.rmtree(trash, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with ``renameat2(RENAME_EXCHANGE)``; False where it is not available."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a filesystem or kernel without it
        return False
    raise OSError(code, os.strerror(code), str(b))


def fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
