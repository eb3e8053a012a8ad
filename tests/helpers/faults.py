"""Fault injection for the reliability tests: writes that stop after a byte budget (a full disk, or a kill)."""

from __future__ import annotations

import builtins
import errno
import os
import signal
from collections.abc import Callable
from typing import Any


class _LimitedFile:
    """A file opened for writing that hands ``limit.consume`` every write before doing it."""

    def __init__(self, file: Any, limit: WriteLimit, path: str) -> None:
        self._file = file
        self._limit = limit
        self._path = path

    def write(self, data: Any) -> int:
        size = len(data) if isinstance(data, str) else memoryview(data).nbytes
        allowed = self._limit.consume(size)
        if allowed is not None:  # the budget runs out inside this write: write what fits, then fail
            self._file.write(data[:allowed] if isinstance(data, str) else memoryview(data).cast("B")[:allowed])
            self._file.flush()
            self._limit.on_exhausted(self._path)
            raise AssertionError("on_exhausted must raise or end the process")
        return self._file.write(data)

    def __enter__(self) -> _LimitedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


class WriteLimit:
    """A stand-in for ``open`` to inject into a module (``monkeypatch.setattr(module, "open", limit, raising=False)``).

    Files opened for writing through it accept ``budget`` bytes in total; the write that would go past the budget
    writes what still fits and then calls ``on_exhausted(path)``, which raises (a full disk) or kills the process.

    Args:
        budget: bytes accepted in total over every file opened through this object.
        on_exhausted: called with the file's path when the budget runs out.
    """

    def __init__(self, budget: int, on_exhausted: Callable[[str], None]) -> None:
        self.budget = budget
        self.written = 0
        self.on_exhausted = on_exhausted

    def consume(self, n: int) -> int | None:
        """Count ``n`` more bytes; ``None`` while within the budget, else how many of them still fit."""
        if self.written + n <= self.budget:
            self.written += n
            return None
        allowed = max(self.budget - self.written, 0)
        self.written = self.budget
        return allowed

    def __call__(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = builtins.open(file, mode, *args, **kwargs)  # noqa: SIM115 (the caller closes it)
        if any(flag in mode for flag in "wax+"):
            return _LimitedFile(handle, self, os.fspath(file))
        return handle


def disk_full(path: str) -> None:
    """``on_exhausted`` for a full disk: what ``write`` raises when the filesystem has no space left."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def sigkill(_path: str = "") -> None:
    """``on_exhausted`` for a crash: the process dies at once, with no cleanup (no ``finally``, no ``atexit``)."""
    os.kill(os.getpid(), signal.SIGKILL)
