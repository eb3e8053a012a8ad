"""Print the declared minimum of every dependency as an exact pin (``transformers>=5.13`` -> ``transformers==5.13``).

Used by ``make mindeps`` (and so by CI) to install the floors that ``pyproject.toml`` declares and run a smoke
subset against them, so the floors stay true. torch is left out (``--skip torch``): the Makefile installs its
floor as the CPU wheel of ``TORCH_SPEC`` (``torch==2.13.0``), since ``torch==2.13`` from the index is a CUDA build.

    python scripts/min_requirements.py --skip torch --extra quantize --extra compression
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", action="append", default=[], help="a dependency to leave out (repeatable)")
    parser.add_argument("--extra", action="append", default=[], help="also pin this optional extra (repeatable)")
    args = parser.parse_args()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = []
    extras = [r for extra in args.extra for r in project["optional-dependencies"][extra]]
    for requirement in [*project["dependencies"], *extras]:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)\s*", requirement)
        if match is None:
            raise SystemExit(f"pyproject.toml: {requirement!r} has no plain '>=' floor to pin")
        name, floor = match.groups()
        if name.lower() not in {s.lower() for s in args.skip}:
            pins.append(f"{name}=={floor}")
    print(" ".join(pins))


if __name__ == "__main__":
    main()
