from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tensorstream.cli import main


def test_help_lists_the_commands() -> None:
    result = subprocess.run([sys.executable, "-m", "tensorstream.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("reshard", "inspect", "verify", "push", "pull"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["reshard", "inspect", "verify", "push", "pull"])
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0 and "usage" in capsys.readouterr().out


def test_reshard_inspect_verify(
    model_dirs: dict[str, Path], storage: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["reshard", str(model_dirs["llama"]), str(storage), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    store = result["store"]
    assert result["blocks"] == 6 and Path(store).parent == storage

    assert main(["reshard", str(model_dirs["llama"]), str(storage)]) == 0
    assert f"store: {store}" in capsys.readouterr().out

    assert main(["inspect", store]) == 0
    out = capsys.readouterr().out
    assert "model.layers.5" in out and "(non-block)" in out and "NO" not in out

    assert main(["inspect", store, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_class"] == "LlamaForCausalLM" and all(f["aligned"] for f in info["files"])

    assert main(["verify", store]) == 0
    assert "7/7 files ok" in capsys.readouterr().out

    damaged = Path(store) / "blocks" / "model.layers.1.ts.safetensors"
    raw = bytearray(damaged.read_bytes())
    raw[-10] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    assert main(["verify", store, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and [f["file"] for f in report["files"] if not f["ok"]] == [
        "blocks/model.layers.1.ts.safetensors"
    ]

    assert main(["inspect", store]) == 0  # headers only: the damage is in the data
    assert "DAMAGED" not in capsys.readouterr().out
    assert main(["inspect", store, "--checksum", "--json"]) == 1
    statuses = {f["block"]: f["checksum_status"] for f in json.loads(capsys.readouterr().out)["files"]}
    assert statuses["model.layers.1"] == "DAMAGED" and statuses["model.layers.0"] == "ok"


def test_reshard_prints_no_optional_dependency_noise(model_dirs: dict[str, Path], storage: Path) -> None:
    """A command that loads a model, run as users run it: no torchao "Failed to load" or torch "deprecated" lines."""
    command = [sys.executable, "-m", "tensorstream.cli", "reshard", str(model_dirs["llama"]), str(storage)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    screen = (result.stdout + result.stderr).lower()
    assert "failed to load" not in screen and "deprecated" not in screen, result.stderr
    assert "store: " in result.stdout


def test_errors_exit_1_with_the_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path)]) == 1
    assert "not a complete tensorstream store" in capsys.readouterr().err


def test_bad_usage_exits_2() -> None:
    with pytest.raises(SystemExit) as info:
        main(["reshard"])
    assert info.value.code == 2
