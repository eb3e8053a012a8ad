"""Every mixture-of-experts causal LM of transformers' registry at realistic routing, streamed vs resident.

    python scripts/moe_sweep.py                       # all families; results + the docs tables
    python scripts/moe_sweep.py --only qwen3_moe mixtral      # rerun these rows of the last full run

Each family is built by `tests/test_moe.py`'s rule (64 experts, top-4, its own shared experts, dense first layers
and expert groups), in a subprocess of its own (a crash or a hang is one row, not the sweep), and compared with
`torch.equal` against the resident load of the same checkpoint: logits and a greedy generation, a budget where the
blocks stream, with the mapped backend (``routed``) and the POSIX one (``gathered``: experts gathered into compact
tensors, where a layer's gather buffer leaves room for streaming). Rows go to
``benchmarks/results/moe-sweep.jsonl``; the tables between the ``moe-sweep`` markers of ``docs/models.md`` and the
``moe-families`` markers of ``docs/moe.md`` are rewritten from them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "moe-sweep.jsonl"
DOCS = ROOT / "docs" / "models.md"
MOE_DOCS = ROOT / "docs" / "moe.md"
BEGIN, END = "<!-- moe-sweep:begin -->", "<!-- moe-sweep:end -->"
FAMILIES = ("<!-- moe-families:begin -->", "<!-- moe-families:end -->")


def _tests() -> Any:
    sys.path.insert(0, str(ROOT / "tests"))
    spec = importlib.util.spec_from_file_location("test_moe", ROOT / "tests" / "test_moe.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one(model_type: str) -> dict[str, Any]:
    import tensorstream

    tests = _tests()
    row: dict[str, Any] = {"model_type": model_type}
    with tempfile.TemporaryDirectory() as work:
        try:
            gathered = tests.check_streamed_equals_resident(model_type, Path(work) / "posix", "posix")[0]
            row["gathered"] = bool(gathered._tensorstream_engine.plan.routed)
            del gathered
            streamed, _ = tests.check_streamed_equals_resident(model_type, Path(work) / "mmap", "mmap")
        except AssertionError as err:
            row.update(bit_exact=False, error=str(err).splitlines()[0][:300])
            return row
        except Exception as err:
            row.update(bit_exact=None, error=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
            return row
        plan = streamed._tensorstream_engine.plan
        stats = tensorstream.stats(streamed)
        row.update(
            bit_exact=True,
            routed=bool(plan.routed),
            streamed_blocks=len(plan.streamed),
            routed_blocks=len(plan.routed),
            reason=plan.whole_block_reason,
            experts_routed=stats.experts_routed,
            expert_bytes_read=stats.expert_bytes_read,
        )
    return row


def write_docs(rows: list[dict[str, Any]]) -> None:
    lines = [
        BEGIN,
        "",
        "| family | routed experts (mapped) | gathered (POSIX) | logits and generation | notes |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in sorted(rows, key=lambda r: r["model_type"]):
        exact = {True: "bit-exact", False: "differs", None: "not built"}[row.get("bit_exact")]
        routed = "yes" if row.get("routed") else "no: whole blocks"
        note = row.get("error") or row.get("reason") or ""
        gathered = ("yes" if row.get("gathered") else "no") if row.get("bit_exact") else ""
        lines.append(
            f"| {row['model_type']} | {routed if row.get('bit_exact') else ''} | {gathered} | {exact} | {note} |"
        )
    lines += ["", END]
    routed = sorted(r["model_type"] for r in rows if r.get("bit_exact") and r.get("routed"))
    whole = sorted(r["model_type"] for r in rows if r.get("bit_exact") and not r.get("routed"))
    unbuilt = sorted(r["model_type"] for r in rows if r.get("bit_exact") is None)
    differ = sorted(r["model_type"] for r in rows if r.get("bit_exact") is False)
    table = [
        FAMILIES[0],
        "| streaming | families |",
        "| --- | --- |",
        f"| routed experts, bit-exact ({len(routed)}) | {', '.join(routed)} |",
        f"| whole blocks, bit-exact ({len(whole)}) | {', '.join(whole)}: their experts are not behind the interface "
        "(Llama 4 multiplies every expert; JetMoE and Doge keep their own expert modules; LongCat-Flash routes to "
        "zero-computation experts in its own forward), so the routing is not known before the weights are needed. "
        "`Plan.describe()` says so. |",
    ]
    if differ:
        table.append(f"| not bit-exact ({len(differ)}) | {', '.join(differ)} |")
    if unbuilt:
        table.append(
            f"| not built ({len(unbuilt)}) | {', '.join(unbuilt)}: the tiny config does not build a model in this "
            "transformers (nothing to stream) |"
        )
    table.append(FAMILIES[1])
    moe = MOE_DOCS.read_text()
    head, rest = moe.split(FAMILIES[0], 1)
    MOE_DOCS.write_text(head + "\n".join(table) + rest.split(FAMILIES[1], 1)[1])
    text = DOCS.read_text()
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + "\n".join(lines) + rest.split(END, 1)[1]
    else:
        text += (
            "\n## Mixture-of-experts models at realistic routing\n\n"
            + (
                "`scripts/moe_sweep.py` builds every mixture-of-experts causal LM of the registry with 64 experts, "
                "top-4 and the family's own shared experts, dense first layers and expert groups (the sweep above "
                "caps them at 4 experts, where tensor alignment hides differences), streams it with the mapped and "
                "the POSIX backend and compares logits and a greedy generation with the resident load; "
                "`tests/test_moe.py` runs the same check (all families under `-m slow`). See [moe](moe.md).\n\n"
            )
            + "\n".join(lines)
            + "\n"
        )
    DOCS.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="model types (default: every mixture of experts)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(one(args.worker)), flush=True)
        return 0
    types = args.only or _tests().moe_types()
    rows = []
    for model_type in types:
        try:
            done = subprocess.run(
                [sys.executable, __file__, "--worker", model_type],
                capture_output=True,
                text=True,
                timeout=args.timeout,
                check=False,
            )
            found = [line for line in done.stdout.splitlines() if line.startswith("{")]
            row = json.loads(found[-1]) if found else {
                "model_type": model_type, "bit_exact": None, "error": done.stderr.strip().splitlines()[-1][:300]
            }  # fmt: skip
        except subprocess.TimeoutExpired:
            row = {"model_type": model_type, "bit_exact": None, "error": f"timed out after {args.timeout:.0f} s"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.only and RESULTS.exists():  # rerun rows replace theirs in the last full run
        fresh = {row["model_type"]: row for row in rows}
        previous = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
        rows = [fresh.pop(row["model_type"], row) for row in previous] + list(fresh.values())
    RESULTS.write_text("".join(json.dumps(row) + "\n" for row in rows))
    write_docs(rows)
    return 0 if all(row.get("bit_exact") for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
