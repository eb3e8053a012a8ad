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
import difflib
import functools
import json
import math
import os
import re
import tomllib
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from .encoding import store_kind
from .errors import ConfigError

__all__ = ["ENV_PREFIX", "Config"]

ENV_PREFIX = "TENSORSTREAM_"
#: Variables with the prefix that are not Config fields but are still known (no warning for them).
_OTHER_KNOWN_ENV = {"TENSORSTREAM_CONFIG_FILE", "TENSORSTREAM_REQUIRE_GPU"}

Backend = Literal["auto", "posix", "mmap", "kvikio"]
Verify = Literal["off", "header", "checksum"]
_BACKENDS = ("auto", "posix", "mmap", "kvikio")
_VERIFY = ("off", "header", "checksum")
#: When a pre-quantized FP8/MXFP4 checkpoint is dequantized (`Config.dequantize`, `tensorstream.reshard`).
DEQUANTIZE_CHOICES = ("per_block", "once")

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
            Storage). ``"auto"`` on CPU is ``"mmap"`` where the kernel has ``MADV_POPULATE_READ`` (Linux >= 5.14)
            and ``direct_io`` is not ``True`` (measured at the disk's speed cold, zero-copy warm), else ``"posix"``;
            on CUDA, ``"kvikio"`` where GDS is available, else ``"posix"``.
        direct_io (`bool`, *optional*):
            Read with ``O_DIRECT`` (bypassing the page cache). ``None``: buffered when the store fits in the RAM
            available (the page cache then serves every pass after the first); otherwise a quick cold self-test picks
            the faster of buffered and ``O_DIRECT`` reads on this machine.
        host_cache_gb (`float`, defaults to 0):
            Pinned host RAM kept between disk and GPU for a fixed set of blocks (CUDA only).
        expert_cache_gb (`float`, *optional*):
            The part of the budget that caches routed experts of mixture-of-experts models (docs/moe.md), taken
            before any block is kept resident. ``None``: what the budget has left once the resident blocks and the
            streaming memory are placed. With the zero-copy mapped mode (CPU) the page cache is the expert cache and
            this is not used.
        routed_experts (`bool`, defaults to `True`):
            Read only the routed experts of a streamed mixture-of-experts block (docs/moe.md). ``False`` streams
            whole blocks, every expert every step (for comparison; same results).
        dtype (`str` or `torch.dtype`, *optional*):
            Convert floating-point weights to this dtype when resharding. ``None`` keeps the checkpoint's.
        quantize (`str`, *optional*):
            ``"int8"`` or ``"int4"``: build a quantized store (the streamed blocks' weight matrices group-wise
            quantized; fewer bytes read per token, results exactly those of `tensorstream.detach` on the same model,
            not of the original weights). See docs/quantization.md.
        compression (`str`, *optional*):
            ``"lossless"``: build a store whose 16-bit weights are stored as byte planes with the high one
            zstd-compressed; results bit-identical to the original model. See docs/quantization.md.
        dequantize (`str`, defaults to ``"per_block"``):
            For a checkpoint published in fine-grained FP8 or MXFP4 that transformers dequantizes at load (as on a
            CPU): ``"per_block"`` stores its compact bytes and dequantizes each block as it is loaded (the fewest
            bytes read); ``"once"`` stores the bf16 weights transformers dequantizes it to (about 1.9x the bytes,
            nothing dequantized per pass: faster on a CPU, whose dequantization is slower than its disk). Same
            results either way; ignored for other checkpoints. See docs/quantization.md.
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
    expert_cache_gb: float | None = None
    routed_experts: bool = True
    dtype: str | torch.dtype | None = None
    quantize: str | None = None
    compression: str | None = None
    dequantize: str = "per_block"
    verify: Verify = "header"
    io_threads: int = dataclasses.field(default_factory=lambda: min(4, os.cpu_count() or 1))

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.vram_budget_gb is not None:
            if self.budget_gb is not None and _as_float(self.budget_gb, "budget_gb") != _as_float(
                self.vram_budget_gb, "vram_budget_gb"
            ):
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
        if self.expert_cache_gb is not None:
            expert_cache = _as_float(self.expert_cache_gb, "expert_cache_gb")
            if expert_cache < 0:
                raise ConfigError(
                    f"expert_cache_gb={self.expert_cache_gb} must be 0 or more, or None for what is left."
                )
            set_(self, "expert_cache_gb", expert_cache)
        if self.backend not in _BACKENDS:
            raise ConfigError(f"backend={self.backend!r} is not one of {', '.join(map(repr, _BACKENDS))}.")
        if self.verify not in _VERIFY:
            raise ConfigError(f"verify={self.verify!r} is not one of {', '.join(map(repr, _VERIFY))}.")
        check_dequantize(self.dequantize)
        if not isinstance(self.routed_experts, bool):
            routed = _as_optional_bool(self.routed_experts, "routed_experts")
            set_(self, "routed_experts", True if routed is None else routed)
        if self.direct_io is not None and not isinstance(self.direct_io, bool):
            set_(self, "direct_io", _as_optional_bool(self.direct_io, "direct_io"))
        set_(self, "dtype", parse_dtype(self.dtype))
        if self.compression == "none":
            set_(self, "compression", None)
        store_kind(self.quantize, self.compression)  # ConfigError for an unknown or conflicting kind
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
    def kind(self) -> str | None:
        """The store kind these settings build: ``None`` (plain), ``"int8"``, ``"int4"`` or ``"lossless"``."""
        return store_kind(self.quantize, self.compression)

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
        copy = dataclasses.replace(self, **changes)
        object.__setattr__(copy, "_explicit", self.explicit_fields | _given(changes))
        return copy

    @property
    def explicit_fields(self) -> frozenset[str]:
        """The fields given as arguments (or read from the environment by `from_env`); the rest are defaults."""
        return getattr(self, "_explicit", frozenset())

    def with_env(self, environ: Mapping[str, str] | None = None) -> Config:
        """This config with every field it was not given filled from ``TENSORSTREAM_*`` and the config file.

        ``from_pretrained(..., tensorstream_config=cfg)`` and ``tensorstream.offload(model, cfg)`` use this: the
        fields given to ``Config(...)`` win, the environment fills the rest, as `from_env` does.

        Example:
            ```python
            >>> Config(prefetch=4).with_env({"TENSORSTREAM_PREFETCH": "1", "TENSORSTREAM_BUDGET_GB": "5"})
            ...  # prefetch=4 (given), budget_gb=5.0 (from the environment)
            ```
        """
        return Config.from_env(environ, **{name: getattr(self, name) for name in self.explicit_fields})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | str | os.PathLike[str] | None = None, **overrides: Any) -> Config:
        """Build a Config from ``TENSORSTREAM_*`` variables, an optional file, and explicit overrides.

        ``TENSORSTREAM_CONFIG_FILE`` names a TOML or JSON file whose keys are field names. Each field ``x`` is
        also read from ``TENSORSTREAM_X`` (``TENSORSTREAM_BUDGET_GB=5``). Explicit keyword arguments win over
        the environment, which wins over the file. Unknown ``TENSORSTREAM_*`` variables are warned about.

        Args:
            environ: the variables to read (default ``os.environ``), or the path of a config file to read instead
                of ``TENSORSTREAM_CONFIG_FILE`` (the variables of ``os.environ`` still win over it).
            overrides: fields given explicitly; they win over both.

        Example:
            ```python
            >>> Config.from_env({"TENSORSTREAM_BUDGET_GB": "5"}, device="cpu").budget_gb
            5.0
            >>> Config.from_env("ts.toml").prefetch  # ts.toml holds `prefetch = 3`
            3
            ```
        """
        config_file: str | os.PathLike[str] | None
        if isinstance(environ, str | os.PathLike):
            env: Mapping[str, str] = os.environ
            config_file, from_variable = environ, False
        else:
            env = os.environ if environ is None else environ
            config_file, from_variable = env.get("TENSORSTREAM_CONFIG_FILE"), True
        fields = {f.name for f in dataclasses.fields(cls)}
        _check_names(overrides, "Config.from_env")
        values: dict[str, Any] = {}
        if config_file:
            label = f"TENSORSTREAM_CONFIG_FILE={config_file}" if from_variable else f"config file {config_file}"
            values.update(_read_config_file(Path(config_file), fields, label))
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


_CONFIG_SUFFIXES = (".toml", ".json")


def _read_config_file(path: Path, fields: set[str], label: str) -> dict[str, Any]:
    """The settings in a TOML or JSON file: top-level keys, or a ``[tensorstream]`` table (not both).

    ``label`` names the file in messages (``TENSORSTREAM_CONFIG_FILE=...`` when it came from that variable).
    """
    if path.suffix.lower() not in _CONFIG_SUFFIXES:
        raise ConfigError(
            f"{label}: tensorstream reads TOML (.toml) or JSON (.json) files, not "
            f"{path.suffix or 'files without a suffix'}; write the same field names in a .toml file."
        )
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{label} cannot be read ({err.strerror}).") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, RecursionError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{label} is not valid {path.suffix[1:].upper()}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{label} holds a JSON {type(data).__name__}; it must be an object of settings.")
    table = data.get("tensorstream")
    if isinstance(table, dict):  # a [tensorstream] table: the settings; other tables belong to other tools
        stray = sorted(set(data) & fields)
        if stray:
            raise ConfigError(
                f"{label} has a [tensorstream] table and settings outside it ({', '.join(stray)}); "
                "move them into the [tensorstream] table."
            )
        data = table
    unknown = sorted(set(data) - fields)
    if unknown:
        hints = [
            f"{name} (did you mean {_suggest(name, fields)}?)" if _suggest(name, fields) else name for name in unknown
        ]
        raise ConfigError(f"{label}: unknown settings {', '.join(hints)}; known ones are {sorted(fields)}.")
    return dict(data)


def _suggest(name: str, fields: set[str] | list[str]) -> str | None:
    close = difflib.get_close_matches(name, sorted(fields), n=1, cutoff=0.6)
    return close[0] if close else None


def _check_names(given: Mapping[str, Any], where: str) -> None:
    """`ConfigError` for a keyword that is not a Config field, naming the closest field."""
    fields = [f.name for f in dataclasses.fields(Config)]
    for name in given:
        if name not in fields:
            close = _suggest(name, fields)
            hint = f"did you mean {close}=? " if close else ""
            raise ConfigError(
                f"{where}({name}=...): {name!r} is not a Config field; {hint}The fields are {', '.join(fields)}."
            )


def check_dequantize(value: Any) -> None:
    """`ConfigError` unless ``value`` is one of `DEQUANTIZE_CHOICES`."""
    if value not in DEQUANTIZE_CHOICES:
        raise ConfigError(
            f"dequantize={value!r} is not one of {', '.join(map(repr, DEQUANTIZE_CHOICES))}: when an FP8 or MXFP4 "
            "checkpoint is dequantized (as each block loads, or once, into the store)."
        )


def _given(kwargs: Mapping[str, Any]) -> frozenset[str]:
    names = set(kwargs)
    if "vram_budget_gb" in names:
        names = (names - {"vram_budget_gb"}) | {"budget_gb"}
    return frozenset(names)


def _wrap_init(generated: Any) -> Any:
    @functools.wraps(generated)
    def __init__(self: Config, *args: Any, **kwargs: Any) -> None:
        _check_names(kwargs, "Config")
        generated(self, *args, **kwargs)
        object.__setattr__(self, "_explicit", _given(kwargs))

    return __init__


Config.__init__ = _wrap_init(Config.__init__)  # type: ignore[method-assign]


def _parse_env_value(name: str, raw: str, key: str) -> Any:
    raw = raw.strip()
    if name in ("budget_gb", "vram_budget_gb", "host_cache_gb", "expert_cache_gb"):
        return None if raw.lower() in ("", "none", "auto") else _as_float(raw, key)
    if name in ("prefetch", "io_threads"):
        return _as_int(raw, key)
    if name in ("direct_io", "routed_experts"):
        return _as_optional_bool(raw, key)
    if name in ("quantize", "compression") and raw.lower() in ("", "none", "off"):
        return None
    return raw or None


_GB_TEXT = re.compile(r"\s*([0-9.eE+-]+)\s*(gb|mb)?\s*", re.IGNORECASE)


def _as_float(value: Any, name: str) -> float:
    """A finite number from a number or text: ``5``, ``"5"``, ``"5GB"`` and ``"500MB"`` (GB of 10^9 bytes)."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is not a number of GB; give one, e.g. {name}=5.")
    scale = 1.0
    if isinstance(value, str):
        match = _GB_TEXT.fullmatch(value)
        if match is None:
            hint = " (GiB are not accepted: give GB of 10^9 bytes)" if "gib" in value.lower() else ""
            raise ConfigError(f"{name}={value!r} is not a number of GB{hint}; give one, e.g. {name}=5.")
        value, unit = match.group(1), (match.group(2) or "gb").lower()
        scale = 1e-3 if unit == "mb" else 1.0
    try:
        number = float(value) * scale
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not a number; give one, e.g. {name}=5.") from None
    if not math.isfinite(number):
        raise ConfigError(f"{name}={value!r} is not a finite number; give one, e.g. {name}=5.")
    return number


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
