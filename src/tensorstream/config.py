"""`Config`: every setting of tensorstream in one frozen, keyword-only dataclass.

Settings come from three places; explicit arguments win over environment variables, which win over a
config file::

    Config(budget_gb=5)                       # explicit
    TENSORSTREAM_BUDGET_GB=5 python run.py    # environment, read by Config.from_env()
    TENSORSTREAM_CONFIG_FILE=ts.toml          # a TOML or JSON file with the same field names

The environment is how settings reach every rank of an ``accelerate launch`` / ``torchrun`` job.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import tomllib
import torch

from .errors import ConfigError

__all__ = ["ENV_PREFIX", "Config"]

ENV_PREFIX = "TENSORSTREAM_"
#: Variables with the prefix that are not Config fields but are still known (no warning for them).
_OTHER_KNOWN_ENV = {"TENSORSTREAM_CONFIG_FILE", "TENSORSTREAM_REQUIRE_GPU"}

Backend = Literal["auto", "posix", "mmap", "kvikio"]
Verify = Literal["off", "header", "checksum"]
_BACKENDS = ("auto", "posix", "mmap", "kvikio")
_VERIFY = ("off", "header", "checksum")

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def parse_dtype(value: str | torch.dtype | None, *, field: str = "dtype") -> torch.dtype | None:
    """Turn ``"bf16"``, ``"torch.bfloat16"`` or ``torch.bfloat16`` into a floating ``torch.dtype``."""
    if value is None or isinstance(value, torch.dtype):
        if isinstance(value, torch.dtype) and not value.is_floating_point:
            raise ConfigError(f"{field}={value} is not a floating-point dtype; only floating weights are converted.")
        return value
    name = str(value).strip().lower().removeprefix("torch.")
    if name in ("", "none", "auto", "keep"):
        return None
    if name not in _DTYPE_NAMES:
        raise ConfigError(
            f"{field}={value!r} is not a dtype tensorstream converts to; use one of {sorted(_DTYPE_NAMES)}."
        )
    return _DTYPE_NAMES[name]


def default_storage_path() -> Path:
    """``$HF_HUB_CACHE/tensorstream`` (by default ``~/.cache/huggingface/hub/tensorstream``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / "tensorstream"


def default_device() -> torch.device:
    """``cuda:$LOCAL_RANK`` when CUDA is available, else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """How tensorstream stores, plans and streams a model.

    Args:
        storage_path (`str` or `os.PathLike`, *optional*):
            Folder holding the resharded stores, one sub-folder per source fingerprint. Defaults to
            ``<HF hub cache>/tensorstream``.
        device (`str` or `torch.device`, *optional*):
            Execution device. Defaults to ``cuda:$LOCAL_RANK`` when CUDA is available, else ``cpu``.
        budget_gb (`float`, *optional*):
            Weights budget on the execution device in GB of 10^9 bytes (VRAM on a GPU, RAM on CPU). It covers
            the resident weights plus the streaming slots. ``None`` sizes it from the free memory (80% of it,
            cgroup limits respected).
        vram_budget_gb (`float`, *optional*):
            Older spelling of ``budget_gb``; give one or the other.
        prefetch (`int`, defaults to 2):
            Upper bound on how many blocks are read ahead of the one computing. ``0`` reads each block when
            it is needed. The planner lowers it (never below 1) when the budget is tight.
        backend (`str`, defaults to ``"auto"``):
            ``"auto"``, ``"posix"`` (``os.preadv`` into the slot), ``"mmap"`` (on CPU: zero-copy, parameters are
            views of the mapped ``.ts`` files; elsewhere a copy out of the mapping) or ``"kvikio"`` (GPUDirect
            Storage). ``"auto"`` on CPU is ``"mmap"`` when the store fits in 80% of the memory available, else
            ``"posix"``; on CUDA, ``"kvikio"`` where GDS is available, else ``"posix"``.
        direct_io (`bool`, *optional*):
            Read with ``O_DIRECT`` (bypassing the page cache). ``None``: buffered when the store fits in the RAM
            available (the page cache then serves every pass after the first); otherwise a quick cold self-test picks
            the faster of buffered and ``O_DIRECT`` reads on this machine.
        host_cache_gb (`float`, defaults to 0):
            Pinned host RAM kept between disk and GPU for a fixed set of blocks (CUDA only).
        dtype (`str` or `torch.dtype`, *optional*):
            Convert floating-point weights to this dtype when resharding. ``None`` keeps the checkpoint's.
        verify (`str`, defaults to ``"header"``):
            ``"off"``, ``"header"`` (headers, sizes and offsets checked against the manifest when the model
            is loaded) or ``"checksum"`` (also every block's checksum each time it is read).
        io_threads (`int`, defaults to the number of CPU cores, at most 4):
            Reader threads; one block is split into requests that these threads serve in parallel. More readers
            than cores only take CPU time from the compute (measured on 2 cores: 2 readers beat 4 cold and warm).

    Example:
        ```python
        >>> import tensorstream
        >>> cfg = tensorstream.Config(budget_gb=5, prefetch=3, device="cpu")
        >>> cfg.budget_bytes
        5000000000
        ```
    """

    storage_path: str | os.PathLike[str] | None = None
    device: str | torch.device | None = None
    budget_gb: float | None = None
    vram_budget_gb: float | None = None
    prefetch: int = 2
    backend: Backend = "auto"
    direct_io: bool | None = None
    host_cache_gb: float = 0.0
    dtype: str | torch.dtype | None = None
    verify: Verify = "header"
    io_threads: int = dataclasses.field(default_factory=lambda: min(4, os.cpu_count() or 1))

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.vram_budget_gb is not None:
            if self.budget_gb is not None and float(self.budget_gb) != float(self.vram_budget_gb):
                raise ConfigError(
                    f"budget_gb={self.budget_gb} and vram_budget_gb={self.vram_budget_gb} disagree; "
                    "vram_budget_gb is the older spelling of budget_gb: give only one."
                )
            set_(self, "budget_gb", self.vram_budget_gb)
            set_(self, "vram_budget_gb", None)
        if self.budget_gb is not None:
            budget = _as_float(self.budget_gb, "budget_gb")
            if budget <= 0:
                raise ConfigError(f"budget_gb={self.budget_gb} must be positive (GB of 10^9 bytes), or None for auto.")
            set_(self, "budget_gb", budget)
        prefetch = _as_int(self.prefetch, "prefetch")
        if prefetch < 0:
            raise ConfigError(f"prefetch={self.prefetch} must be 0 or more (blocks read ahead).")
        set_(self, "prefetch", prefetch)
        io_threads = _as_int(self.io_threads, "io_threads")
        if io_threads < 1:
            raise ConfigError(f"io_threads={self.io_threads} must be at least 1.")
        set_(self, "io_threads", io_threads)
        host_cache = _as_float(self.host_cache_gb, "host_cache_gb")
        if host_cache < 0:
            raise ConfigError(f"host_cache_gb={self.host_cache_gb} must be 0 or more.")
        set_(self, "host_cache_gb", host_cache)
        if self.backend not in _BACKENDS:
            raise ConfigError(f"backend={self.backend!r} is not one of {', '.join(map(repr, _BACKENDS))}.")
        if self.verify not in _VERIFY:
            raise ConfigError(f"verify={self.verify!r} is not one of {', '.join(map(repr, _VERIFY))}.")
        if self.direct_io is not None and not isinstance(self.direct_io, bool):
            set_(self, "direct_io", _as_optional_bool(self.direct_io, "direct_io"))
        set_(self, "dtype", parse_dtype(self.dtype))
        set_(
            self, "storage_path", Path(self.storage_path).expanduser() if self.storage_path else default_storage_path()
        )
        try:
            device = torch.device(self.device) if self.device is not None else default_device()
        except (RuntimeError, TypeError) as err:
            raise ConfigError(f"device={self.device!r} is not a device torch understands ({err}).") from None
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        set_(self, "device", device)

    @property
    def budget_bytes(self) -> int | None:
        """The budget in bytes, or ``None`` when it is sized from free memory."""
        return None if self.budget_gb is None else round(float(self.budget_gb) * 1e9)

    @property
    def store_root(self) -> Path:
        """`storage_path` as a `Path`."""
        return Path(self.storage_path)  # type: ignore[arg-type]

    @property
    def execution_device(self) -> torch.device:
        """`device` as a `torch.device`."""
        return self.device  # type: ignore[return-value]

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Build a Config from ``TENSORSTREAM_*`` variables, an optional file, and explicit overrides.

        ``TENSORSTREAM_CONFIG_FILE`` names a TOML or JSON file whose keys are field names. Each field ``x`` is
        also read from ``TENSORSTREAM_X`` (``TENSORSTREAM_BUDGET_GB=5``). Explicit keyword arguments win over
        the environment, which wins over the file. Unknown ``TENSORSTREAM_*`` variables are warned about.

        Example:
            ```python
            >>> Config.from_env({"TENSORSTREAM_BUDGET_GB": "5"}, device="cpu").budget_gb
            5.0
            ```
        """
        env = os.environ if environ is None else environ
        fields = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        config_file = env.get("TENSORSTREAM_CONFIG_FILE")
        if config_file:
            values.update(_read_config_file(Path(config_file), fields))
        for key, raw in env.items():
            if not key.startswith(ENV_PREFIX) or key in _OTHER_KNOWN_ENV:
                continue
            name = key[len(ENV_PREFIX) :].lower()
            if name not in fields:
                warnings.warn(
                    f"{key} is not a tensorstream setting and is ignored; known ones are "
                    f"{', '.join(ENV_PREFIX + f.upper() for f in sorted(fields))}.",
                    UserWarning,
                    stacklevel=2,
                )
                continue
            values[name] = _parse_env_value(name, raw, key)
        values.update(overrides)
        return cls(**values)


def _read_config_file(path: Path, fields: set[str]) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"TENSORSTREAM_CONFIG_FILE={path} cannot be read ({err.strerror}).") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, RecursionError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"TENSORSTREAM_CONFIG_FILE={path} is not valid {path.suffix or 'TOML'}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"TENSORSTREAM_CONFIG_FILE={path} holds a JSON {type(data).__name__}; it must be an object of settings."
        )
    if isinstance(data.get("tensorstream"), dict):  # allow a [tensorstream] table
        data = data["tensorstream"]
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{path}: unknown settings {unknown}; known ones are {sorted(fields)}.")
    return dict(data)


def _parse_env_value(name: str, raw: str, key: str) -> Any:
    raw = raw.strip()
    if name in ("budget_gb", "vram_budget_gb", "host_cache_gb"):
        return None if raw.lower() in ("", "none", "auto") else _as_float(raw, key)
    if name in ("prefetch", "io_threads"):
        return _as_int(raw, key)
    if name == "direct_io":
        return _as_optional_bool(raw, key)
    return raw or None


def _as_float(value: Any, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not a number.") from None


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is not an integer.")
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not an integer.") from None
    if not as_float.is_integer():
        raise ConfigError(f"{name}={value!r} is not an integer.")
    return int(as_float)


def _as_optional_bool(value: Any, name: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("", "none", "auto"):
        return None
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={value!r} must be true, false or auto.")
