"""Start-up time: ``import tensorstream`` (and what using it imports) against ``import transformers, accelerate``.

Each measurement is a fresh interpreter (``python -c``) timing its own import with ``time.perf_counter``, so the
interpreter's start is not counted; the median of ``--runs`` runs is reported. The target (issue 13): the
tensorstream column at most 1.2 times the baseline. Run from the repository root::

    python benchmarks/import_time.py            # prints a table and the ratio
    python benchmarks/import_time.py --json     # one JSON object
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CASES = {
    "transformers, accelerate": "import transformers, accelerate",
    "tensorstream": "import tensorstream",
    "tensorstream, transformers, accelerate": "import tensorstream, transformers, accelerate",
    "transformers.PreTrainedModel (no tensorstream)": "from transformers import PreTrainedModel",
    "tensorstream + transformers.PreTrainedModel": "import tensorstream\nfrom transformers import PreTrainedModel",
    "tensorstream CLI --version": "import runpy, sys; sys.argv = ['tensorstream', '--version']\n"
    "try:\n    runpy.run_module('tensorstream.cli', run_name='__main__')\nexcept SystemExit:\n    pass",
}
PROBE = (
    "import time, sys\nstart = time.perf_counter()\n{code}\n"
    "print(time.perf_counter() - start, 'torch' in sys.modules, file=sys.stderr)"
)


def measure(code: str) -> tuple[float, bool]:
    """Seconds one fresh interpreter spends running ``code``, and whether torch was imported."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(code=code)], capture_output=True, text=True, check=True
    )
    seconds, torch_loaded = result.stderr.split()[-2:]
    return float(seconds), torch_loaded == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh interpreters per case (5); medians reported")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    results = {}
    for name, code in CASES.items():
        runs = [measure(code) for _ in range(args.runs)]
        results[name] = {"median_s": round(statistics.median(s for s, _ in runs), 3), "imports_torch": runs[0][1]}
    baseline = results["transformers, accelerate"]["median_s"]
    ratio = round(results["tensorstream"]["median_s"] / baseline, 3)
    if args.json:
        print(json.dumps({"runs": args.runs, "cases": results, "ratio_tensorstream_to_baseline": ratio}))
        return
    print(f"{'import':<48} {'median s':>9}  torch imported")
    for name, row in results.items():
        print(f"{name:<48} {row['median_s']:>9.3f}  {'yes' if row['imports_torch'] else 'no'}")
    print(
        f"\nimport tensorstream / import transformers, accelerate = {ratio:.3f} (target <= 1.2; {args.runs} runs each)"
    )


if __name__ == "__main__":
    main()
