"""The accelerate ``ModelHook`` that streams one block, and attaching/detaching it.

One `StreamingHook` sits on each streamed block. ``pre_forward`` waits for the block's read and binds its
parameters as views of a slot; ``post_forward`` rebinds them to meta and frees the slot. The hook exposes what
accelerate and transformers look for on offloaded modules: ``execution_device``, ``offload=True`` and a
``weights_map`` (so ``save_pretrained`` reads the weights back from the store).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from safetensors import safe_open
from torch import nn

from .engine import Engine

__all__ = ["BlockWeights", "StreamingHook", "attach_hooks", "remove_hooks"]


class BlockWeights(Mapping[str, torch.Tensor]):
    """The weights of one streamed block, read from its ``.ts`` file on access (names relative to the block)."""

    def __init__(self, engine: Engine, name: str) -> None:
        block = engine.blocks[engine.index[name]]
        self._file = str(engine.store.file(block.entry))
        tied = engine.store.manifest.get("tied", {})
        prefix = f"{name}."
        self._keys = {full[len(prefix) :]: full for full in block.header.tensors}
        self._keys.update(
            {t[len(prefix) :]: s for t, s in tied.items() if t.startswith(prefix) and s in block.header.tensors}
        )

    def __getitem__(self, key: str) -> torch.Tensor:
        full = self._keys[key]
        with safe_open(self._file, framework="pt") as f:  # a .ts file is a safetensors file
            return f.get_tensor(full)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class StreamingHook(ModelHook):
    """Binds a block's weights from the engine around its forward.

    Example:
        ```python
        >>> hook = model.model.layers[3]._hf_hook
        >>> type(hook).__name__, hook.offload, hook.execution_device
        ('StreamingHook', True, device(type='cpu'))
        ```
    """

    no_grad = False

    def __init__(self, engine: Engine, name: str) -> None:
        self.engine = engine
        self.name = name
        self.execution_device = engine.device
        self.offload = True
        self.weights_map = BlockWeights(engine, name)

    @torch.compiler.disable
    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        self.engine.acquire(self.name)
        return args, kwargs

    @torch.compiler.disable
    def post_forward(self, module: nn.Module, output: Any) -> Any:
        self.engine.release(self.name)
        return output

    def __repr__(self) -> str:
        return f"StreamingHook(block={self.name!r}, device={self.execution_device})"


def attach_hooks(model: nn.Module, engine: Engine) -> None:
    """Put a `StreamingHook` on every streamed block of ``model``."""
    for name in engine.plan.streamed:
        add_hook_to_module(model.get_submodule(name), StreamingHook(engine, name))


def remove_hooks(model: nn.Module, engine: Engine) -> None:
    """Remove the hooks `attach_hooks` added."""
    for name in engine.plan.streamed:
        module = model.get_submodule(name)
        if isinstance(getattr(module, "_hf_hook", None), StreamingHook):
            remove_hook_from_module(module)
