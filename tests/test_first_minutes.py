"""A new user's first five minutes (issue 13): ordinary mistakes, offline machines, advice that works as printed,
store housekeeping. Exit codes and messages go through the real entry point, most of them in a subprocess."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import tensorstream
from helpers.models import streaming
from tensorstream.cli import main


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``tensorstream ARGS`` in a fresh interpreter (the console script runs `tensorstream.cli:main`)."""
    return subprocess.run(
        [sys.executable, "-m", "tensorstream.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def run_advised(command: str) -> subprocess.CompletedProcess[str]:
    """Run a ``tensorstream ...`` command exactly as a message printed it."""
    argv = shlex.split(command)
    assert argv[0] == "tensorstream"
    return cli(*argv[1:])


def advised_command(text: str) -> str:
    commands = re.findall(r"`(tensorstream [^`]+)`", text)
    assert len(commands) == 1, text
    return commands[0]


# -- ordinary mistakes: one error line, exit 1 ---------------------------------------------------------------------


def test_reshard_of_a_folder_that_is_not_a_model(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_error_line(result := cli("reshard", str(empty), str(tmp_path / "stores")))
    assert result.returncode == 1 and str(empty) in line and "no config.json" in line
    (empty / "config.json").write_text('{"model_type": "llama"}')
    line = one_error_line(result := cli("reshard", str(empty), str(tmp_path / "stores")))
    assert result.returncode == 1 and "no weight files" in line
    assert not (tmp_path / "stores").exists() or not any((tmp_path / "stores").iterdir())


def test_inspect_and_verify_of_wrong_paths(model_dirs: dict[str, Path], storage: Path, tmp_path: Path) -> None:
    line = one_error_line(result := cli("inspect", str(tmp_path / "does-not-exist")))
    assert result.returncode == 1 and "does-not-exist does not exist" in line and "tensorstream cache ls" in line
    store = tensorstream.reshard(model_dirs["llama"], storage, progress=False)
    line = one_error_line(result := cli("verify", str(storage)))
    assert result.returncode == 1 and "is a storage root" in line
    commands = re.findall(r"`(tensorstream [^`]+)`", line)
    assert commands[0] == f"tensorstream verify {store}"
    assert all(run_advised(command).returncode == 0 for command in commands)  # verify STORE, cache ls ROOT


# -- the Hub, offline -----------------------------------------------------------------------------------------------


def test_pull_offline_is_exit_3_with_the_right_diagnosis(tmp_path: Path) -> None:
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    line = one_error_line(result := cli("pull", "org/model", env=env))
    assert result.returncode == 3 and "cannot be reached (HF_HUB_OFFLINE is set)" in line
    assert "not a tensorstream preshard repo" not in line and "Unset HF_HUB_OFFLINE" in line

    line = one_error_line(result := cli("pull", "org/model", "--local-files-only", env=env))
    assert result.returncode == 1 and "the local Hub cache has no tensorstream.json" in line

    line = one_error_line(result := cli("reshard", "org/model", str(tmp_path / "stores"), env=env))
    assert result.returncode == 3 and "HF_HUB_OFFLINE is set" in line


def test_an_unresolvable_hub_fails_fast_without_retries(tmp_path: Path) -> None:
    """``.invalid`` never resolves (RFC 2606): the host lookup fails and no HTTP request is retried."""
    env = {"HF_ENDPOINT": "https://hub.invalid", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "0"}
    for command in (["pull", "org/model"], ["reshard", "org/model", str(tmp_path / "stores")]):
        line = one_error_line(result := cli(*command, env=env))
        assert result.returncode == 3 and "hub.invalid cannot be resolved" in line, command


def test_a_malformed_repo_id_is_not_a_hub_error(tmp_path: Path) -> None:
    env = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    line = one_error_line(result := cli("pull", "bad//id", env=env))
    assert result.returncode == 1 and "not a valid Hub repo id" in line
    line = one_error_line(result := cli("reshard", "bad//id", str(tmp_path / "stores"), env=env))
    assert result.returncode == 1 and "neither a local folder nor a valid Hub repo id" in line


# -- advice works as printed ----------------------------------------------------------------------------------------


def _reference_logits(source: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.inference_mode():
        return model(torch.tensor([[1, 2, 3, 4]])).logits


def test_verify_advice_repairs_a_damaged_store(model_dirs: dict[str, Path], storage: Path) -> None:
    store = tensorstream.reshard(model_dirs["llama"], storage, progress=False)
    damaged = store / "blocks" / "model.layers.2.ts.safetensors"
    raw = bytearray(damaged.read_bytes())
    raw[-10] ^= 0xFF
    damaged.write_bytes(bytes(raw))

    result = cli("verify", str(store))
    assert result.returncode == 1 and "DAMAGED blocks/model.layers.2" in result.stdout
    command = advised_command(result.stdout)
    assert "--force" in command and "tensorstream verify" not in result.stdout
    assert run_advised(command).returncode == 0
    assert cli("verify", str(store)).returncode == 0
    model = streaming(model_dirs["llama"], storage, budget_gb=1, verify="checksum")
    with torch.inference_mode():
        assert torch.equal(model(torch.tensor([[1, 2, 3, 4]])).logits, _reference_logits(model_dirs["llama"]))


def test_load_error_advice_repairs_a_store_with_a_missing_file(model_dirs: dict[str, Path], storage: Path) -> None:
    store = tensorstream.reshard(model_dirs["llama"], storage, progress=False, dtype="bf16")
    (store / "blocks" / "model.layers.1.ts.safetensors").unlink()
    with pytest.raises(tensorstream.TensorStreamError) as info:
        streaming(model_dirs["llama"], storage, budget_gb=1, dtype="bf16")
    message = str(info.value)
    command = advised_command(message)
    assert "--dtype bfloat16" in command  # the store's dtype is part of its fingerprint: the command keeps it
    assert message.count("tensorstream reshard") == 1
    assert run_advised(command).returncode == 0
    streaming(model_dirs["llama"], storage, budget_gb=1, dtype="bf16")


def test_a_damaged_manifest_is_removed_by_the_advised_command(model_dirs: dict[str, Path], storage: Path) -> None:
    store = tensorstream.reshard(model_dirs["llama"], storage, progress=False)
    (store / "tensorstream.json").write_text("{")
    assert main(["inspect", str(store)]) == 1
    with pytest.raises(tensorstream.TensorStreamError) as info:
        streaming(model_dirs["llama"], storage, budget_gb=1)
    command = advised_command(str(info.value))
    assert command.startswith("tensorstream cache rm")
    assert run_advised(command).returncode == 0 and not store.exists()
    streaming(model_dirs["llama"], storage, budget_gb=1)


# -- store housekeeping ---------------------------------------------------------------------------------------------


def test_cache_ls_and_rm(model_dirs: dict[str, Path], storage: Path, tmp_path: Path) -> None:
    store = tensorstream.reshard(model_dirs["llama"], storage, progress=False)
    other = tensorstream.reshard(model_dirs["gpt2"], storage, progress=False)
    stale_partial = storage / ".0123456789abcdef.partial"
    (stale_partial / "blocks").mkdir(parents=True)
    (stale_partial / "blocks" / "x.ts.safetensors").write_bytes(b"\0" * 1000)
    outside = tmp_path / "precious"
    outside.mkdir()
    (storage / "fedcba9876543210").symlink_to(outside)  # a link named like a store: never followed or removed

    result = cli("cache", "ls", str(storage), "--json")
    assert result.returncode == 0
    entries = {e["name"]: e for e in json.loads(result.stdout)["entries"]}
    assert entries[store.name]["source"] == str(model_dirs["llama"])
    assert entries[store.name]["model_class"] == "LlamaForCausalLM" and entries[store.name]["size_bytes"] > 0
    assert entries[f".{store.name}.lock"]["stale"] and entries[stale_partial.name]["stale"]
    assert "fedcba9876543210" not in entries
    text = cli("cache", "ls", str(storage)).stdout
    assert "2 store(s)" in text and "stale leftover(s)" in text and str(model_dirs["gpt2"]) in text

    dry = cli("cache", "rm", "--stale", "--dry-run", "--storage-path", str(storage))
    assert dry.returncode == 0 and "would remove" in dry.stdout and stale_partial.exists()
    assert cli("cache", "rm", "--stale", "--storage-path", str(storage)).returncode == 0
    assert not stale_partial.exists() and not (storage / f".{store.name}.lock").exists() and store.is_dir()

    assert main(["cache", "rm", other.name[:6], "--storage-path", str(storage)]) == 0
    assert not other.exists() and store.is_dir() and outside.is_dir()
    assert main(["cache", "rm", "nothing-like-this", "--storage-path", str(storage)]) == 1
    assert main(["cache", "rm", "--storage-path", str(storage)]) == 2


def test_cache_rm_keeps_a_store_another_process_is_writing(model_dirs: dict[str, Path], storage: Path) -> None:
    store = tensorstream.reshard(model_dirs["llama"], storage, progress=False)
    lock = storage / f".{store.name}.lock"
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running reshard holds it
        listed = json.loads(cli("cache", "ls", str(storage), "--json").stdout)["entries"]
        assert all(e["in_use"] and not e["stale"] for e in listed)
        result = cli("cache", "rm", store.name, "--storage-path", str(storage))
        assert result.returncode == 1 and "in use" in one_error_line(result) and store.is_dir()
    finally:
        os.close(fd)


# -- errors before work ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_a_missing_cuda_device_is_reported_before_any_reshard(model_dirs: dict[str, Path], storage: Path) -> None:
    cfg = tensorstream.Config(device="cuda", storage_path=storage, budget_gb=1)
    with pytest.raises(tensorstream.ConfigError, match="no usable CUDA device"):
        AutoModelForCausalLM.from_pretrained(model_dirs["llama"], device_map="tensorstream", tensorstream_config=cfg)
    assert not storage.exists()


def test_environment_fills_the_fields_a_given_config_lacks(
    model_dirs: dict[str, Path], storage: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENSORSTREAM_PREFETCH", "1")
    monkeypatch.setenv("TENSORSTREAM_BUDGET_GB", "1")
    model = streaming(model_dirs["llama"], storage, prefetch=0)  # prefetch given: it wins; the budget comes from env
    plan = model._tensorstream_engine.plan
    assert plan.budget_bytes == 1_000_000_000 and plan.prefetch == 0


def test_a_budget_below_the_minimum_fails_before_any_reshard(model_dirs: dict[str, Path], storage: Path) -> None:
    with pytest.raises(tensorstream.BudgetError) as info:
        streaming(model_dirs["llama"], storage, budget_gb=1e-4)
    assert not storage.exists() or not any(storage.glob("[0-9a-f]*"))  # nothing resharded
    advised = re.search(r"to at least ([0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)", str(info.value))
    assert advised is not None
    model = streaming(model_dirs["llama"], storage, budget_gb=float(advised.group(1)))  # the advice works
    assert model._tensorstream_engine.plan.streamed


def test_budget_error_minimum_bytes_is_exact_or_none(model_dirs: dict[str, Path], storage: Path) -> None:
    """Before a reshard only an upper bound is known: ``minimum_bytes`` is None and ``suggested_bytes`` works. With
    the store, ``minimum_bytes`` is the true minimum: exactly that budget plans, one byte less fails."""
    from tensorstream.store import Store
    from tensorstream.stream import plan_for

    with pytest.raises(tensorstream.BudgetError) as info:
        streaming(model_dirs["llama"], storage, budget_gb=1e-4)
    assert info.value.minimum_bytes is None and info.value.suggested_bytes is not None
    streaming(model_dirs["llama"], storage, budget_gb=info.value.suggested_bytes / 1e9)  # works as given
    (path,) = [p for p in storage.iterdir() if not p.name.startswith(".")]
    store = Store.open(path)
    with pytest.raises(tensorstream.BudgetError) as exact:
        plan_for(store, tensorstream.Config(device="cpu", budget_gb=1e-4, storage_path=storage))
    minimum = exact.value.minimum_bytes
    assert minimum is not None and exact.value.suggested_bytes is not None
    assert exact.value.suggested_bytes >= minimum
    plan = plan_for(store, tensorstream.Config(device="cpu", budget_gb=minimum / 1e9, storage_path=storage))
    assert plan.budget_bytes == minimum and plan.device_bytes <= minimum
    with pytest.raises(tensorstream.BudgetError):
        plan_for(store, tensorstream.Config(device="cpu", budget_gb=(minimum - 1) / 1e9, storage_path=storage))
