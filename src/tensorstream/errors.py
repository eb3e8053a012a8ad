"""Every exception tensorstream raises.

One root, :class:`TensorStreamError`; each subclass also inherits the builtin it refines, so code that
already catches ``ValueError``, ``OSError``, ``ImportError`` or ``MemoryError`` keeps working::

    TensorStreamError(Exception)
     ├── ConfigError(ValueError)               a Config field or environment variable is invalid
     ├── FormatError(ValueError)               a file is not a valid .ts file or manifest
     │    └── CorruptFileError                 a .ts file or store is damaged (truncated, bad checksum)
     ├── StaleStoreError(FileNotFoundError)    the store is missing a file or no longer matches its source
     ├── StorageFullError(OSError)             the disk (or quota) filled up while a store was written
     ├── TooManyOpenFilesError(OSError)        the process's open-file limit is below one descriptor per block
     ├── BudgetError(MemoryError)              the memory budget cannot hold the minimum working set
     ├── BackendUnavailableError(ImportError)  an I/O backend cannot run here (missing package, no driver)
     ├── UnsupportedModelError(ValueError)     no repeated blocks to stream were found in the model
     │    └── UnsupportedQuantizationError     a pre-quantized checkpoint or model in a format not streamed yet
     ├── StreamingError(RuntimeError)          a background read failed while the model was running
     ├── HubUnavailableError(ConnectionError)  the Hugging Face Hub cannot be reached and the cache lacks the repo
     ├── UnsupportedOperationError(RuntimeError)  a cast, move or backward a streaming model cannot do correctly
     ├── NotStreamingError(ValueError)         the model passed in is not streaming
     └── LockTimeoutError(TimeoutError)        another process held the reshard lock for too long

Every message names the file or argument concerned and what to do about it.
"""

from __future__ import annotations

import errno

__all__ = [
    "BackendUnavailableError",
    "BudgetError",
    "ConfigError",
    "CorruptFileError",
    "FormatError",
    "HubUnavailableError",
    "LockTimeoutError",
    "NotStreamingError",
    "StaleStoreError",
    "StorageFullError",
    "StreamingError",
    "TensorStreamError",
    "TooManyOpenFilesError",
    "UnsupportedModelError",
    "UnsupportedOperationError",
    "UnsupportedQuantizationError",
]


class TensorStreamError(Exception):
    """Root of every error raised by tensorstream."""


class ConfigError(TensorStreamError, ValueError):
    """A `Config` field, keyword argument or ``TENSORSTREAM_*`` variable has an invalid value."""


class FormatError(TensorStreamError, ValueError):
    """A file is not a valid ``.ts`` file, manifest or checkpoint."""


class CorruptFileError(FormatError):
    """A ``.ts`` file or store is damaged: truncated, wrong size, or its checksum does not match."""


class StaleStoreError(TensorStreamError, FileNotFoundError):
    """A store is missing files or was written from a different source than the one asked for."""


class StorageFullError(TensorStreamError, OSError):
    """The disk or quota filled up while a store was written; the partial store was removed.

    ``errno`` is ``ENOSPC`` or ``EDQUOT`` as the operating system reported it; ``str(error)`` is the message alone.
    """

    def __init__(self, message: str, code: int = errno.ENOSPC, filename: str | None = None) -> None:
        if filename is None:
            super().__init__(code, message)
        else:
            super().__init__(code, message, filename)

    def __str__(self) -> str:
        return str(self.strerror)


class TooManyOpenFilesError(TensorStreamError, OSError):
    """The engine keeps one descriptor per streamed block open, and the process's limit (``ulimit -n``) is lower.

    ``errno`` is ``EMFILE`` or ``ENFILE``; ``str(error)`` is the message alone.
    """

    def __init__(self, message: str, code: int) -> None:
        super().__init__(code, message)

    def __str__(self) -> str:
        return str(self.strerror)


class BudgetError(TensorStreamError, MemoryError):
    """The memory budget cannot hold the non-block weights plus the minimum number of streaming slots.

    Attributes:
        minimum_bytes: the smallest budget that works, exactly: a budget one byte smaller fails, this one plans
            (``None`` when it is not known exactly: before a reshard only bounds are, from the model's parameter
            counts).
        suggested_bytes: the budget the message names, in bytes: ``budget_gb`` as printed holds it (the minimum
            rounded up to the printed digits, or the upper bound before a reshard).
    """

    def __init__(self, message: str, minimum_bytes: int | None = None, suggested_bytes: int | None = None) -> None:
        super().__init__(message)
        self.minimum_bytes = minimum_bytes
        self.suggested_bytes = suggested_bytes if suggested_bytes is not None else minimum_bytes


class BackendUnavailableError(TensorStreamError, ImportError):
    """An I/O backend was asked for but cannot run on this machine."""


class UnsupportedModelError(TensorStreamError, ValueError):
    """The model has no repeated blocks that tensorstream could stream."""


class UnsupportedQuantizationError(UnsupportedModelError):
    """A pre-quantized checkpoint (``quantization_config`` in its ``config.json`` or passed to ``from_pretrained``)
    or a quantized model given to `offload` is in a format tensorstream does not stream yet.

    Raised before anything is written. The message names the method, why, and what works instead (docs/quantization.md,
    "Pre-quantized checkpoints").

    Attributes:
        method: the ``quant_method`` (``"gptq"``, ``"bitsandbytes_8bit"``, ...).
    """

    def __init__(self, message: str, method: str | None = None) -> None:
        super().__init__(message)
        self.method = method


class StreamingError(TensorStreamError, RuntimeError):
    """A background read failed; raised from the forward call that needed the block."""


class HubUnavailableError(TensorStreamError, ConnectionError):
    """The Hugging Face Hub cannot be reached (offline mode, no network) and the local cache lacks what is needed."""


class UnsupportedOperationError(TensorStreamError, RuntimeError):
    """An operation a streaming model cannot do correctly: ``model.to(dtype)``/``.half()``/``.to(device)`` (the
    store holds one dtype and the slots live on one device), a backward through streamed weights, or a change the
    unchanged store cannot take (``load_state_dict`` of streamed weights, assigning or modifying a streamed parameter
    in place, merging an adapter into one; see ``docs/adapters.md``).

    The model is unchanged and stays usable; the message says what to do instead.
    """


class LockTimeoutError(TensorStreamError, TimeoutError):
    """Another process held the reshard lock for longer than the timeout."""


class NotStreamingError(TensorStreamError, ValueError):
    """A function that needs a streaming model (`stats`, `detach`) was given one that is not streaming."""
