"""tensorstream: run Hugging Face models larger than your GPU or RAM at the speed of your storage.

```python
import tensorstream                      # registers device_map="tensorstream"
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(
    "org/some-70b-model", device_map="tensorstream", tensorstream_config=tensorstream.Config(budget_gb=5)
)
print(tensorstream.stats(model))
```

``import tensorstream`` is cheap: it imports neither torch nor transformers nor diffusers. Each public name is
imported when it is first used, and ``device_map="tensorstream"`` is registered the moment transformers'
``modeling_utils`` (or diffusers' ``models.modeling_utils`` and ``pipelines.pipeline_utils``) is imported (at once if
it already is). ``tensorstream --help`` and ``--version`` never import torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from .errors import (
    BackendUnavailableError,
    BudgetError,
    ConfigError,
    CorruptFileError,
    FormatError,
    HubUnavailableError,
    LockTimeoutError,
    NotStreamingError,
    StaleStoreError,
    StorageFullError,
    StreamingError,
    TensorStreamError,
    TooManyOpenFilesError,
    UnsupportedModelError,
    UnsupportedOperationError,
    UnsupportedQuantizationError,
)

if TYPE_CHECKING:
    from .config import Config
    from .format import load_ts, read_ts_header, save_to_ts
    from .reshard import reshard
    from .stats import StreamStats
    from .stream import detach, offload, stats

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "BudgetError",
    "Config",
    "ConfigError",
    "CorruptFileError",
    "FormatError",
    "HubUnavailableError",
    "LockTimeoutError",
    "NotStreamingError",
    "StaleStoreError",
    "StorageFullError",
    "StreamStats",
    "StreamingError",
    "TensorStreamError",
    "TooManyOpenFilesError",
    "UnsupportedModelError",
    "UnsupportedOperationError",
    "UnsupportedQuantizationError",
    "__version__",
    "detach",
    "load_ts",
    "offload",
    "read_ts_header",
    "reshard",
    "save_to_ts",
    "stats",
]

#: Public name -> the submodule that defines it, imported on first access (PEP 562).
_LAZY = {
    "Config": "config",
    "StreamStats": "stats",
    "load_ts": "format",
    "read_ts_header": "format",
    "save_to_ts": "format",
    "reshard": "reshard",
    "detach": "stream",
    "offload": "stream",
    "stats": "stream",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tensorstream' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """Keeps ``tensorstream.reshard`` the function once the submodule ``tensorstream.reshard`` is imported.

    Importing a submodule sets it as an attribute of its package; the function of the same name must win, as it
    did when this file imported it eagerly (the module stays reachable as ``sys.modules["tensorstream.reshard"]``).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            self.__dict__.pop(name, None)  # resolved again, as the function, by __getattr__
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

#: Modules whose import installs a ``device_map="tensorstream"`` wrapper: module name -> the installer's name.
_HOOKED = {
    "transformers.modeling_utils": "_install_transformers",
    "diffusers.models.modeling_utils": "_install_diffusers_models",
    "diffusers.pipelines.pipeline_utils": "_install_diffusers_pipelines",
}


class _InstallWhenImported:
    """A ``sys.meta_path`` finder that wraps ``from_pretrained`` right after one of `_HOOKED`'s modules runs."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _HOOKED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_install(module: types.ModuleType) -> None:
            from ._quiet import quiet_torchao

            with quiet_torchao():  # transformers imports torchao here: CUDA-extension noise on a CPU (see _quiet)
                exec_module(module)
            _install(fullname, module)

        loader.exec_module = exec_then_install  # type: ignore[method-assign]  # this loader serves this module only
        return spec


_installed: set[str] = set()


def _install(name: str, module: types.ModuleType) -> None:
    _installed.add(name)
    if _installed >= set(_HOOKED):
        _remove_finder()
    globals()[_HOOKED[name]](module)


def _remove_finder() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _InstallWhenImported)]


def _install_transformers(module: types.ModuleType) -> None:
    from .integrations.transformers import install

    install()


def _install_diffusers_models(module: types.ModuleType) -> None:
    from .integrations.diffusers import install_models

    install_models(module)


def _install_diffusers_pipelines(module: types.ModuleType) -> None:
    from .integrations.diffusers import install_pipelines

    install_pipelines(module)


for _name in _HOOKED:
    if _name in sys.modules:
        _install(_name, sys.modules[_name])
if _installed < set(_HOOKED) and not any(isinstance(f, _InstallWhenImported) for f in sys.meta_path):
    sys.meta_path.insert(0, _InstallWhenImported())
