"""The accelerate ``ModelHook`` that streams one block, and attaching/detaching it.

One `StreamingHook` sits on each streamed block. ``pre_forward`` waits for the block's read and binds its
parameters as views of a slot; ``post_forward`` rebinds them to meta and frees the slot. The hook exposes what
accelerate and transformers look for on offloaded modules: ``execution_device``, ``offload=True`` and a
``weights_map`` (so ``save_pretrained`` reads the weights back from the store).

The hooked ``forward`` (see `attach_hooks`) holds the engine's lock for the whole block forward, and the model's
own ``forward`` holds it for the whole model forward, so threads sharing a model take turns and each gets the
resident model's output. Both wrappers refer to their module weakly: a streaming model holds no reference cycle
of tensorstream's making, and dropping it frees the engine's threads and files at once.

Gradients: a block's parameters are views of a slot that the next block reuses, so autograd cannot differentiate
through a streamed block. When a block runs with grad enabled and its output requires grad, the output passes
through a node whose backward raises `UnsupportedOperationError` (values unchanged). Inference (``no_grad``,
``inference_mode``, ``generate``) is unaffected.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from accelerate.hooks import ModelHook
from torch import nn

from .binding import guard_of
from .engine import Engine
from .errors import UnsupportedOperationError

__all__ = ["BlockWeights", "StreamingHook", "attach_hooks", "remove_hooks"]


class BlockWeights(Mapping[str, torch.Tensor]):
    """The weights of one streamed block, read from its ``.ts`` file on access (names relative to the block)."""

    def __init__(self, engine: Engine, name: str) -> None:
        block = engine.blocks[engine.index[name]]
        self._engine = engine
        self._block = block
        tied = engine.store.manifest.get("tied", {})
        prefix = f"{name}."
        tensors = block.codec.logical  # as the model binds them (expanded, or rebuilt by a binding rule)
        self._keys = {full[len(prefix) :]: full for full in tensors}
        self._keys.update({t[len(prefix) :]: s for t, s in tied.items() if t.startswith(prefix) and s in tensors})

    def __getitem__(self, key: str) -> torch.Tensor:
        full = self._keys[key]
        data = self._engine.read_block(self._block)  # the engine's checks: same file, checksum if configured
        ruled = self._block.codec.rules.get(full)
        if ruled is not None:
            raise UnsupportedOperationError(
                f"reading {full!r} of this streaming model's store (save_pretrained, or its hook's weights_map): "
                f"it is a {ruled.dtype} weight stored as the parts of a quantized tensor (binding rule "
                f"{ruled.rule.name!r}), which transformers writes only for a model it quantized itself. Save the "
                "source checkpoint instead (the store is built from it), or stream the plain store to save plain "
                "weights."
            )
        info = self._block.codec.tensors[full]
        return data[info.start : info.end].view(info.torch_dtype).view(info.shape).clone()

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
        if torch.is_grad_enabled():
            return _refuse_backward(output, self.name)
        return output

    def __repr__(self) -> str:
        return f"StreamingHook(block={self.name!r}, device={self.execution_device})"


class _StreamedBlockBackward(torch.autograd.Function):
    """Identity forward; a backward raises: the block's weights are gone from the slot by then."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, name: str) -> torch.Tensor:
        ctx.name = name
        return tensor.clone()

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise UnsupportedOperationError(
            f"backward through the streamed block {ctx.name!r}: its weights were views of a slot that later blocks "
            "reused, so the gradient would be wrong. Run inference under torch.no_grad() or torch.inference_mode(); "
            "to train, load the model without device_map='tensorstream' (or call tensorstream.detach(model))."
        )


def _refuse_backward(output: Any, name: str) -> Any:
    if isinstance(output, torch.Tensor):
        return _StreamedBlockBackward.apply(output, name) if output.requires_grad else output
    if isinstance(output, tuple | list):
        items = [_refuse_backward(item, name) for item in output]
        return type(output)(items) if type(output) in (tuple, list) else type(output)(*items)
    if isinstance(output, dict):
        for key, value in list(output.items()):
            if isinstance(value, torch.Tensor) and value.requires_grad:
                output[key] = _refuse_backward(value, name)
    return output


class _LockedForward:
    """A module's ``forward`` run under the engine's lock, optionally through a `StreamingHook`.

    Holds the module weakly (accelerate's own wrapper holds it strongly, a reference cycle that only the cyclic
    garbage collector frees) and carries the wrapped forward's signature for ``inspect`` (``generate`` reads it).
    """

    def __init__(self, module: nn.Module, engine: Engine, hook: StreamingHook | None) -> None:
        self._module = weakref.ref(module)
        self._engine = engine
        self._hook = hook
        inner = module.__dict__.get("forward")  # an instance forward set before ours (kept, called inside)
        if getattr(inner, "__self__", None) is module:  # a bound method of the module: keep its function only
            inner = inner.__func__  # type: ignore[union-attr]
            self._bound = True
        else:
            self._bound = False
        self._inner = inner
        self.__signature__ = inspect.signature(module.forward)
        self.__doc__ = type(module).forward.__doc__
        self.__name__ = "forward"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self._module()
        if module is None:
            raise ReferenceError("the module of this forward was deleted")
        inner = self._inner if self._inner is not None else type(module).forward
        forward = inner.__get__(module) if self._inner is None or self._bound else inner
        with self._engine.lock:
            hook = self._hook
            if hook is None:  # the model's own forward
                guard = guard_of(module)
                if guard is not None:
                    guard.check()  # after a change to the weights: nothing left on meta (cheap otherwise)
                return forward(*args, **kwargs)
            if guard_of(module) is None:  # no longer streaming (detached under another library's wrapper)
                return forward(*args, **kwargs)
            # streamed even when another library put its own hook on the block over this forward (PEFT's
            # dispatch_model for a model whose device map names "cpu" or "disk"): the block's weights are here only
            args, kwargs = hook.pre_forward(module, *args, **kwargs)
            return hook.post_forward(module, forward(*args, **kwargs))


def attach_hooks(model: nn.Module, engine: Engine) -> None:
    """Put a `StreamingHook` on every streamed block of ``model`` and serialise ``model``'s forward.

    Each block's ``forward`` becomes: under the engine's lock, ``pre_forward``, the block, ``post_forward`` (as
    accelerate's ``add_hook_to_module`` does, without its reference cycle); the model's ``forward`` takes the same
    re-entrant lock, so one forward at a time runs through the slot pool.
    """
    for name in engine.plan.streamed:
        module = model.get_submodule(name)
        hook = StreamingHook(engine, name)
        module = hook.init_hook(module)
        module._hf_hook = hook
        module.forward = _LockedForward(module, engine, hook)
    if not isinstance(model.__dict__.get("forward"), _LockedForward):
        model.forward = _LockedForward(model, engine, None)


def remove_hooks(model: nn.Module, engine: Engine) -> None:
    """Remove the hooks and forward wrappers `attach_hooks` added."""
    for name in engine.plan.streamed:
        module = model.get_submodule(name)
        _unwrap(module)
        if isinstance(getattr(module, "_hf_hook", None), StreamingHook):
            del module._hf_hook
    _unwrap(model)


def _unwrap(module: nn.Module) -> None:
    wrapper = module.__dict__.get("forward")
    if isinstance(wrapper, _LockedForward):
        if wrapper._inner is not None and not wrapper._bound:
            module.forward = wrapper._inner
        else:
            del module.forward
