"""Shared fixtures: tiny random transformers models built in the test session (never downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REQUIRE_GPU = os.environ.get("TENSORSTREAM_REQUIRE_GPU", "").lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``cuda``/``kvikio`` tests where they cannot run; with TENSORSTREAM_REQUIRE_GPU=1, fail instead."""
    import importlib.util

    has_cuda = torch.cuda.is_available()
    has_kvikio = importlib.util.find_spec("kvikio") is not None
    for item in items:
        reason = None
        if "cuda" in item.keywords and not has_cuda:
            reason = "needs a CUDA device"
        if "kvikio" in item.keywords and not (has_kvikio and has_cuda):
            reason = "needs kvikio and a CUDA device"
        if reason is None:
            continue
        if REQUIRE_GPU:
            item.stash[_MISSING] = reason
        else:
            item.add_marker(pytest.mark.skip(reason=reason))


_MISSING = pytest.StashKey[str]()


def pytest_runtest_setup(item: pytest.Item) -> None:
    reason = item.stash.get(_MISSING, None)
    if reason is not None:
        pytest.fail(f"TENSORSTREAM_REQUIRE_GPU=1 but this machine cannot run this test: it {reason}", pytrace=False)


def _llama(**overrides: object) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs: dict[str, object] = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**kwargs))


def _qwen2() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(
        Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
            max_position_embeddings=128,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )
    )


def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(
            n_embd=64,
            n_layer=6,
            n_head=4,
            vocab_size=256,
            n_positions=128,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            tie_word_embeddings=True,
        )
    )


BUILDERS = {"llama": _llama, "qwen2": _qwen2, "gpt2": _gpt2}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders with a saved tiny random model for each family (built once per session)."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for name, build in BUILDERS.items():
        torch.manual_seed(0)
        model = build()
        model.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    return tmp_path / "stores"
