from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tensorstream import Config, ConfigError


def test_defaults() -> None:
    cfg = Config()
    assert cfg.prefetch == 2 and cfg.backend == "auto" and cfg.verify == "header" and cfg.direct_io is None
    assert cfg.budget_gb is None and cfg.budget_bytes is None and cfg.host_cache_gb == 0.0 and cfg.dtype is None
    assert cfg.device == torch.device("cuda", 0) if torch.cuda.is_available() else cfg.device == torch.device("cpu")
    assert str(cfg.storage_path).endswith("tensorstream")


def test_frozen_and_keyword_only() -> None:
    cfg = Config(budget_gb=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.budget_gb = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        Config(5)  # type: ignore[misc]
    assert cfg.budget_bytes == 5_000_000_000
    assert cfg.replace(prefetch=4).prefetch == 4


def test_vram_budget_gb_is_the_old_spelling() -> None:
    assert Config(vram_budget_gb=3).budget_gb == 3.0
    assert Config(vram_budget_gb=3, budget_gb=3).budget_gb == 3.0
    with pytest.raises(ConfigError, match="disagree"):
        Config(vram_budget_gb=3, budget_gb=4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget_gb": 0}, "budget_gb"),
        ({"budget_gb": "lots"}, "budget_gb"),
        ({"prefetch": -1}, "prefetch"),
        ({"prefetch": 1.5}, "prefetch"),
        ({"io_threads": 0}, "io_threads"),
        ({"backend": "fast"}, "backend"),
        ({"verify": "sometimes"}, "verify"),
        ({"dtype": "int8"}, "dtype"),
        ({"dtype": torch.int8}, "dtype"),
        ({"device": "gpu7"}, "device"),
        ({"direct_io": "maybe"}, "direct_io"),
        ({"host_cache_gb": -1}, "host_cache_gb"),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Config(**kwargs)


def test_errors_are_also_value_errors() -> None:
    with pytest.raises(ValueError):
        Config(prefetch=-1)


@pytest.mark.parametrize(
    ("text", "dtype"),
    [("bf16", torch.bfloat16), ("torch.float16", torch.float16), ("float32", torch.float32), ("auto", None)],
)
def test_dtype_spellings(text: str, dtype: torch.dtype | None) -> None:
    assert Config(dtype=text).dtype == dtype


def test_from_env_precedence(tmp_path: Path) -> None:
    file = tmp_path / "ts.toml"
    file.write_text('budget_gb = 1\nprefetch = 5\nbackend = "mmap"\n')
    env = {
        "TENSORSTREAM_CONFIG_FILE": str(file),
        "TENSORSTREAM_BUDGET_GB": "2.5",
        "TENSORSTREAM_DIRECT_IO": "false",
        "TENSORSTREAM_DEVICE": "cpu",
        "TENSORSTREAM_STORAGE_PATH": str(tmp_path / "s"),
        "TENSORSTREAM_DTYPE": "bf16",
        "TENSORSTREAM_IO_THREADS": "3",
        "OTHER": "x",
    }
    cfg = Config.from_env(env, prefetch=1)
    assert cfg.budget_gb == 2.5  # env wins over the file
    assert cfg.prefetch == 1  # explicit wins over everything
    assert cfg.backend == "mmap"  # from the file
    assert cfg.direct_io is False and cfg.device == torch.device("cpu") and cfg.dtype == torch.bfloat16
    assert cfg.io_threads == 3 and Path(cfg.storage_path) == tmp_path / "s"  # type: ignore[arg-type]


def test_from_env_json_file_and_table(tmp_path: Path) -> None:
    file = tmp_path / "ts.json"
    file.write_text(json.dumps({"budget_gb": 7}))
    assert Config.from_env({"TENSORSTREAM_CONFIG_FILE": str(file)}).budget_gb == 7
    toml = tmp_path / "ts.toml"
    toml.write_text("[tensorstream]\nprefetch = 4\n")
    assert Config.from_env({"TENSORSTREAM_CONFIG_FILE": str(toml)}).prefetch == 4


def test_from_env_rejects_bad_files_and_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        Config.from_env({"TENSORSTREAM_CONFIG_FILE": str(tmp_path / "missing.toml")})
    bad = tmp_path / "bad.toml"
    bad.write_text("budget_gb = = 1")
    with pytest.raises(ConfigError, match="not valid"):
        Config.from_env({"TENSORSTREAM_CONFIG_FILE": str(bad)})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("budget = 1")
    with pytest.raises(ConfigError, match="unknown settings"):
        Config.from_env({"TENSORSTREAM_CONFIG_FILE": str(unknown)})
    with pytest.raises(ConfigError, match="TENSORSTREAM_PREFETCH"):
        Config.from_env({"TENSORSTREAM_PREFETCH": "many"})


def test_from_env_warns_about_unknown_variables() -> None:
    with pytest.warns(UserWarning, match="TENSORSTREAM_BUDGET is not a tensorstream setting"):
        Config.from_env({"TENSORSTREAM_BUDGET": "5"})


def test_local_rank_picks_the_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert Config(device="cuda").device == torch.device("cuda", 1)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), True, False, "nan"])
def test_budget_must_be_a_finite_number(value: object) -> None:
    with pytest.raises(ConfigError, match="budget_gb"):
        Config(budget_gb=value)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="host_cache_gb"):
        Config(host_cache_gb=value)  # type: ignore[arg-type]


def test_budget_text_with_a_unit() -> None:
    assert Config(budget_gb="5GB").budget_gb == 5.0  # type: ignore[arg-type]
    assert Config(budget_gb="500 MB").budget_gb == 0.5  # type: ignore[arg-type]
    assert Config.from_env({"TENSORSTREAM_BUDGET_GB": "2gb"}).budget_gb == 2.0
    with pytest.raises(ConfigError, match="GiB are not accepted"):
        Config(budget_gb="5GiB")  # type: ignore[arg-type]


def test_misspelt_field_names_the_right_one() -> None:
    with pytest.raises(ConfigError, match="did you mean budget_gb=") as info:
        Config(budget_g=5)  # type: ignore[call-arg]
    assert isinstance(info.value, ValueError)
    with pytest.raises(ConfigError, match="did you mean prefetch="):
        Config.from_env({}, prefech=3)


def test_from_env_takes_a_file_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "ts.toml"
    file.write_text("prefetch = 3\nbudget_gb = 2\n")
    monkeypatch.setenv("TENSORSTREAM_BUDGET_GB", "4")
    cfg = Config.from_env(file)
    assert cfg.prefetch == 3 and cfg.budget_gb == 4.0  # the environment wins over the file
    assert Config.from_env(str(file), prefetch=1).prefetch == 1


def test_config_file_table_and_top_level_keys_conflict(tmp_path: Path) -> None:
    file = tmp_path / "ts.toml"
    file.write_text("prefetch = 3\n[tensorstream]\nbudget_gb = 2\n")
    with pytest.raises(ConfigError, match="move them into the \\[tensorstream\\] table"):
        Config.from_env(file)
    file.write_text("[tool]\nx = 1\n[tensorstream]\nbudget_gb = 2\n")  # other tools' tables are left alone
    assert Config.from_env(file).budget_gb == 2.0
    file.write_text("[tensorstream]\nbudget_g = 2\n")
    with pytest.raises(ConfigError, match="did you mean budget_gb"):
        Config.from_env(file)


@pytest.mark.parametrize("name", ["ts.yaml", "ts.yml", "ts.ini", "ts"])
def test_config_file_of_another_format_is_refused(tmp_path: Path, name: str) -> None:
    file = tmp_path / name
    file.write_text("budget_gb: 2\n")
    with pytest.raises(ConfigError, match=r"TOML \(\.toml\) or JSON"):
        Config.from_env({"TENSORSTREAM_CONFIG_FILE": str(file)})


def test_given_fields_win_and_the_environment_fills_the_rest() -> None:
    env = {"TENSORSTREAM_PREFETCH": "1", "TENSORSTREAM_BUDGET_GB": "5"}
    cfg = Config(prefetch=4, device="cpu").with_env(env)
    assert cfg.prefetch == 4 and cfg.budget_gb == 5.0
    assert Config(vram_budget_gb=3).with_env(env).budget_gb == 3.0
    assert Config(prefetch=4).replace(io_threads=1).with_env(env).budget_gb == 5.0
    assert Config(prefetch=4).explicit_fields == {"prefetch"}
