"""Every other change to a streaming model's weights (issue 19): exact (the change reaches every block the next
forward uses, bit-identical to the same call on the resident model), or `UnsupportedOperationError` at the call with
the model unchanged and usable.

A tiny Llama with a budget that streams 5 of its 6 blocks (``model.layers.0`` resident). Every test here backs a line
of ``docs/guarantees.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import tensorstream
from helpers.models import budgets, streaming

STREAMED = "model.layers.3.mlp.down_proj"
RESIDENT = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def setup(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    storage = tmp_path_factory.mktemp("state") / "stores"
    tensorstream.reshard(model_dirs["llama"], storage, progress=False)
    return {"base": model_dirs["llama"], "storage": storage, "budget": budgets(storage, 1)["some_resident"]}


def pair(setup: dict[str, Any]) -> tuple[Any, Any]:
    model = streaming(setup["base"], setup["storage"], budget_gb=setup["budget"], prefetch=1)
    plan = model._tensorstream_engine.plan
    assert plan.resident == ("model.layers.0",) and len(plan.streamed) == 5
    return model, AutoModelForCausalLM.from_pretrained(setup["base"])


def ids() -> torch.Tensor:
    torch.manual_seed(7)
    return torch.randint(3, 250, (2, 9))


def logits(model: Any) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids()).logits


def same(model: Any, reference: Any) -> None:
    first = logits(model)
    assert torch.equal(first, logits(reference))
    assert torch.equal(logits(model), first)


def refused(call: Callable[[], Any], *words: str) -> None:
    with pytest.raises(tensorstream.UnsupportedOperationError) as info:
        call()
    for word in words:
        assert word in str(info.value), str(info.value)


# -- load_state_dict --------------------------------------------------------------------------------------------------


def test_load_state_dict_of_resident_weights_is_exact(setup: dict[str, Any]) -> None:
    model, reference = pair(setup)
    torch.manual_seed(1)
    update = {
        "lm_head.weight": torch.randn(256, 64),
        f"{RESIDENT}.weight": torch.randn(64, 128),
        "model.norm.weight": torch.rand(64),
    }
    for m in (model, reference):
        result = m.load_state_dict(update, strict=False)
        assert not result.unexpected_keys
    same(model, reference)


def test_load_state_dict_naming_a_streamed_weight_is_refused_before_anything_loads(setup: dict[str, Any]) -> None:
    model, reference = pair(setup)
    update = {name: torch.randn_like(p) for name, p in reference.state_dict().items()}  # every weight, new values
    for kwargs in ({}, {"strict": False}, {"assign": True}):
        refused(lambda: model.load_state_dict(update, **kwargs), "load_state_dict", "Nothing was loaded")  # noqa: B023
        same(model, reference)  # the resident weights (listed first) were not loaded either
    refused(lambda: model.model.layers[3].load_state_dict(reference.model.layers[3].state_dict()), "load_state_dict")
    same(model, reference)


# -- assignment, register_parameter -----------------------------------------------------------------------------------


def test_replacing_a_streamed_parameter_is_refused(setup: dict[str, Any]) -> None:
    model, reference = pair(setup)
    module = model.get_submodule(STREAMED)
    new = nn.Parameter(torch.zeros(64, 128))
    refused(lambda: setattr(module, "weight", new), "assigning the parameter 'weight'")
    refused(lambda: module.register_parameter("weight", new), "assigning the parameter 'weight'")
    refused(lambda: setattr(module.weight, "data", new.data), "p.data = ...", STREAMED)
    assert module.weight.is_meta
    same(model, reference)


def test_assigning_resident_parameters_and_registering_new_ones_is_exact(setup: dict[str, Any]) -> None:
    model, reference = pair(setup)
    torch.manual_seed(2)
    head, extra = torch.randn(256, 64), torch.randn(3)
    for m in (model, reference):
        m.lm_head.weight = nn.Parameter(head.clone())
        m.get_submodule(RESIDENT).weight = nn.Parameter(torch.ones(64, 128))
        m.get_submodule(STREAMED).register_parameter("extra", nn.Parameter(extra.clone()))  # a new name: resident
    same(model, reference)
    assert torch.equal(model.get_submodule(STREAMED).extra, extra)


def test_replacing_a_streamed_module_is_refused(setup: dict[str, Any]) -> None:
    model, reference = pair(setup)
    mlp = model.model.layers[3].mlp
    refused(lambda: setattr(mlp, "down_proj", nn.Linear(128, 64, bias=False)), "replacing the submodule 'down_proj'")
    same(model, reference)


# -- in-place ops -----------------------------------------------------------------------------------------------------


OPS: dict[str, Callable[[nn.Parameter], Any]] = {
    "add_": lambda p: p.add_(1),
    "data.add_": lambda p: p.data.add_(1),
    "copy_": lambda p: p.copy_(torch.zeros(p.shape)),
    "init.normal_": lambda p: nn.init.normal_(p),
    "iadd": lambda p: p.__iadd__(1),
    "setitem": lambda p: p.__setitem__(0, 1.0),
}


def test_in_place_ops_on_a_streamed_parameter_are_refused(setup: dict[str, Any]) -> None:
    model, reference = pair(setup)
    for op in OPS.values():
        with torch.no_grad():
            refused(lambda: op(model.get_submodule(STREAMED).weight), STREAMED)  # noqa: B023
        same(model, reference)


def test_in_place_ops_on_resident_parameters_are_exact(setup: dict[str, Any]) -> None:
    model, reference = pair(setup)
    with torch.no_grad():
        for m in (model, reference):
            m.get_submodule(RESIDENT).weight.mul_(0.5)
            m.lm_head.weight.data.add_(0.25)
    same(model, reference)


def test_computing_with_a_streamed_parameter_outside_its_forward_is_refused(setup: dict[str, Any]) -> None:
    """Its values exist only while its block runs (meta arithmetic would be garbage or an untyped error)."""
    model, reference = pair(setup)
    weight = model.get_submodule(STREAMED).weight
    refused(lambda: weight + torch.ones(64, 128), "add()")
    refused(lambda: torch.cat([weight, weight]), "cat()")
    refused(lambda: weight.to("cpu"), "to()")
    assert weight.shape == (64, 128) and weight.dtype == torch.float32 and weight.device == torch.device("cpu")
    same(model, reference)


# -- embeddings: resize and tie ---------------------------------------------------------------------------------------


def test_resize_token_embeddings_is_exact(setup: dict[str, Any]) -> None:
    model, reference = pair(setup)
    for m in (model, reference):
        torch.manual_seed(3)  # the new rows are drawn at random
        m.resize_token_embeddings(300)
    assert model.lm_head.weight.shape == (300, 64)
    same(model, reference)


def test_tie_weights_is_exact(setup: dict[str, Any]) -> None:
    model, reference = pair(setup)
    for m in (model, reference):
        m.config.tie_word_embeddings = True
        m.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    same(model, reference)


# -- requires_grad_ and an optimizer step -----------------------------------------------------------------------------


def test_requires_grad_reaches_the_bound_weights(setup: dict[str, Any]) -> None:
    model, reference = pair(setup)
    seen: list[bool] = []
    model.get_submodule(STREAMED).register_forward_pre_hook(lambda m, a: seen.append(m.weight.requires_grad))
    logits(model)
    for m in (model, reference):
        m.requires_grad_(False)
    logits(model)
    assert seen == [True, False]
    same(model, reference)


def test_an_optimizer_step_on_resident_weights_is_exact_and_backward_through_streamed_ones_is_refused(
    setup: dict[str, Any],
) -> None:
    model, reference = pair(setup)
    for m in (model, reference):
        m.requires_grad_(False)
        m.lm_head.weight.requires_grad_(True)  # train the LM head only: no gradient reaches a streamed block
        optimizer = torch.optim.SGD([m.lm_head.weight], lr=0.1)
        m(input_ids=ids()).logits.square().mean().backward()
        optimizer.step()
    same(model, reference)
    model.requires_grad_(True)
    loss = model(input_ids=ids()).logits.square().mean()
    refused(loss.backward, "backward through the streamed block")
    same(model, reference)
