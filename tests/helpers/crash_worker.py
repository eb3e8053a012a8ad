"""Kill reshards with SIGKILL at chosen points, and race several reshards of one model, in child processes.

Usage: python crash_worker.py JOBS_JSON

``JOBS_JSON`` holds ``{"source": ..., "kills": [{"point": ..., "storage": ...}, ...],
"race": {"storage": ..., "processes": 3, "log": ...}}``. This process imports tensorstream once (a few seconds)
and runs no torch code itself; every job runs in a child made with ``os.fork()``, so each kill point costs a
fraction of a second. A kill point arms a hook in the child that sends the child SIGKILL itself (no cleanup
runs: no ``finally``, no ``atexit``), exactly where the point says. The last line of stdout is a JSON report::

    {"kills": [{"point": "save:3", "signal": 9, "exit": null}, ...], "race": [{"exit": 0}, ...]}

Kill points:
    ``load``                  transformers built the model; no file written yet
    ``bytes:N``               after N bytes of ``.ts`` files went to disk (mid-file: a temporary file)
    ``fsync:N``               at the N-th fsync: a temporary file fully written but not yet renamed into place
    ``save:N``                after the N-th ``.ts`` file was renamed into place
    ``json:NAME``             before the index or manifest NAME is written
    ``json-after:NAME``       after it was written (the manifest: the store is complete but not published)
    ``publish-force``         ``--force`` over a complete store: new and old swapped, the old one not yet deleted
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import importlib

import tensorstream
from helpers.faults import WriteLimit, sigkill

# (tensorstream.reshard is also the name of the function the package exports: import the modules by name)
ts_format = importlib.import_module("tensorstream.format")
ts_reshard = importlib.import_module("tensorstream.reshard")


def _after_nth(n: int, real: Callable[..., Any]) -> Callable[..., Any]:
    calls = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == n:
            sigkill()
        return result

    return wrapper


def arm(point: str) -> bool:
    """Install the hook for ``point`` in this (child) process; returns whether the reshard must use force."""
    kind, _, arg = point.partition(":")
    if kind == "load":
        ts_reshard._write_store = lambda *a, **k: sigkill()  # type: ignore[assignment]
    elif kind == "bytes":
        ts_format.open = WriteLimit(int(arg), sigkill)  # type: ignore[attr-defined]  # shadows builtins.open there
    elif kind == "fsync":
        real_fsync = os.fsync
        calls = [0]

        def fsync(fd: int) -> None:
            calls[0] += 1
            if calls[0] == int(arg):
                sigkill()
            real_fsync(fd)

        os.fsync = fsync
    elif kind == "save":
        ts_reshard.save_to_ts = _after_nth(int(arg), ts_reshard.save_to_ts)  # type: ignore[assignment]
    elif kind in ("json", "json-after"):
        staging = importlib.import_module("tensorstream.staging")  # the reshard calls staging.write_json
        real_json = staging.write_json

        def write_json(path: Path, data: Any) -> None:
            if kind == "json" and path.name == arg:
                sigkill()
            real_json(path, data)
            if path.name == arg:
                sigkill()

        staging.write_json = write_json
    elif kind == "publish-force":
        real_replace = os.replace

        def replace(src: Any, dst: Any) -> None:
            real_replace(src, dst)
            if ".old-" in Path(dst).name:
                sigkill()

        os.replace = replace  # type: ignore[assignment]
        return True
    else:
        raise ValueError(f"unknown kill point {point!r}")
    return False


def child(body: Callable[[], None]) -> int:
    """Run ``body`` in a forked child; returns the child's pid. The child never returns from here."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        body()
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def status(pid: int) -> dict[str, int | None]:
    _, raw = os.waitpid(pid, 0)
    if os.WIFSIGNALED(raw):
        return {"signal": os.WTERMSIG(raw), "exit": None}
    return {"signal": None, "exit": os.WEXITSTATUS(raw)}


def run_kill(source: str, storage: str, point: str) -> dict[str, Any]:
    if point == "publish-force":  # a complete store first, in a child of its own
        done = status(child(lambda: print(tensorstream.reshard(source, storage, progress=False))))
        if done["exit"] != 0:
            return {"point": point, **done, "error": "the first, complete reshard failed"}

    def body() -> None:
        force = arm(point)
        tensorstream.reshard(source, storage, progress=False, force=force)
        raise SystemExit(3)  # the kill point was never reached

    return {"point": point, **status(child(body))}


def run_race(source: str, storage: str, processes: int, log: str) -> list[dict[str, Any]]:
    """``processes`` children released at the same instant, each resharding ``source`` into ``storage``."""
    read_end, write_end = os.pipe()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def note(line: str) -> None:
        os.write(fd, f"{line}\n".encode())

    class Waiting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "is resharding into" in record.getMessage() and "another process" in record.getMessage():
                note(f"wait {os.getpid()}")

    def body() -> None:
        os.close(write_end)
        os.read(read_end, 1)  # the start signal
        logger = logging.getLogger("tensorstream")
        logger.setLevel(logging.INFO)
        logger.addHandler(Waiting())
        real_save = ts_reshard.save_to_ts

        def save(*args: Any, **kwargs: Any) -> Any:
            note(f"write {os.getpid()} {kwargs.get('block', '')}")
            time.sleep(0.05)  # a slow disk: the others certainly arrive while the lock is held
            return real_save(*args, **kwargs)

        ts_reshard.save_to_ts = save  # type: ignore[assignment]
        path = tensorstream.reshard(source, storage, progress=False)
        note(f"done {os.getpid()} {path}")

    pids = [child(body) for _ in range(processes)]
    os.close(read_end)
    time.sleep(0.2)  # every child is forked and blocked on the pipe
    os.write(write_end, b"x" * processes)
    os.close(write_end)
    results = [status(pid) for pid in pids]
    os.close(fd)
    return results


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    source = jobs["source"]
    report: dict[str, Any] = {"kills": [run_kill(source, job["storage"], job["point"]) for job in jobs["kills"]]}
    race = jobs.get("race")
    if race:
        report["race"] = run_race(source, race["storage"], race["processes"], race["log"])
    print(json.dumps(report))


if __name__ == "__main__":
    main()
