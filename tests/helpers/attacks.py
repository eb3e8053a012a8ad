"""Helpers for the attack tests: run with a hang timeout, edit a store's JSON and ``.ts`` headers in place."""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def within(seconds: float, fn: Callable[[], Any], *, grad: bool = False) -> Any:
    """Run ``fn`` in a thread (grad mode off unless ``grad``); fail if it has not returned after ``seconds``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            with torch.set_grad_enabled(grad):
                box["value"] = fn()
        except BaseException as err:
            box["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: a hang"
    if "error" in box:
        raise box["error"]
    return box["value"]


def rewrite_header(path: Path, mutate: Callable[[dict[str, Any]], None]) -> None:
    """Change a .ts file's JSON header in place, keeping its length (and so the data offset)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    mutate(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    path.write_bytes(raw[:8] + text + b" " * (n - len(text)) + raw[8 + n :])


def edit_json(path: Path, mutate: Callable[[Any], None]) -> None:
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
