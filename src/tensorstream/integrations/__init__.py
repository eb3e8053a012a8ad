"""Integrations with the rest of the Hugging Face stack (transformers' and diffusers' ``from_pretrained``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

__all__ = ["wrap_classmethod"]


def wrap_classmethod(owner: type, name: str, make: Callable[[Any], Callable[..., Any]]) -> Any:
    """Replace the classmethod ``owner.name`` by ``make(original function)``, once: a second call changes nothing.

    The wrapper keeps the original's name, docstring and signature, and is marked so that installing again (a
    second ``import`` path, a reloaded module) never wraps a wrapper. Returns the original function.
    """
    current = owner.__dict__[name]
    if getattr(current.__func__, "__tensorstream__", False):
        return current.__func__.__wrapped__
    original = current.__func__
    wrapper = functools.wraps(original)(make(original))
    wrapper.__tensorstream__ = True  # type: ignore[attr-defined]
    setattr(owner, name, classmethod(wrapper))
    return original
