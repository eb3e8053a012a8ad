"""`tensorstream bench` runs end to end on a tiny model and reports every field (timings are not asserted)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tensorstream.bench import drop_page_cache, format_table, raw_read_gb_per_s, run_bench, write_json


def test_raw_read_reads_every_byte(tmp_path: Path) -> None:
    files = []
    for i in range(3):
        path = tmp_path / f"f{i}.bin"
        path.write_bytes(bytes(range(256)) * (4096 + i))
        files.append(path)
    drop_page_cache(files)
    assert raw_read_gb_per_s(files, direct=False, threads=2) > 0


@pytest.fixture(scope="module")
def result(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("bench")
    return run_bench(
        model_dirs["llama"], workdir=work, budget_fraction=0.7, device="cpu", batches=(1, 2), tokens=3, runs=1,
        compare=("accelerate",), max_threads=2,
    )  # fmt: skip


def test_bench_reports_every_field(result: dict, tmp_path: Path) -> None:
    assert set(result) == {"machine", "model", "budget", "disk", "settings", "results", "ratios", "targets"}
    assert result["disk"]["best_gb_per_s"] > 0 and result["disk"]["runs"]
    assert result["budget"]["streamed_blocks"] > 0
    systems = {(r["system"], r["cache"], r["batch"]) for r in result["results"]}
    for system in ("tensorstream", "accelerate"):
        for cache in ("cold", "warm"):
            for batch in (1, 2):
                assert (system, cache, batch) in systems
    assert ("resident", "warm", 1) in systems
    for row in result["results"]:
        assert row["s_per_token"] > 0 and row["tokens_per_s"] > 0 and row["runs"]
        if row["system"] == "tensorstream":
            assert {"gb_per_s", "wait_fraction", "read_gb_per_s", "sync_loads", "peak_rss_above_baseline"} <= set(row)
    cold = next(r for r in result["ratios"] if r["cache"] == "cold" and r["batch"] == 1)
    assert {"lower_bound_s_per_token", "s_per_token_over_bound", "gb_per_s_over_disk"} <= set(cold)
    assert {"tokens_per_s_over_resident", "tokens_per_s_over_accelerate"} <= set(cold)
    assert "warm_0.8x_resident" in result["targets"] and "cold_1.8x_accelerate" in result["targets"]
    table = format_table(result)
    assert "accelerate" in table and "disk (best raw cold read)" in table
    write_json(result, tmp_path / "bench.json")
    assert json.loads((tmp_path / "bench.json").read_text())["model"]["blocks"] == 6


def test_cli_bench_writes_json(
    model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tensorstream.cli import main

    out = tmp_path / "bench.json"
    argv = [
        "bench", str(model_dirs["gpt2"]), "--device", "cpu", "--budget-fraction", "0.8", "--batch", "1",
        "--tokens", "3", "--runs", "1", "--cache", "warm", "--no-resident", "--workdir", str(tmp_path),
        "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    assert "tensorstream" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [r["system"] for r in result["results"]] == ["tensorstream"]


def test_direct_io_self_test_only_for_stores_larger_than_ram(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from tensorstream.backends.posix import choose_direct_io, direct_io_supported

    (tmp_path / "blocks").mkdir()
    for i in range(2):
        (tmp_path / "blocks" / f"b{i}.ts.safetensors").write_bytes(bytes(1 << 20))
    assert choose_direct_io(tmp_path, 2 << 20) is False  # fits in RAM: buffered, no test run
    with caplog.at_level(logging.INFO, logger="tensorstream"):
        choice = choose_direct_io(tmp_path, 2 << 20, larger_than_ram=True)
    if direct_io_supported(tmp_path):
        assert "cold read self-test" in caplog.text and isinstance(choice, bool)
    else:
        assert choice is False


def test_bench_a_store_whose_source_is_gone_benchmarks_that_store(
    model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``bench STORE`` streams the store given (no reshard from its recorded source); warm only: no disk test."""
    import shutil
    import subprocess
    import sys

    import tensorstream

    source = tmp_path / "model"
    shutil.copytree(model_dirs["gpt2"], source)
    store = tensorstream.reshard(source, tmp_path / "stores", progress=False)
    shutil.rmtree(source)
    out = tmp_path / "bench.json"
    argv = [
        "bench", str(store), "--device", "cpu", "--budget-fraction", "0.8", "--batch", "1", "--tokens", "2",
        "--runs", "1", "--cache", "warm", "--no-resident", "--workdir", str(tmp_path / "work"), "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "tensorstream.cli", *argv], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "raw cold reads" not in result.stderr and "disk: not measured" in result.stdout
    assert ":," not in result.stdout
    data = json.loads(out.read_text())
    assert data["model"]["store"] == str(store) and data["disk"] is None
    assert not (tmp_path / "work" / "stores").exists()  # nothing was resharded
    for row in data["results"]:  # floats rounded: no measurement-noise digits
        assert all(len(repr(v)) <= 12 for v in row.values() if isinstance(v, float))


def test_bench_budget_too_small_fails_before_measuring(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    import subprocess
    import sys

    argv = [
        "bench", str(model_dirs["llama"]), "--device", "cpu", "--budget-fraction", "0.01", "--workdir",
        str(tmp_path), "--out", str(tmp_path / "bench.json"),
    ]  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "tensorstream.cli", *argv], capture_output=True, text=True)
    assert result.returncode == 1 and "raw cold reads" not in result.stderr and "Traceback" not in result.stderr
    advice = re.search(r"rerun with --budget-gb ([0-9.]+)", result.stderr)
    assert advice is not None and "TENSORSTREAM_BUDGET_GB" not in result.stderr
    argv[argv.index("--budget-fraction") : argv.index("--budget-fraction") + 2] = ["--budget-gb", advice.group(1)]
    argv += ["--batch", "1", "--tokens", "2", "--runs", "1", "--cache", "warm", "--no-resident"]
    followed = subprocess.run([sys.executable, "-m", "tensorstream.cli", *argv], capture_output=True, text=True)
    assert followed.returncode == 0, followed.stderr


def test_bench_measures_each_backend_and_assisted_generation(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    result = run_bench(
        model_dirs["llama"], workdir=tmp_path, budget_fraction=0.7, device="cpu", batches=(1,), tokens=6, runs=1,
        caches=("warm",), max_threads=1, backends=("posix", "mmap"), assistant="prompt-lookup",
    )  # fmt: skip
    rows = [r for r in result["results"] if r["system"] == "tensorstream"]
    assert [r["backend"] for r in rows] == ["posix", "mmap"]
    for row in rows:  # memory told in two parts; the budget bounds the anonymous one
        assert row["peak_file_rss"] > 0 and "peak_anon_rss_above_baseline" in row
    assisted = [r for r in result["results"] if r["system"] == "ts+assistant"]
    greedy = [r for r in result["results"] if r["system"] == "ts greedy"]
    assert len(assisted) == len(greedy) == 2  # one pair per backend
    for row in assisted:
        assert row["same_as_resident"] is True  # streamed + prompt lookup == resident + prompt lookup
        assert row["tokens_per_pass"] > 0 and row["weight_passes"] >= 1
    for row in greedy:
        assert row["tokens_per_pass"] == 6 / 6  # plain greedy: one pass per token (prefill included)
    assert {"peak_anon_rss_within_budget_plus_64MB", "warm_0.9x_resident"} <= set(result["targets"])
    table = format_table(result)
    assert "anon GB" in table and "tok/pass" in table and "same as resident: True" in table


def test_cold_condition_unmaps_the_zero_copy_mode_so_the_cache_drop_is_real(
    model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """posix_fadvise(DONTNEED) skips mapped pages: a kept mapping would make "cold" a warm measurement."""
    import tensorstream.bench as bench

    seen = []
    real = bench._decode

    def spy(model, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(model._tensorstream_engine.backend.keep_mapped)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(bench, "_decode", spy)
    run_bench(
        model_dirs["llama"], workdir=tmp_path, budget_fraction=0.7, device="cpu", batches=(1,), tokens=2, runs=1,
        caches=("cold", "warm"), max_threads=1, backends=("mmap",), resident=False,
    )  # fmt: skip
    assert seen == [False, True]  # cold: unmapped after each block, as for a store larger than RAM; warm: kept


def test_bench_measures_each_kv_cache_and_checks_its_tokens_against_resident(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """``kv_caches``: one row per cache implementation, its KV bytes, and its tokens checked against resident's.

    The offloaded cache itself runs on CUDA only (tests/test_kv_cache.py, scripts/gpu_check.sh); the static cache
    exercises the same rows, ratios and checks on a CPU.
    """
    from transformers import AutoConfig

    from tensorstream.plan import kv_cache_bytes

    result = run_bench(
        model_dirs["llama"], workdir=tmp_path, budget_fraction=0.7, device="cpu", batches=(1, 3), tokens=4, runs=1,
        caches=("warm",), max_threads=1, kv_caches=("dynamic", "static"),
    )  # fmt: skip
    assert result["settings"]["kv_caches"] == ["dynamic", "static"]
    rows = [r for r in result["results"] if r["system"] == "tensorstream"]
    pairs = [(1, "dynamic"), (1, "static"), (3, "dynamic"), (3, "static")]
    assert [(r["batch"], r["kv_cache"]) for r in rows] == pairs
    config = AutoConfig.from_pretrained(model_dirs["llama"])
    for row in rows:
        assert row["same_as_resident"] is True  # streamed tokens == resident tokens, same prompt, same cache
        length = result["settings"]["prompt_tokens"] + 4
        assert row["kv_cache_bytes"] == kv_cache_bytes(config, batch_size=row["batch"], sequence_length=length)
    resident = {(r["batch"], r["kv_cache"]) for r in result["results"] if r["system"] == "resident"}
    assert resident == set(pairs)
    static = [e for e in result["ratios"] if e["kv_cache"] == "static"]
    assert len(static) == 2 and all("tokens_per_s_over_resident" in e for e in static)
    table = format_table(result)
    assert table.count("KV static") == 6 and table.count("same as resident: True") == 4
    write_json(result, tmp_path / "bench.json")
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [r["kv_cache"] for r in data["results"] if r["system"] == "tensorstream"] == [r["kv_cache"] for r in rows]


def test_bench_offloaded_kv_cache_where_transformers_cannot_run_it_fails_before_measuring(
    model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """transformers 5 synchronises the offloaded cache with CUDA streams: on a CPU, a clear error, not a crash."""
    from tensorstream.bench import KV_CACHES
    from tensorstream.cli import _parser, main

    bench_parser = _parser()._subparsers._group_actions[0].choices["bench"]  # type: ignore[union-attr]
    (kv_option,) = [a for a in bench_parser._actions if a.dest == "kv_cache"]
    assert tuple(kv_option.choices or ()) == KV_CACHES
    argv = [
        "bench", str(model_dirs["llama"]), "--device", "cpu", "--kv-cache", "dynamic", "--kv-cache", "offloaded",
        "--workdir", str(tmp_path), "--out", str(tmp_path / "bench.json"),
    ]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "offloaded KV cache does not run on cpu" in err and "--device cuda" in err
    assert not (tmp_path / "stores").exists() and not (tmp_path / "bench.json").exists()  # nothing measured
