from __future__ import annotations

import subprocess
import sys

import tensorstream
from tensorstream import errors


def test_all_is_sorted_and_complete() -> None:
    assert tensorstream.__all__ == sorted(tensorstream.__all__)
    for name in tensorstream.__all__:
        assert hasattr(tensorstream, name), name


def test_import_does_not_import_kvikio_or_initialise_cuda() -> None:
    code = "import sys, tensorstream, torch; print('kvikio' in sys.modules, torch.cuda.is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_every_error_has_the_root_and_a_builtin() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, tensorstream.TensorStreamError)
        if cls is not tensorstream.TensorStreamError:
            assert any(issubclass(cls, b) for b in (ValueError, OSError, ImportError, MemoryError, RuntimeError))
    assert issubclass(tensorstream.BackendUnavailableError, ImportError)
    assert issubclass(tensorstream.CorruptFileError, tensorstream.FormatError)


def test_kvikio_backend_errors_are_clear() -> None:
    import pytest
    import torch

    from tensorstream.backends import get_backend

    with pytest.raises(tensorstream.BackendUnavailableError, match="CUDA"):
        get_backend("kvikio", torch.device("cpu"))
    with pytest.raises(tensorstream.BackendUnavailableError, match="direct_io"):
        get_backend("mmap", torch.device("cpu"), direct_io=True)
    assert get_backend("auto", torch.device("cpu")).name == "posix"
    assert get_backend("posix", torch.device("cpu"), direct_io=True).name == "posix+O_DIRECT"
