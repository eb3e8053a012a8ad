"""POSIX reads: ``os.preadv`` straight into the slot, optionally with ``O_DIRECT`` (bypassing the page cache)."""

from __future__ import annotations

import errno
import functools
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from ..errors import BackendUnavailableError

__all__ = ["PosixBackend", "choose_direct_io", "direct_io_supported", "drop_page_cache", "raw_read_gb_per_s"]

logger = logging.getLogger(__name__)

DIRECT_ALIGNMENT = 4096


class PosixBackend:
    """``os.preadv`` into the caller's buffer; thread-safe (``pread`` does not move a shared file offset).

    Notes:
        With ``direct=True`` every offset, size and buffer address must be a multiple of 4096: the engine's slots
        and the ``.ts`` layout guarantee it. Reads then bypass the page cache, which keeps a model larger than RAM
        from evicting everything else, at the price of no warm-cache speed-up.
    """

    def __init__(self, *, direct: bool = False) -> None:
        if direct and not hasattr(os, "O_DIRECT"):
            raise BackendUnavailableError(
                "direct_io=True needs O_DIRECT, which this platform lacks; use direct_io=None."
            )
        self.direct = direct
        self.name = "posix+O_DIRECT" if direct else "posix"
        self.alignment = DIRECT_ALIGNMENT if direct else 1

    def open(self, path: str | os.PathLike[str]) -> int:
        flags = os.O_RDONLY | (os.O_DIRECT if self.direct else 0)
        try:
            return os.open(path, flags)
        except OSError as err:
            if self.direct and err.errno == errno.EINVAL:
                raise BackendUnavailableError(
                    f"{path}: the filesystem does not support O_DIRECT (tmpfs, some network and FUSE filesystems); "
                    "set direct_io=None (or TENSORSTREAM_DIRECT_IO=auto) to use buffered reads."
                ) from None
            raise

    def read_into(self, handle: int, offset: int, out: memoryview) -> int:
        done = 0
        total = len(out)
        while done < total:
            n = os.preadv(handle, [out[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done

    def close(self, handle: int) -> None:
        os.close(handle)


REQUEST = 16 << 20
SELF_TEST_BYTES = 96 << 20


def choose_direct_io(folder: str | os.PathLike[str], total_bytes: int, *, larger_than_ram: bool | None = None) -> bool:
    """What ``direct_io=None`` means for the store in ``folder``.

    A store that fits in the RAM available stays in the page cache after the first pass, and buffered reads then
    run at memory speed: buffered. A larger one is evicted before it is read again, so every pass is a cold read:
    a quick self-test (about 100 MB of the store read cold both ways, once per process) picks the faster of
    buffered and ``O_DIRECT`` reads on this machine. The choice is logged at INFO.
    """
    if larger_than_ram is None:
        from ..plan import _meminfo_available

        larger_than_ram = total_bytes > _meminfo_available()
    if not larger_than_ram or not direct_io_supported(folder):
        return False
    return _direct_is_faster(str(Path(folder).resolve()))


@functools.lru_cache(maxsize=16)
def _direct_is_faster(folder: str) -> bool:
    files, total = [], 0
    for path in sorted(Path(folder).rglob("*.safetensors")):
        files.append(path)
        total += path.stat().st_size
        if total >= SELF_TEST_BYTES:
            break
    buffered = raw_read_gb_per_s(files, direct=False, threads=2)
    direct = raw_read_gb_per_s(files, direct=True, threads=2)
    choice = direct > 1.05 * buffered
    logger.info(
        "tensorstream: cold read self-test on %s: buffered %.2f GB/s, O_DIRECT %.2f GB/s; using %s reads",
        folder, buffered, direct, "O_DIRECT" if choice else "buffered",
    )  # fmt: skip
    return choice


def drop_page_cache(paths: Sequence[Path]) -> None:
    """Ask the kernel to drop its cached pages of ``paths`` (``posix_fadvise(DONTNEED)``)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read_gb_per_s(paths: Sequence[Path], *, direct: bool, threads: int) -> float:
    """Cold read speed of ``paths`` in GB/s: every byte read once, in 16 MiB requests, by ``threads`` threads.

    Buffered reads start after `drop_page_cache`; ``O_DIRECT`` reads bypass the cache.
    """
    from ..format import aligned_empty

    drop_page_cache(paths)
    jobs: list[tuple[Path, int, int]] = []
    for path in paths:
        size = path.stat().st_size
        jobs += [(path, offset, min(REQUEST, size - offset)) for offset in range(0, size, REQUEST)]
    jobs.reverse()
    lock = threading.Lock()
    total = [0]
    errors: list[BaseException] = []

    def worker() -> None:
        view = aligned_empty(REQUEST).numpy().data.cast("B")
        fds: dict[Path, int] = {}
        try:
            while True:
                with lock:
                    if not jobs:
                        return
                    path, offset, length = jobs.pop()
                if path not in fds:
                    fds[path] = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
                want = -(-length // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT if direct else length
                n = os.preadv(fds[path], [view[:want]], offset)
                with lock:
                    total[0] += min(n, length)
        except BaseException as err:  # re-raised on the calling thread
            errors.append(err)
        finally:
            for fd in fds.values():
                os.close(fd)

    start = time.perf_counter()
    pool = [threading.Thread(target=worker, name="tensorstream-selftest") for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    if errors:
        raise errors[0]
    return total[0] / (time.perf_counter() - start) / 1e9


def direct_io_supported(folder: str | os.PathLike[str]) -> bool:
    """Whether files in ``folder`` can be opened with ``O_DIRECT``."""
    if not hasattr(os, "O_DIRECT"):
        return False
    for path in Path(folder).rglob("*.safetensors"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            return False
        os.close(fd)
        return True
    return False
