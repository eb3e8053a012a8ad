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


def _modules_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)), file=sys.stderr)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(result.stderr.split())


def test_import_tensorstream_imports_neither_torch_nor_transformers() -> None:
    loaded = _modules_after("import tensorstream")
    assert "torch" not in loaded and "transformers" not in loaded


def test_cli_help_and_version_do_not_import_torch() -> None:
    for flag in ("--help", "--version"):
        code = (
            "import runpy, sys\n"
            f"sys.argv = ['tensorstream', {flag!r}]\n"
            "try:\n    runpy.run_module('tensorstream.cli', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code"
        )
        loaded = _modules_after(code)
        assert "tensorstream.errors" in loaded and "torch" not in loaded, flag
    version = subprocess.run([sys.executable, "-m", "tensorstream.cli", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == f"tensorstream {tensorstream.__version__}"


def test_device_map_is_registered_whichever_is_imported_first() -> None:
    """Registered either way; with tensorstream first, the import of transformers' model classes is also quiet.

    transformers imports torchao with its first model class; where torchao's CUDA extensions cannot load (any CPU
    machine) that prints "Failed to load ..._C_*.so" and torch's "Enum subclass ... deprecated" notices, unless
    ``import tensorstream`` came first (``tensorstream/_quiet.py``). The loggers' levels are the user's again after.
    """
    check = (
        "from transformers import PreTrainedModel; assert PreTrainedModel.from_pretrained.__func__.__tensorstream__"
    )
    levels = "import logging; print([logging.getLogger(n).level for n in ('torchao', 'torch.utils._pytree')])"
    first = subprocess.run(
        [sys.executable, "-c", f"import tensorstream\n{check}\n{levels}"], capture_output=True, text=True, check=True
    )
    assert "failed to load" not in first.stderr.lower() and "deprecated" not in first.stderr.lower(), first.stderr
    assert first.stdout.strip() == "[0, 0]"
    code = f"import transformers.modeling_utils\nimport tensorstream\n{check}"
    subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)


def test_reshard_stays_the_function_after_its_module_is_imported() -> None:
    import importlib

    module = importlib.import_module("tensorstream.reshard")
    assert callable(tensorstream.reshard) and tensorstream.reshard is module.reshard
    assert sorted(set(dir(tensorstream)) & set(tensorstream.__all__)) == tensorstream.__all__
