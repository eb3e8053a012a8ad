"""Scoped silencing of optional dependencies' import-time noise (logging only; no torch import here).

transformers imports torchao whenever it is installed (``transformers.quantizers`` checks for it when
``modeling_utils`` is first imported). On a machine where torchao's CUDA extensions cannot load (any CPU-only
machine, or a GPU machine with another CUDA build), torchao's import logs ``Failed to load .../_C_mxfp8...so`` and
``Failed to load .../_C_cutlass_90a.abi3.so`` on its ``torchao`` logger, and its ``register_constant`` calls make
torch log ``... is an Enum subclass ... deprecated`` on ``torch.utils._pytree``. Neither says anything about
tensorstream or about the user's model; a newcomer reads "Failed to load" as "broken".

`quiet_torchao` raises those two loggers to ERROR for the duration of a ``with`` block and restores their levels
after it. It is used around the imports and loads tensorstream itself drives: the import of transformers'
``modeling_utils`` when ``import tensorstream`` came first (``tensorstream/__init__.py``), resharding and
``from_pretrained(..., device_map="tensorstream")`` (``reshard.quiet_transformers``), and the quantizer's own
import of torchao (``encoding``). Nothing outside those blocks changes: no handler, no ``warnings`` filter, no
environment variable, and errors from either logger still show.

Example:
    ```python
    >>> import logging
    >>> with quiet_torchao():
    ...     logging.getLogger("torchao").level
    40
    >>> logging.getLogger("torchao").level
    0
    ```
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

__all__ = ["quiet_torchao"]

#: The loggers torchao's import writes to on a machine where its CUDA extensions do not load.
NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_torchao() -> Iterator[None]:
    """Raise torchao's and torch's pytree loggers to ERROR inside the block; their levels are restored after it."""
    logs = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)
