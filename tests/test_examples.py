"""The examples run as users run them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_quickstart() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "(identical)" in result.stdout


#: What an optional dependency prints when it is imported on a machine it was not built for (torchao's CUDA
#: extensions, torch's pytree deprecation notice): alarming noise on the first screen a user sees.
NOISE = ("failed to load", "deprecated")


def test_demo(tmp_path: Path) -> None:
    """The demo runs clean, with first-call and steady-state speed and anonymous/file-backed memory for both models."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "demo.py"), "--workdir", str(tmp_path), "--tokens", "4", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    screen = (result.stdout + result.stderr).lower()
    assert not [word for word in NOISE if word in screen], result.stdout + result.stderr
    assert "OK: the streamed output is bit-identical" in out
    assert "16 streamed" in out
    for title in ("streamed with a weights budget of", "fully resident,"):
        section = out[out.index(title) :]
        for label in ("speed, first call:", "speed, steady state:", "memory, anonymous:", "memory, file-backed:"):
            assert re.search(rf"{label} +[0-9.]+ (tokens/s|GB peak above)", section), (title, label, out)
    assert "what the weights budget bounds" in out and "page cache, which the kernel reclaims" in out
    assert re.search(r"streamed speed / resident speed: [0-9.]+x in the steady state, [0-9.]+x on the first call", out)


def run_example(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_offload() -> None:
    out = run_example(str(EXAMPLES / "offload.py")).stdout
    assert "(identical, before and after detach)" in out and "freed from memory" in out


def test_preshard() -> None:
    out = run_example(str(EXAMPLES / "preshard.py")).stdout
    assert "library_name: tensorstream" in out and "(identical)" in out


def test_pipeline() -> None:
    assert "(identical)" in run_example(str(EXAMPLES / "pipeline.py")).stdout


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_accelerate_launch_two_ranks(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Two CPU ranks (gloo) under `accelerate launch` stream one shared store that only one of them wrote."""
    import json
    import os

    folder = EXAMPLES / "accelerate_launch"
    storage, out = tmp_path / "stores", tmp_path / "results"
    settings = tmp_path / "tensorstream.toml"
    settings.write_text("[tensorstream]\nbudget_gb = 0.0005\nprefetch = 1\n")  # the tiny Llama streams every block
    env = {
        **os.environ,
        "TENSORSTREAM_STORAGE_PATH": str(storage),
        "TENSORSTREAM_DEVICE": "cpu",
        "TENSORSTREAM_CONFIG_FILE": str(settings),
    }
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(folder / "accelerate_config.yaml"),
        "--main_process_port",
        str(free_port()),
        str(folder / "generate.py"),
        "--model",
        str(model_dirs["llama"]),
        "--out",
        str(out),
        "--check",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert all(r["logits_equal"] and r["generate_equal"] and r["streamed_blocks"] == 6 for r in ranks), ranks
    assert sorted(r["resharded"] for r in ranks) == [False, True], log  # one rank wrote the store, one reused it
    stores = [p for p in storage.iterdir() if not p.name.startswith(".")]
    assert len(stores) == 1 and not list(storage.glob(".*.partial")), list(storage.iterdir())
    for rank in range(2):  # settings reached both ranks (env and the config file), and both streamed the one store
        assert f"[rank {rank}] world size 2, device cpu, budget 0.0005 GB, store {storage}" in log, log
        assert f"[rank {rank}] tensorstream: streaming 6 of 6 blocks from {stores[0]}" in log, log
    print("\n".join(line for line in log.splitlines() if line.startswith("[rank")))
