"""Store housekeeping: list the stores under a storage root and remove them (``tensorstream cache ls`` / ``rm``).

Modelled on ``hf cache scan`` / ``hf cache delete``. A storage root holds, per source fingerprint:

* ``<fingerprint>/``: a store (its ``tensorstream.json`` names the source it was resharded from),
* ``.<fingerprint>.lock``: the lock reshards take; left behind after every reshard (harmless, a few bytes),
* ``.<fingerprint>.partial/``: an interrupted reshard (the next reshard of the same source resumes from it),
* ``.<fingerprint>.old-<pid>/``: a store being replaced by ``reshard --force`` (left only by a kill).

A leftover is *stale* when no process holds its lock. Removing never leaves the storage root, never follows a
symbolic link and never touches an entry whose lock another process holds.

Example:
    ```python
    >>> from tensorstream.cache import scan, remove
    >>> for entry in scan("/nvme/tensorstream"):
    ...     print(entry.name, entry.kind, entry.size_bytes, entry.source)
    >>> remove(scan("/nvme/tensorstream"), dry_run=True)  # what would go, and the bytes freed
    ```
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["CacheEntry", "default_root", "remove", "scan", "select"]

_FINGERPRINT = r"[0-9a-f]{16}"
_PATTERNS = {
    "store": re.compile(rf"(?P<fp>{_FINGERPRINT})"),
    "lock": re.compile(rf"\.(?P<fp>{_FINGERPRINT})\.lock"),
    "partial": re.compile(rf"\.(?P<fp>{_FINGERPRINT})\.partial"),
    "old": re.compile(rf"\.(?P<fp>{_FINGERPRINT})\.old-\d+"),
}
_MANIFEST = "tensorstream.json"


@dataclass(frozen=True)
class CacheEntry:
    """One thing under the storage root.

    Attributes:
        path: the entry's path (inside the storage root).
        name: its name in the root.
        fingerprint: the source fingerprint it belongs to.
        kind: ``"store"``, ``"lock"``, ``"partial"`` (interrupted reshard) or ``"old"`` (replaced store).
        size_bytes: bytes on disk (files only, links not followed).
        source: what the store was resharded from (``""`` when unknown).
        model_class: the transformers class of the store (``""`` when unknown).
        last_used: seconds since the epoch when it was last read or written (the latest access or modification
            time of its files; on ``relatime`` mounts the access time is updated about once a day).
        in_use: another process holds its lock (a reshard is running): it is never removed.
        damaged: a store folder without a readable manifest.
    """

    path: str
    name: str
    fingerprint: str
    kind: str
    size_bytes: int
    source: str
    model_class: str
    last_used: float
    in_use: bool
    damaged: bool = False

    @property
    def stale(self) -> bool:
        """A leftover (lock, partial or replaced store) no running process needs."""
        return self.kind != "store" and not self.in_use

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "stale": self.stale}


def default_root() -> Path:
    """Where stores live by default: ``TENSORSTREAM_STORAGE_PATH``, else ``<HF hub cache>/tensorstream``."""
    configured = os.environ.get("TENSORSTREAM_STORAGE_PATH", "").strip()
    if configured:
        return Path(configured).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / "tensorstream"


def scan(root: str | os.PathLike[str]) -> list[CacheEntry]:
    """Every store and leftover under ``root``, stores first, each group by last use (oldest first).

    Raises:
        `ConfigError`: ``root`` is not a folder.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder; pass the storage root (default: {default_root()}).")
    entries = []
    for child in sorted(root.iterdir()):
        for kind, pattern in _PATTERNS.items():
            match = pattern.fullmatch(child.name)
            if match and not child.is_symlink():
                entries.append(_entry(root, child, kind, match["fp"]))
                break
    order = list(_PATTERNS)
    return sorted(entries, key=lambda e: (order.index(e.kind), e.last_used, e.name))


def select(entries: Iterable[CacheEntry], targets: Iterable[str], *, stale: bool = False) -> list[CacheEntry]:
    """The entries named by ``targets`` (a fingerprint, a unique prefix of one, or a store path), plus every stale
    leftover when ``stale``; a store is taken with its own leftovers.

    Raises:
        `ConfigError`: a target matches nothing, or several stores.
    """
    entries = list(entries)
    chosen: dict[str, CacheEntry] = {}
    for target in targets:
        fingerprints = _match(entries, target)
        for entry in entries:
            if entry.fingerprint in fingerprints:
                chosen[entry.path] = entry
    if stale:
        chosen.update({e.path: e for e in entries if e.stale})
    return [e for e in entries if e.path in chosen]


def _match(entries: list[CacheEntry], target: str) -> set[str]:
    text = target.rstrip("/")
    name = Path(text).name
    stores = {e.fingerprint for e in entries}
    exact = {fp for fp in stores if name in (fp, f".{fp}.lock", f".{fp}.partial") or name.startswith(f".{fp}.old-")}
    if exact:
        return exact
    prefixed = {fp for fp in stores if fp.startswith(name)} if len(name) >= 4 else set()
    if len(prefixed) == 1:
        return prefixed
    if prefixed:
        raise ConfigError(
            f"{target!r} is the start of {len(prefixed)} fingerprints ({', '.join(sorted(prefixed))}); "
            "give more of it."
        )
    raise ConfigError(
        f"{target!r} names no store here; `tensorstream cache ls` lists them (give a fingerprint or its first 4+ "
        "characters)."
    )


def remove(entries: Iterable[CacheEntry], *, dry_run: bool = False) -> list[CacheEntry]:
    """Delete ``entries`` (all, or none when ``dry_run``) and return what was (or would be) removed.

    Each entry is checked again just before it goes: it must still sit directly in its storage root, must not be
    a symbolic link, and no process may hold its fingerprint's lock (the lock is held while it is removed).

    Raises:
        `ConfigError`: an entry is a link, is outside its root, or is in use by another process; nothing after it
            is removed.
    """
    done = []
    for entry in entries:
        path = Path(entry.path)
        root = path.parent
        if path.is_symlink() or not any(p.fullmatch(path.name) for p in _PATTERNS.values()):
            raise ConfigError(f"{path} is a link or not a tensorstream entry; it is left alone.")
        if root.resolve() != Path(os.path.realpath(path)).parent:
            raise ConfigError(f"{path} resolves outside its storage root {root}; it is left alone.")
        if dry_run:
            done.append(entry)
            continue
        with _holding_lock(root, entry.fingerprint, path):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        done.append(entry)
    return done


@contextlib.contextmanager
def _holding_lock(root: Path, fingerprint: str, target: Path) -> Iterator[None]:
    lock = root / f".{fingerprint}.lock"
    if not lock.is_file() or lock.is_symlink():
        yield
        return
    fd = os.open(lock, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise ConfigError(
                    f"{target} is in use: another process holds {lock} (a reshard is running); retry when it is done."
                ) from None
            raise
        yield
    finally:
        os.close(fd)


def _entry(root: Path, path: Path, kind: str, fingerprint: str) -> CacheEntry:
    size, last = _usage(path)
    source = model_class = ""
    damaged = False
    if kind == "store":
        try:
            manifest_path = path / _MANIFEST
            if manifest_path.is_symlink() or not manifest_path.is_file():  # a FIFO would block, a link lead out
                raise OSError(errno.EINVAL, "not a regular file", str(manifest_path))
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            source = str(manifest.get("source", ""))
            model_class = str(manifest.get("model_class", ""))
        except (OSError, ValueError, AttributeError, RecursionError):  # RecursionError: a nesting bomb
            damaged = True
    return CacheEntry(
        path=str(path),
        name=path.name,
        fingerprint=fingerprint,
        kind=kind,
        size_bytes=size,
        source=source,
        model_class=model_class,
        last_used=last,
        in_use=_locked(root / f".{fingerprint}.lock"),
        damaged=damaged,
    )


def _usage(path: Path) -> tuple[int, float]:
    """Bytes of the files under ``path`` (links not followed) and their latest access or modification time."""
    size, last = 0, 0.0
    stats = [path.lstat()]
    if path.is_dir() and not path.is_symlink():
        for folder, dirs, files in os.walk(path):
            for name in [*dirs, *files]:
                with contextlib.suppress(OSError):
                    stats.append((Path(folder) / name).lstat())
    for st in stats:
        if not stat.S_ISDIR(st.st_mode):
            size += st.st_size
        last = max(last, st.st_atime, st.st_mtime)
    return size, last


def _locked(lock: Path) -> bool:
    """Whether another process holds ``lock`` now (without creating it)."""
    if not lock.is_file() or lock.is_symlink():
        return False
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def age(seconds_since_epoch: float, now: float | None = None) -> str:
    """``"3 days ago"``-style text for a time stamp."""
    delta = max(0.0, (time.time() if now is None else now) - seconds_since_epoch)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if delta >= size:
            n = int(delta // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"
