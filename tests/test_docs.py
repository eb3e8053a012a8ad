"""The documentation site stays consistent: nav lists existing pages, the reference pages cover the surface.

`make docs` builds the site with ``mkdocs build --strict`` (not part of ``make test``: it needs the ``docs``
extra); these checks need nothing beyond the test dependencies.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from tensorstream import Config
from tensorstream.cli import _parser

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"


def load_mkdocs() -> dict[str, Any]:
    class Loader(yaml.SafeLoader):
        pass

    # mkdocs.yml names Python objects (`!!python/name:...`) for the mermaid fence; they are not needed here.
    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    return dict(yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader))


def nav_files(nav: Any) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [f for item in nav for f in nav_files(item)]
    if isinstance(nav, dict):
        return [f for value in nav.values() for f in nav_files(value)]
    return []


def test_nav_lists_every_page_and_only_existing_ones() -> None:
    files = nav_files(load_mkdocs()["nav"])
    assert len(files) == len(set(files))
    for name in files:
        assert (DOCS / name).is_file(), name
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages == set(files), pages ^ set(files)


def test_api_pages_name_existing_objects() -> None:
    import importlib

    for page in (DOCS / "api").glob("*.md"):
        for target in re.findall(r"^::: ([\w.]+)", page.read_text(), flags=re.M):
            module, _, name = target.rpartition(".")
            try:
                importlib.import_module(target)
                continue
            except ImportError:
                pass
            assert hasattr(importlib.import_module(module), name), f"{page.name}: {target}"


def test_configuration_page_lists_every_field_and_variable() -> None:
    text = (DOCS / "configuration.md").read_text()
    for field in dataclasses.fields(Config):
        assert f"| `{field.name}` | `TENSORSTREAM_{field.name.upper()}` |" in text, field.name
    assert "`TENSORSTREAM_CONFIG_FILE`" in text


def test_cli_page_documents_every_command() -> None:
    text = (DOCS / "cli.md").read_text()
    commands = _parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for command in commands:
        assert f"## `tensorstream {command}" in text, command


def test_guarantees_and_the_makefile_name_existing_tests() -> None:
    """Every test docs/guarantees.md cites (``test_x.py::name``, or ``::name`` after one) and every test the
    Makefile's smoke lists run exists: a renamed test must not leave a guarantee unproven or `make mindeps` failing."""
    defined: dict[str, set[str]] = {
        path.name: set(re.findall(r"^\s*def (\w+)", path.read_text(), re.MULTILINE))
        for path in (ROOT / "tests").glob("test_*.py")
    }
    missing = []
    for line in (DOCS / "guarantees.md").read_text().splitlines():
        current = None
        for file, name in re.findall(r"`(test_\w+\.py)?::(\w+)", line):
            current = file or current
            if current is None or name not in defined.get(current, set()):
                missing.append(f"guarantees.md: {current}::{name}")
    for file, name in re.findall(r"tests/(test_\w+\.py)::(\w+)", (ROOT / "Makefile").read_text()):
        if name not in defined.get(file, set()):
            missing.append(f"Makefile: {file}::{name}")
    assert not missing, missing
