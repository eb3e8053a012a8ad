"""The figures docs/index.md quotes for ``make demo``, measured by running the demo itself.

Runs ``examples/demo.py`` ``--runs`` times in fresh interpreters (the model and its store are built once, in the
demo's work folder) and parses the lines it prints. Measured, per run:

* streamed and fully resident decode speed (tokens/s over the whole ``generate`` call, warm page cache: the
  store was just read by the run before, or by the reshard),
* the peak RSS above the interpreter while streaming (``VmHWM`` minus the ``VmRSS`` before loading), next to the
  weights budget; the difference is activations, the KV cache, thread stacks and allocator slack,
* whether the streamed output equals the resident one.

Reports the median speeds and the largest peak RSS, and writes ``benchmarks/results/demo-figures.json``::

    python benchmarks/demo_figures.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATTERNS = {
    "streamed_tokens_per_s": r"streamed generation \(\d+ tokens in [0-9.]+ s, ([0-9.]+) tokens/s\)",
    "resident_tokens_per_s": r"fully resident generation \(([0-9.]+) tokens/s\)",
    "peak_rss_above_interpreter_gb": r"peak RSS while streaming: ([0-9.]+) GB above",
    "budget_gb": r"weights budget ([0-9.]+) GB",
    "store_gb": r"store: .* \(([0-9.]+) GB\)",
}


def run_demo(workdir: Path, tokens: int) -> dict[str, float | bool]:
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    command = [sys.executable, str(ROOT / "examples" / "demo.py"), "--workdir", str(workdir), "--tokens", str(tokens)]
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
    row: dict[str, float | bool] = {}
    for key, pattern in PATTERNS.items():
        match = re.search(pattern, out)
        if match is None:
            raise SystemExit(f"the demo's output has no line matching {pattern!r}:\n{out}")
        row[key] = float(match.group(1))
    row["identical"] = "OK: the streamed output is bit-identical" in out
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".demo")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "demo-figures.json")
    args = parser.parse_args()
    runs = [run_demo(args.workdir, args.tokens) for _ in range(args.runs)]
    summary = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_1min": os.getloadavg()[0]},
        "tokens": args.tokens,
        "runs": runs,
        "store_gb": runs[0]["store_gb"],
        "budget_gb": runs[0]["budget_gb"],
        "median_streamed_tokens_per_s": statistics.median(float(r["streamed_tokens_per_s"]) for r in runs),
        "median_resident_tokens_per_s": statistics.median(float(r["resident_tokens_per_s"]) for r in runs),
        "max_peak_rss_above_interpreter_gb": max(float(r["peak_rss_above_interpreter_gb"]) for r in runs),
        "all_identical": all(r["identical"] for r in runs),
    }
    args.out.write_text(json.dumps(summary, indent=1))
    print(
        f"`make demo` ({summary['store_gb']:.3f} GB store, {summary['budget_gb']:.3f} GB budget, warm page cache, "
        f"{args.runs} runs): {summary['median_streamed_tokens_per_s']:.1f} tokens/s streamed vs "
        f"{summary['median_resident_tokens_per_s']:.1f} resident (medians); peak RSS above the interpreter while "
        f"streaming up to {summary['max_peak_rss_above_interpreter_gb']:.3f} GB; identical output: "
        f"{summary['all_identical']}; 1-minute load average at the end {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs\nwrote {args.out}"
    )


if __name__ == "__main__":
    main()
