"""Print the declared minimum of every dependency as an exact pin (``transformers>=5.13`` -> ``transformers==5.13``).

Used by ``make mindeps`` (and so by CI) to install the floors that ``pyproject.toml`` declares and run a smoke
subset against them, so the floors stay true. torch is left out (``--skip torch``): the Makefile installs its
floor as the CPU wheel of ``TORCH_SPEC`` (``torch==2.13.0``), since ``torch==2.13`` from the index is a CUDA build.

An extra may raise a core floor by naming the same package again (the ``diffusers`` extra needs
``huggingface_hub>=1.32``, above the core ``huggingface_hub>=1.5``): each package is pinned once, at its highest
floor among the core dependencies and the extras asked for. ``make mindeps-diffusers`` uses that.

    python scripts/min_requirements.py --skip torch --extra quantize --extra compression
    python scripts/min_requirements.py --skip torch --extra diffusers
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _version(floor: str) -> tuple[int, ...]:
    return tuple(int(part) for part in floor.split(".") if part)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", action="append", default=[], help="a dependency to leave out (repeatable)")
    parser.add_argument("--extra", action="append", default=[], help="also pin this optional extra (repeatable)")
    args = parser.parse_args()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors: dict[str, tuple[str, str]] = {}  # normalised name -> (name as first written, highest floor)
    extras = [r for extra in args.extra for r in project["optional-dependencies"][extra]]
    for requirement in [*project["dependencies"], *extras]:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)\s*", requirement)
        if match is None:
            raise SystemExit(f"pyproject.toml: {requirement!r} has no plain '>=' floor to pin")
        name, floor = match.groups()
        key = re.sub(r"[-_.]+", "-", name).lower()  # PEP 503: huggingface_hub and huggingface-hub are one package
        if key not in floors or _version(floor) > _version(floors[key][1]):
            floors[key] = (floors[key][0] if key in floors else name, floor)
    skip = {re.sub(r"[-_.]+", "-", name).lower() for name in args.skip}
    pins = [f"{name}=={floor}" for key, (name, floor) in floors.items() if key not in skip]
    print(" ".join(pins))


if __name__ == "__main__":
    main()
