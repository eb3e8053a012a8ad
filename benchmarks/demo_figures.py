"""The figures docs/index.md quotes for ``make demo``, measured by running the demo itself.

Runs ``examples/demo.py`` ``--runs`` times in fresh interpreters (the model and its store are built once, in the
demo's work folder) and parses the lines it prints. Measured, per run, for the streamed and the fully resident
model, each loaded, timed and measured the same way:

* decode speed (tokens/s over a whole ``generate`` call) of the first call and in the steady state (the median of
  the calls after the first); warm page cache: the store was just read by the run before, or by the reshard,
* the peak anonymous RSS above what the process held before loading the model (what the weights budget bounds,
  with activations and the KV cache on top) and the peak file-backed RSS above the same point (mapped pages of the
  store, or of the checkpoint for the resident model: page cache),
* whether the streamed output equals the resident one.

Reports the medians of the speeds and the largest memory peaks, and writes ``benchmarks/results/demo-figures.json``::

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
NUMBER = r"([0-9.]+)"
SECTIONS = {"streamed": "streamed with a weights budget of", "resident": "fully resident,"}
#: Per section of the demo's output: the key in the results and the line's pattern.
SECTION_PATTERNS = {
    "first_call_tokens_per_s": rf"speed, first call: +{NUMBER} tokens/s",
    "steady_state_tokens_per_s": rf"speed, steady state: +{NUMBER} tokens/s",
    "peak_anon_above_start_gb": rf"memory, anonymous: +{NUMBER} GB peak above",
    "peak_file_above_start_gb": rf"memory, file-backed: +{NUMBER} GB peak above",
}
PATTERNS = {"budget_gb": rf"weights budget of {NUMBER} GB", "store_gb": rf"store: .* \({NUMBER} GB\)"}


def run_demo(workdir: Path, tokens: int) -> dict[str, float | bool]:
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    command = [sys.executable, str(ROOT / "examples" / "demo.py"), "--workdir", str(workdir), "--tokens", str(tokens)]
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
    row: dict[str, float | bool] = {}
    for key, pattern in PATTERNS.items():
        row[key] = _number(out, pattern)
    for name, title in SECTIONS.items():
        section = out[out.index(title) :] if title in out else ""
        for key, pattern in SECTION_PATTERNS.items():
            row[f"{name}_{key}"] = _number(section, pattern)
    row["identical"] = "OK: the streamed output is bit-identical" in out
    return row


def _number(text: str, pattern: str) -> float:
    match = re.search(pattern, text)
    if match is None:
        raise SystemExit(f"the demo's output has no line matching {pattern!r}:\n{text}")
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".demo")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "demo-figures.json")
    args = parser.parse_args()
    runs = [run_demo(args.workdir, args.tokens) for _ in range(args.runs)]
    summary: dict[str, object] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_1min": os.getloadavg()[0]},
        "tokens": args.tokens,
        "runs": runs,
        "store_gb": runs[0]["store_gb"],
        "budget_gb": runs[0]["budget_gb"],
        "all_identical": all(r["identical"] for r in runs),
    }
    for name in SECTIONS:
        for key in ("first_call_tokens_per_s", "steady_state_tokens_per_s"):
            summary[f"median_{name}_{key}"] = statistics.median(float(r[f"{name}_{key}"]) for r in runs)
        for key in ("peak_anon_above_start_gb", "peak_file_above_start_gb"):
            summary[f"max_{name}_{key}"] = max(float(r[f"{name}_{key}"]) for r in runs)
    args.out.write_text(json.dumps(summary, indent=1))
    print(
        f"`make demo` ({summary['store_gb']:.3f} GB store, {summary['budget_gb']:.3f} GB budget, warm page cache, "
        f"{args.runs} runs, medians): steady state {summary['median_streamed_steady_state_tokens_per_s']:.1f} "
        f"tokens/s streamed vs {summary['median_resident_steady_state_tokens_per_s']:.1f} resident; first call "
        f"{summary['median_streamed_first_call_tokens_per_s']:.1f} vs "
        f"{summary['median_resident_first_call_tokens_per_s']:.1f}; peak above the start while streaming: "
        f"{summary['max_streamed_peak_anon_above_start_gb']:.3f} GB anonymous, "
        f"{summary['max_streamed_peak_file_above_start_gb']:.3f} GB file-backed (resident: "
        f"{summary['max_resident_peak_anon_above_start_gb']:.3f} GB, "
        f"{summary['max_resident_peak_file_above_start_gb']:.3f} GB); identical output: {summary['all_identical']}; "
        f"1-minute load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\nwrote {args.out}"
    )


if __name__ == "__main__":
    main()
