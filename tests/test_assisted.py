"""Assisted generation (a resident draft model, or prompt lookup) on a streamed model: the same tokens as resident.

Each verification forward of the streamed model is one weight pass that can accept several tokens; the outputs
must equal the fully resident model's under the same generation settings, for either backend.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import tensorstream
from helpers.models import budgets, streaming


def prompt() -> torch.Tensor:
    torch.manual_seed(5)
    ids = torch.randint(3, 250, (1, 8))
    return torch.cat([ids, ids, ids[:, :4]], dim=1)  # repeats itself, so prompt lookup has candidates


@pytest.mark.parametrize("backend", ["posix", "mmap"])
@pytest.mark.parametrize("assist", ["draft model", "prompt lookup"])
def test_assisted_generation_on_a_streamed_model_matches_resident(
    model_dirs: dict[str, Path], storage: Path, backend: str, assist: str
) -> None:
    tensorstream.reshard(model_dirs["llama"], storage, progress=False)
    model = streaming(model_dirs["llama"], storage, budget_gb=budgets(storage)["stream_all"], backend=backend)
    reference = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    if assist == "draft model":
        torch.manual_seed(1)
        from transformers import LlamaConfig, LlamaForCausalLM

        draft = LlamaForCausalLM(LlamaConfig(**{**reference.config.to_dict(), "num_hidden_layers": 1}))
        extra: dict[str, object] = {"assistant_model": draft.eval()}
    else:
        extra = {"prompt_lookup_num_tokens": 4}
    settings = {"max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False, "pad_token_id": 0, **extra}
    passes = [0]
    handle = model.register_forward_pre_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))
    with torch.inference_mode():
        out = model.generate(prompt(), **settings)
        expected = reference.generate(prompt(), **settings)
    handle.remove()
    assert torch.equal(out, expected)
    assert out.shape[1] == prompt().shape[1] + 12
    assert 1 <= passes[0] <= 12  # never more weight passes than tokens
    assert tensorstream.stats(model).sync_loads == 0
