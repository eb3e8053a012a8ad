"""Crashes and full disks during reshard (issue #7, items 4 and 5).

A reshard killed with SIGKILL at many points (in child processes, see ``helpers/crash_worker.py``) leaves
nothing a later run would trust, and the rerun's store is byte-identical to an uninterrupted reshard's. A full
disk raises `StorageFullError` and leaves no partial store. Three processes resharding at once write one store,
once. The source checkpoint is hashed around every one of these.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import tensorstream
from helpers.faults import WriteLimit, disk_full
from tensorstream.store import MANIFEST_NAME, Store

HELPERS = Path(__file__).parent / "helpers"
reshard_module = importlib.import_module("tensorstream.reshard")
format_module = importlib.import_module("tensorstream.format")
staging_module = importlib.import_module("tensorstream.staging")

#: Kill points (see helpers/crash_worker.py); "bytes:random" entries are replaced by seeded random offsets.
KILL_POINTS = [
    "load",
    "bytes:0",
    "bytes:5000",
    "bytes:random",
    "bytes:random",
    "bytes:random",
    "bytes:random",
    "fsync:1",
    "fsync:5",
    "save:1",
    "save:4",
    "save:7",
    "json:model.safetensors.index.json",
    "json:tensorstream.json",
    "json-after:tensorstream.json",
    "publish-force",
]
RANDOM_SEED = int(os.environ.get("TENSORSTREAM_CRASH_SEED", "7"))


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (links followed), by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def visible(storage: Path) -> list[str]:
    """Entries of ``storage`` that are not tensorstream's hidden staging, lock or trash entries."""
    return sorted(p.name for p in storage.iterdir() if not p.name.startswith(".")) if storage.exists() else []


def assert_clean_and_equal(storage: Path, reference: Path) -> None:
    """``storage`` holds exactly the reference store (byte for byte) and its lock file: no leftovers."""
    assert sorted(p.name for p in storage.iterdir()) == sorted([reference.name, f".{reference.name}.lock"])
    assert tree_digest(storage / reference.name) == tree_digest(reference)


@pytest.fixture(scope="module")
def reference(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted reshard of the Llama: what every interrupted-then-rerun reshard must equal."""
    return tensorstream.reshard(model_dirs["llama"], tmp_path_factory.mktemp("reference"), progress=False)


#: The kill points `make test` runs (one of each kind: load, bytes, fsync, save, json, the --force swap); the
#: others run in `make test-slow`.
FAST_KILLS = {0, 3, 7, 10, 13, 15}


def _crash_runs(source: Path, reference: Path, work: Path, indices: list[int], race: bool) -> Any:
    """Run the kill points at ``indices`` (and the three-process race) in one helper process (imports once, forks
    per job); returns ``(source, {index: (job, outcome)}, race report, stderr)``."""
    written = sum(f.stat().st_size for f in reference.rglob("*.ts.safetensors"))
    rng = random.Random(RANDOM_SEED)  # every point drawn in order, so a point is the same whichever subset runs
    points = [f"bytes:{rng.randrange(1, written)}" if p == "bytes:random" else p for p in KILL_POINTS]
    kills = [{"point": points[i], "storage": str(work / f"kill-{i}")} for i in indices]
    jobs: dict[str, Any] = {"source": str(source), "kills": kills}
    if race:
        jobs["race"] = {"storage": str(work / "race"), "processes": 3, "log": str(work / "race.log")}
    (work / "jobs.json").write_text(json.dumps(jobs))
    before = tree_digest(source)
    result = subprocess.run(
        [sys.executable, str(HELPERS / "crash_worker.py"), str(work / "jobs.json")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert tree_digest(source) == before  # the source is byte-identical after every killed run
    report = json.loads(result.stdout.strip().splitlines()[-1])
    runs = dict(zip(indices, zip(kills, report["kills"], strict=True), strict=True))
    return source, runs, (jobs.get("race"), report.get("race")), result.stderr


@pytest.fixture(scope="module")
def crash_runs(model_dirs: dict[str, Path], reference: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The fast kill points and the three-process race."""
    work = tmp_path_factory.mktemp("crash")
    return _crash_runs(model_dirs["llama"], reference, work, sorted(FAST_KILLS), race=True)


@pytest.fixture(scope="module")
def crash_runs_slow(model_dirs: dict[str, Path], reference: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The other kill points."""
    work = tmp_path_factory.mktemp("crash-slow")
    indices = [i for i in range(len(KILL_POINTS)) if i not in FAST_KILLS]
    return _crash_runs(model_dirs["llama"], reference, work, indices, race=False)


@pytest.mark.parametrize(
    "index",
    [
        pytest.param(i, id=f"{i}-{point}", marks=() if i in FAST_KILLS else pytest.mark.slow)
        for i, point in enumerate(KILL_POINTS)
    ],
)
def test_sigkill_leaves_nothing_trusted_and_the_rerun_equals_an_uninterrupted_reshard(
    request: pytest.FixtureRequest, reference: Path, index: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, runs, _, stderr = request.getfixturevalue("crash_runs" if index in FAST_KILLS else "crash_runs_slow")
    job, outcome = runs[index]
    point, storage = job["point"], Path(job["storage"])
    assert outcome["signal"] == signal.SIGKILL, (point, outcome, stderr[-3000:])  # killed where the point says

    # Nothing a later run would trust: no store folder, and every .ts file left in staging is complete and exact.
    # Killed in --force after the atomic swap, the store at its path is the complete new one (never none).
    if point == "publish-force":
        assert visible(storage) == [reference.name]
        assert tree_digest(storage / reference.name) == tree_digest(reference)
    else:
        assert visible(storage) == []
    staging = storage / f".{reference.name}.partial"
    if staging.exists():
        assert not (storage / reference.name).exists()
        for file in staging.rglob("*.ts.safetensors"):
            rel = file.relative_to(staging)
            assert file.read_bytes() == (reference / rel).read_bytes(), (point, rel)

    # The rerun resumes: it writes only the .ts files not already complete, and ends equal to the reference.
    real_save = reshard_module.save_to_ts
    saved: list[str] = []
    monkeypatch.setattr(reshard_module, "save_to_ts", lambda *a, **k: saved.append(k["block"]) or real_save(*a, **k))
    before = tree_digest(source)
    path = tensorstream.reshard(source, storage, progress=False)
    assert tree_digest(source) == before
    assert path.name == reference.name
    if point.startswith("save:"):
        assert len(saved) == 7 - int(point.split(":")[1])
    assert_clean_and_equal(storage, reference)
    assert Store.open(path, verify="checksum").fingerprint == reference.name


def test_three_processes_resharding_at_once_write_one_store_once(crash_runs: Any, reference: Path) -> None:
    _, _, (race, outcome), stderr = crash_runs
    assert [r["exit"] for r in outcome] == [0, 0, 0], stderr[-3000:]
    lines = [line.split() for line in Path(race["log"]).read_text().splitlines()]
    writes = [line for line in lines if line[0] == "write"]
    done = [line for line in lines if line[0] == "done"]
    waited = [line for line in lines if line[0] == "wait"]
    assert len(writes) == 1 + 6 and len({line[1] for line in writes}) == 1  # seven files, all by one process
    assert len(done) == 3 and {line[2] for line in done} == {str(Path(race["storage"]) / reference.name)}
    assert waited  # the others really waited on the lock while the first one wrote
    assert_clean_and_equal(Path(race["storage"]), reference)


# -- full disks ----------------------------------------------------------------------------------------------------


def assert_storage_full(err: tensorstream.StorageFullError, storage: Path) -> None:
    assert isinstance(err, OSError) and isinstance(err, tensorstream.TensorStreamError)
    assert err.errno == errno.ENOSPC
    message = str(err)
    assert str(storage) in message and "storage_path" in message and "partial store was removed" in message


@pytest.mark.parametrize("budget", [0, 3000, 100_000, 400_000])
def test_full_disk_while_writing_ts_files_is_a_clear_error_and_leaves_no_partial_store(
    model_dirs: dict[str, Path], reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: int
) -> None:
    source, storage = model_dirs["llama"], tmp_path / "stores"
    before = tree_digest(source)
    monkeypatch.setattr(format_module, "open", WriteLimit(budget, disk_full), raising=False)
    with pytest.raises(tensorstream.StorageFullError) as info:
        tensorstream.reshard(source, storage, progress=False)
    assert_storage_full(info.value, storage)
    assert sorted(p.name for p in storage.iterdir()) == [f".{reference.name}.lock"]  # no store, no staging
    assert tree_digest(source) == before
    monkeypatch.undo()  # space freed: the retry completes and equals an uninterrupted reshard
    tensorstream.reshard(source, storage, progress=False)
    assert_clean_and_equal(storage, reference)


@pytest.mark.parametrize("where", ["fsync", "manifest"])
def test_full_disk_at_fsync_or_manifest_is_a_clear_error(
    model_dirs: dict[str, Path], reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    storage = tmp_path / "stores"
    if where == "fsync":  # delayed allocation: the data fits in the page cache, fsync finds no space
        monkeypatch.setattr(os, "fsync", lambda fd: disk_full("fsync"))
    else:
        monkeypatch.setattr(staging_module, "open", WriteLimit(10, disk_full), raising=False)
    with pytest.raises(tensorstream.StorageFullError) as info:
        tensorstream.reshard(model_dirs["llama"], storage, progress=False)
    assert_storage_full(info.value, storage)
    assert visible(storage) == [] and not (storage / f".{reference.name}.partial").exists()


def test_full_disk_during_offload_is_a_clear_error(
    model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    storage = tmp_path / "stores"
    monkeypatch.setattr(format_module, "open", WriteLimit(200_000, disk_full), raising=False)
    with pytest.raises(tensorstream.StorageFullError) as info:
        tensorstream.offload(model, tensorstream.Config(device="cpu", storage_path=storage, budget_gb=1))
    assert_storage_full(info.value, storage)
    assert "about" in str(info.value) and visible(storage) == []
    assert not any(p.name.endswith(".partial") for p in storage.iterdir())
    monkeypatch.undo()
    with torch.inference_mode():  # the model was not touched: it still runs, fully resident
        model(torch.tensor([[1, 2, 3]]))


def test_a_really_full_small_filesystem(model_dirs: dict[str, Path], reference: Path, tmp_path: Path) -> None:
    """A 256 kB tmpfs (needs root and mount; skipped elsewhere): the store does not fit."""
    mount = tmp_path / "small"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("needs root and mount(8) for a small tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        storage = mount / "stores"
        with pytest.raises(tensorstream.StorageFullError) as info:
            tensorstream.reshard(model_dirs["llama"], storage, progress=False)
        assert_storage_full(info.value, storage)
        assert sorted(p.name for p in storage.iterdir()) == [f".{reference.name}.lock"]
        assert shutil.disk_usage(mount).used < 64 << 10  # the space was given back
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_interrupted_force_reshard_keeps_nothing_stale(
    model_dirs: dict[str, Path], reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KeyboardInterrupt in the middle of ``--force``: the old store stays usable or the new one is complete."""
    storage = tmp_path / "stores"
    path = tensorstream.reshard(model_dirs["llama"], storage, progress=False)
    real_save = reshard_module.save_to_ts
    calls: list[str] = []

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(kwargs["block"])
        return real_save(*args, **kwargs)

    monkeypatch.setattr(reshard_module, "save_to_ts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tensorstream.reshard(model_dirs["llama"], storage, progress=False, force=True)
    assert tree_digest(path) == tree_digest(reference)  # the old store was not touched before the new was done
    assert not list((storage / f".{reference.name}.partial").rglob(".*.tmp-*"))
    monkeypatch.undo()
    tensorstream.reshard(model_dirs["llama"], storage, progress=False, force=True)
    assert_clean_and_equal(storage, reference)
    assert (storage / reference.name / MANIFEST_NAME).is_file()
