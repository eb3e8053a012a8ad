"""tensorstream: run Hugging Face models larger than your GPU or RAM at the speed of your storage.

```python
import tensorstream                      # registers device_map="tensorstream"
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(
    "org/some-70b-model", device_map="tensorstream", tensorstream_config=tensorstream.Config(budget_gb=5)
)
print(tensorstream.stats(model))
```
"""

from __future__ import annotations

from .config import Config
from .engine import StreamStats
from .errors import (
    BackendUnavailableError,
    BudgetError,
    ConfigError,
    CorruptFileError,
    FormatError,
    LockTimeoutError,
    NotStreamingError,
    StaleStoreError,
    StorageFullError,
    StreamingError,
    TensorStreamError,
    UnsupportedModelError,
    UnsupportedOperationError,
)
from .format import load_ts, read_ts_header, save_to_ts
from .integrations.transformers import install as _install_transformers
from .reshard import reshard
from .stream import detach, offload, stats

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "BudgetError",
    "Config",
    "ConfigError",
    "CorruptFileError",
    "FormatError",
    "LockTimeoutError",
    "NotStreamingError",
    "StaleStoreError",
    "StorageFullError",
    "StreamStats",
    "StreamingError",
    "TensorStreamError",
    "UnsupportedModelError",
    "UnsupportedOperationError",
    "__version__",
    "detach",
    "load_ts",
    "offload",
    "read_ts_header",
    "reshard",
    "save_to_ts",
    "stats",
]

_install_transformers()
