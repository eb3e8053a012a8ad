"""Every architecture a user brings: streamed block by block, bit-identical to the same model fully resident.

Each family is a tiny random model built from its config here and saved with ``save_pretrained`` (never
downloaded). Budgets stream every block (``prefetch=1``: two slots, fewer than the blocks), so each block's
weights come from its ``.ts`` file at every step. ``docs/models.md`` is the table these tests back.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

import tensorstream
from helpers.models import budgets

HELPERS = Path(__file__).parent / "helpers"
VOCAB = 256
SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
DECODER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 128,
    **SPECIAL,
}
ENCODER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
}


@dataclass(frozen=True)
class Family:
    """A model family: the Auto class that loads it, its tiny config, and what its forward takes."""

    auto: str
    model_type: str
    config: dict[str, Any] = field(default_factory=dict)
    inputs: str = "causal"  # causal | encoder | seq2seq | image

    @property
    def auto_class(self) -> Any:
        return getattr(transformers, self.auto)

    @property
    def generates(self) -> bool:
        return self.inputs in ("causal", "seq2seq")


FAMILIES = {
    "llama": Family("AutoModelForCausalLM", "llama", DECODER),
    "mistral": Family("AutoModelForCausalLM", "mistral", {**DECODER, "sliding_window": 8}),
    "qwen2": Family("AutoModelForCausalLM", "qwen2", DECODER),
    "qwen3": Family("AutoModelForCausalLM", "qwen3", {**DECODER, "head_dim": 8}),
    "gemma2": Family("AutoModelForCausalLM", "gemma2", {**DECODER, "head_dim": 8, "sliding_window": 8}),
    "gemma3": Family("AutoModelForCausalLM", "gemma3_text", {**DECODER, "head_dim": 8, "sliding_window": 8}),
    "phi3": Family("AutoModelForCausalLM", "phi3", DECODER),
    "gpt2": Family(
        "AutoModelForCausalLM", "gpt2", {"n_embd": 32, "n_layer": 3, "n_head": 4, "vocab_size": VOCAB, **SPECIAL}
    ),
    "gpt_neox": Family("AutoModelForCausalLM", "gpt_neox", {**DECODER, "num_key_value_heads": 4}),
    "opt": Family(
        "AutoModelForCausalLM",
        "opt",
        {**ENCODER, "ffn_dim": 64, "word_embed_proj_dim": 32, "vocab_size": VOCAB, **SPECIAL},
    ),
    "falcon": Family("AutoModelForCausalLM", "falcon", {**ENCODER, "vocab_size": VOCAB, **SPECIAL}),
    "mixtral": Family(
        "AutoModelForCausalLM", "mixtral", {**DECODER, "num_local_experts": 4, "num_experts_per_tok": 2}
    ),
    "qwen2_moe": Family(
        "AutoModelForCausalLM",
        "qwen2_moe",
        {
            **DECODER,
            "num_hidden_layers": 4,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 32,
            "decoder_sparse_step": 2,  # layers 1 and 3 are mixtures of experts, 0 and 2 dense: uneven blocks
        },
    ),
    "granitemoe": Family(  # torch._grouped_mm experts: CPU bits depend on the weights' address modulo 64
        "AutoModelForCausalLM",
        "granitemoe",
        {**DECODER, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "jamba": Family(  # hybrid: attention and Mamba decoder layers (two classes) alternate in one stack
        "AutoModelForCausalLM",
        "jamba",
        {
            **DECODER,
            "num_hidden_layers": 4,
            "attn_layer_period": 2,
            "attn_layer_offset": 1,
            "expert_layer_period": 2,
            "expert_layer_offset": 1,
            "num_experts": 2,
            "num_experts_per_tok": 1,
            "mamba_d_state": 4,
            "mamba_dt_rank": 4,
        },
    ),
    "bert": Family("AutoModel", "bert", {**ENCODER, "vocab_size": VOCAB, "pad_token_id": 0}, "encoder"),
    "t5": Family(
        "AutoModelForSeq2SeqLM",
        "t5",
        {
            "d_model": 32,
            "d_ff": 64,
            "d_kv": 8,
            "num_layers": 2,
            "num_decoder_layers": 2,
            "num_heads": 4,
            "vocab_size": VOCAB,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "decoder_start_token_id": 0,
        },
        "seq2seq",
    ),
    "bart": Family(
        "AutoModelForSeq2SeqLM",
        "bart",
        {
            "d_model": 32,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "encoder_layers": 2,
            "decoder_layers": 2,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "vocab_size": VOCAB,
            "max_position_embeddings": 128,
            "decoder_start_token_id": 2,
            "forced_eos_token_id": None,
            **SPECIAL,
        },
        "seq2seq",
    ),
    "marian": Family(  # sinusoidal position tables rebuilt at init, left out of the checkpoint
        "AutoModelForSeq2SeqLM",
        "marian",
        {
            "d_model": 32,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "encoder_layers": 2,
            "decoder_layers": 2,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "vocab_size": VOCAB,
            "max_position_embeddings": 128,
            "decoder_start_token_id": 0,
            "forced_eos_token_id": None,
            **SPECIAL,
        },
        "seq2seq",
    ),
    "vit": Family(
        "AutoModelForImageClassification",
        "vit",
        {**ENCODER, "image_size": 32, "patch_size": 8, "num_labels": 3},
        "image",
    ),
    "cvt": Family(  # the last stage is most of the model: it streams layer by layer (its layers are the units)
        "AutoModelForImageClassification",
        "cvt",
        {"embed_dim": [8, 16, 32], "num_heads": [1, 2, 4], "depth": [1, 2, 4], "num_labels": 3},
        "image",
    ),
    "clip_vision": Family(
        "AutoModel", "clip_vision_model", {**ENCODER, "image_size": 32, "patch_size": 8, "projection_dim": 16}, "image"
    ),
}
GENERATIVE = [name for name, family in FAMILIES.items() if family.generates]
CAUSAL = [name for name, family in FAMILIES.items() if family.inputs == "causal"]


class Checkpoints:
    """Saved tiny checkpoints and their fully resident references, built once per session on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._references: dict[str, nn.Module] = {}

    def __call__(self, name: str) -> Path:
        folder = self.root / name
        if not folder.exists():
            family = FAMILIES[name]
            config = transformers.AutoConfig.for_model(family.model_type, **family.config)
            torch.manual_seed(0)
            family.auto_class.from_config(config).save_pretrained(folder)
        return folder

    def reference(self, name: str) -> nn.Module:
        if name not in self._references:
            self._references[name] = FAMILIES[name].auto_class.from_pretrained(self(name))
        return self._references[name]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("architectures"))


def streamed(
    name: str, source: Path, storage: Path, *, prefetch: int = 1, dtype: torch.dtype | None = None, **config: Any
) -> Any:
    """``from_pretrained(source, device_map="tensorstream")`` with a budget that streams every block."""
    auto = FAMILIES[name].auto_class
    kwargs = {} if dtype is None else {"dtype": dtype}
    tensorstream.reshard(source, storage, dtype=dtype, model_class=auto, progress=False)
    budget = budgets(storage, prefetch)["stream_all"]
    cfg = tensorstream.Config(device="cpu", storage_path=storage, budget_gb=budget, prefetch=prefetch, **config)
    model = auto.from_pretrained(source, device_map="tensorstream", tensorstream_config=cfg, **kwargs)
    plan = model._tensorstream_engine.plan
    units = set(model._tensorstream_engine.store.manifest.get("units", []))  # large modules, kept resident first
    assert set(plan.resident) <= units and len(set(plan.streamed) - units) >= 3, plan.describe()
    return model


def inputs(name: str, batch: int = 2) -> dict[str, torch.Tensor]:
    """Inputs for ``name``'s forward: a padded batch with its attention mask, or images."""
    kind = FAMILIES[name].inputs
    torch.manual_seed(batch)
    if kind == "image":
        return {"pixel_values": torch.randn(batch, 3, 32, 32)}
    ids = torch.randint(3, VOCAB, (batch, 7))
    mask = torch.ones_like(ids)
    if batch > 1:
        pad = slice(0, 2) if kind == "causal" else slice(5, 7)  # left padding for decoders, right for encoders
        ids[1, pad] = 0
        mask[1, pad] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if kind == "seq2seq":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 4))
    return out


def generate_kwargs(name: str, batch: int = 2, new_tokens: int = 6) -> dict[str, Any]:
    args: dict[str, Any] = {k: v for k, v in inputs(name, batch).items() if k != "decoder_input_ids"}
    # min_new_tokens: a random model may pick EOS early; every step should run
    return {**args, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}


def assert_equal_outputs(actual: Any, expected: Any, where: str = "output") -> None:
    """Every tensor of two model outputs is ``torch.equal`` (tuples of hidden states included; caches skipped)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and torch.equal(actual, expected), where
    elif isinstance(expected, dict):  # a ModelOutput
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_equal_outputs(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, tuple | list):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_equal_outputs(a, e, f"{where}[{i}]")


def shared_storage_groups(model: nn.Module) -> set[frozenset[str]]:
    """Names of parameters that are one tensor under several names (tied weights), as groups."""
    groups: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), set()).add(name)
    return {frozenset(names) for names in groups.values() if len(names) > 1}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_bit_identical_to_the_resident_model(checkpoints: Checkpoints, storage: Path, name: str) -> None:
    """Logits, every hidden state, buffers, tied weights and greedy generation, for a padded batch of 2."""
    reference = checkpoints.reference(name)
    model = streamed(name, checkpoints(name), storage)
    assert not model.training
    assert shared_storage_groups(model) == shared_storage_groups(reference)  # e.g. GPT-2's lm_head stays tied
    buffers = dict(reference.named_buffers())  # persistent and non-persistent (rotary inv_freq)
    assert dict(model.named_buffers()).keys() == buffers.keys()
    for key, buffer in model.named_buffers():
        assert buffer.device.type == "cpu" and torch.equal(buffer, buffers[key]), key
    with torch.inference_mode():
        batch = inputs(name)
        assert_equal_outputs(model(**batch, output_hidden_states=True), reference(**batch, output_hidden_states=True))
        if FAMILIES[name].generates:
            args = generate_kwargs(name)
            assert torch.equal(model.generate(**args), reference.generate(**args))
    stats = tensorstream.stats(model)
    assert stats.blocks_run >= stats.streamed_blocks > 0 and stats.bytes_read > 0
    # the store holds what the runtime modules hold (Mixtral: fused experts.gate_up_proj, not per-expert w1/w3)
    store = model._tensorstream_engine.store
    stored = {key for entry in store.entries() for key in store.header(entry).tensors}
    assert stored | set(store.manifest["tied"]) == set(reference.state_dict())


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2", "mixtral"])
def test_static_cache_generation(checkpoints: Checkpoints, storage: Path, name: str) -> None:
    reference = checkpoints.reference(name)
    model = streamed(name, checkpoints(name), storage)
    args = {**generate_kwargs(name), "cache_implementation": "static"}
    with torch.inference_mode():
        assert torch.equal(model.generate(**args), reference.generate(**args))


@pytest.mark.filterwarnings("ignore:Attempting to save a model with offloaded modules:UserWarning")
@pytest.mark.parametrize("name", list(FAMILIES))
def test_save_pretrained_of_a_streamed_model_writes_the_original_checkpoint(
    checkpoints: Checkpoints, storage: Path, tmp_path: Path, name: str
) -> None:
    """The checkpoint layout comes back too: Mixtral's fused experts are written as per-expert w1/w2/w3 again."""
    model = streamed(name, checkpoints(name), storage)
    model.save_pretrained(tmp_path / "saved")
    original = load_file(checkpoints(name) / "model.safetensors")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert saved.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(saved[key], tensor), key
    with torch.inference_mode():  # the model still streams after saving
        reloaded = FAMILIES[name].auto_class.from_pretrained(tmp_path / "saved")
        assert_equal_outputs(model(**inputs(name)), reloaded(**inputs(name)))


@pytest.mark.filterwarnings("ignore:Attempting to save a model with offloaded modules:UserWarning")
def test_a_store_without_recorded_conversions_saves_with_the_default_mapping(
    checkpoints: Checkpoints, storage: Path, tmp_path: Path
) -> None:
    """Stores written before the manifest recorded conversions: transformers' default mapping for the class."""
    from types import SimpleNamespace

    from tensorstream.integrations.transformers import _restore_weight_conversions

    model = streamed("mixtral", checkpoints("mixtral"), storage)
    _restore_weight_conversions(model, SimpleNamespace(manifest={}))  # type: ignore[arg-type]
    model.save_pretrained(tmp_path / "saved")
    original = load_file(checkpoints("mixtral") / "model.safetensors")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], v) for k, v in original.items())


def test_detach_makes_an_ordinary_resident_model(checkpoints: Checkpoints, storage: Path) -> None:
    reference = checkpoints.reference("t5")
    model = streamed("t5", checkpoints("t5"), storage)
    tensorstream.detach(model)
    assert not hasattr(model, "_tensorstream_engine")
    assert all(not hasattr(m, "_hf_hook") for m in model.modules())
    assert all(p.device.type == "cpu" for p in model.parameters())
    args = generate_kwargs("t5")
    with torch.inference_mode():
        assert_equal_outputs(model(**inputs("t5")), reference(**inputs("t5")))
        assert torch.equal(model.generate(**args), reference.generate(**args))
    with pytest.raises(tensorstream.NotStreamingError):
        tensorstream.stats(model)


# -- checkpoint kinds -------------------------------------------------------------------------------------------


def to_bin(source: Path, target: Path, shards: int = 1) -> Path:
    """A copy of ``source`` with its weights as PyTorch ``.bin`` files (sharded with an index when shards > 1)."""
    shutil.copytree(source, target)
    tensors: dict[str, torch.Tensor] = {}
    for file in list(target.glob("*.safetensors")):
        tensors.update(load_file(file))
        file.unlink()
    (target / "model.safetensors.index.json").unlink(missing_ok=True)
    names = sorted(tensors)
    if shards == 1:
        torch.save(tensors, target / "pytorch_model.bin")
        return target
    per_shard = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        chunk = names[i * per_shard : (i + 1) * per_shard]
        torch.save({k: tensors[k] for k in chunk}, target / file)
        weight_map.update(dict.fromkeys(chunk, file))
    (target / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return target


@pytest.mark.parametrize(
    ("name", "kind"), [("gpt2", "bin"), ("mixtral", "sharded-bin"), ("mixtral", "sharded-safetensors")]
)
def test_checkpoint_kinds(checkpoints: Checkpoints, storage: Path, tmp_path: Path, name: str, kind: str) -> None:
    """``.bin`` and sharded checkpoints, Mixtral's experts split over shards included, give the same model."""
    if kind == "bin":
        source = to_bin(checkpoints(name), tmp_path / name)
    elif kind == "sharded-bin":
        source = to_bin(checkpoints(name), tmp_path / name, shards=3)
    else:
        checkpoints.reference(name).save_pretrained(tmp_path / name, max_shard_size="60KB")
        source = tmp_path / name
        assert len(list(source.glob("*.safetensors"))) >= 3
    model = streamed(name, source, storage)
    reference = checkpoints.reference(name)
    with torch.inference_mode():
        assert_equal_outputs(model(**inputs(name)), reference(**inputs(name)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_checkpoint_resharded_to_a_half_dtype(
    checkpoints: Checkpoints, storage: Path, tmp_path: Path, dtype: torch.dtype
) -> None:
    source = to_bin(checkpoints("mixtral"), tmp_path / "mixtral") if dtype == torch.float16 else checkpoints("mixtral")
    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoints("mixtral"), dtype=dtype)
    model = streamed("mixtral", source, storage, dtype=dtype)
    assert model.dtype == dtype
    store = model._tensorstream_engine.store
    assert {d for entry in store.entries() for d in entry.dtypes} == {"F16" if dtype == torch.float16 else "BF16"}
    with torch.inference_mode():
        assert torch.equal(model(**inputs("mixtral")).logits, reference(**inputs("mixtral")).logits)


class Payload:
    """Unpickling this runs code: a ``.bin`` file holding it must be refused, never executed."""

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (Path.touch, (Path(__file__).parent / "PICKLE_CODE_RAN",))


def test_bin_checkpoints_are_loaded_with_weights_only(checkpoints: Checkpoints, storage: Path, tmp_path: Path) -> None:
    source = to_bin(checkpoints("gpt2"), tmp_path / "gpt2")
    tensors = torch.load(source / "pytorch_model.bin", weights_only=True)
    torch.save({**tensors, "payload": Payload()}, source / "pytorch_model.bin")
    cfg = tensorstream.Config(device="cpu", storage_path=storage, budget_gb=1)
    with pytest.raises(tensorstream.FormatError, match=r"weights_only=True"):
        transformers.AutoModelForCausalLM.from_pretrained(
            source, device_map="tensorstream", tensorstream_config=cfg, weights_only=False
        )
    assert not (Path(__file__).parent / "PICKLE_CODE_RAN").exists()


# -- models without blocks --------------------------------------------------------------------------------------


class FlatConfig(transformers.PretrainedConfig):
    model_type = "tensorstream-flat"


class FlatModel(transformers.PreTrainedModel):
    """A transformers model with no stack of repeated blocks."""

    config_class = FlatConfig

    def __init__(self, config: FlatConfig) -> None:
        super().__init__(config)
        self.proj = nn.Linear(8, 8)
        self.post_init()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def test_a_model_without_repeated_blocks_is_a_clear_error(storage: Path, tmp_path: Path) -> None:
    FlatModel(FlatConfig()).save_pretrained(tmp_path / "flat")
    cfg = tensorstream.Config(device="cpu", storage_path=storage, budget_gb=1)
    with pytest.raises(
        tensorstream.UnsupportedModelError, match=r"ModuleList of modules that all hold parameters"
    ) as info:
        FlatModel.from_pretrained(tmp_path / "flat", device_map="tensorstream", tensorstream_config=cfg)
    assert "FlatModel" in str(info.value) and "without device_map='tensorstream'" in str(info.value)


# -- the schedule follows execution -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_encoder_decoder_misses_do_not_grow_with_the_decode_steps(
    checkpoints: Checkpoints, storage: Path, name: str
) -> None:
    """Decode steps skip the encoder: the schedule learns that the decoder's first block follows its last one."""
    reference = checkpoints.reference(name)
    model = streamed(name, checkpoints(name), storage)
    stats = tensorstream.stats(model)
    misses = []
    with torch.inference_mode():
        for new_tokens in (3, 3, 12, 12):
            args = generate_kwargs(name, batch=1, new_tokens=new_tokens)
            before = stats.sync_loads
            assert torch.equal(model.generate(**args), reference.generate(**args))
            misses.append(stats.sync_loads - before)
    assert misses[2] == misses[1], misses  # four times the decode steps, not one more miss
    assert misses[3] == misses[2] <= 1, misses


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_encoder_decoder_misses_only_the_encoder_entry_after_a_warm_up(
    checkpoints: Checkpoints, storage: Path, name: str
) -> None:
    """After a warm-up, a generate call misses once: the encoder's first block, which nothing runs right before.

    The decoder's last block is followed by the decoder's first at every decode step and by the encoder's first
    once per call; the engine predicts the most frequent successor, so only the start of a call misses.
    """
    reference = checkpoints.reference(name)
    model = streamed(name, checkpoints(name), storage)
    args = generate_kwargs(name, batch=1)
    stats = tensorstream.stats(model)
    with torch.inference_mode():
        for _ in range(2):  # warm-up
            assert torch.equal(model.generate(**args), reference.generate(**args))
        for _ in range(3):
            before = stats.sync_loads
            assert torch.equal(model.generate(**args), reference.generate(**args))
            assert stats.sync_loads - before == 1, (before, stats.sync_loads)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(128, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x)) + x


class Repeats(nn.Module):
    """Runs ``blocks[1]`` twice in a row in every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 128)
        self.blocks = nn.ModuleList(Block() for _ in range(4))
        self.out = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        x = self.blocks[0](x)
        x = self.blocks[1](x)
        x = self.blocks[1](x)
        x = self.blocks[2](x)
        x = self.blocks[3](x)
        return self.out(x)


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_a_block_that_runs_twice_gives_exact_output(storage: Path, prefetch: int) -> None:
    from tensorstream.reshard import reshard_module

    torch.manual_seed(0)
    model = Repeats()
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
    reshard_module(model, storage, progress=False)  # the store offload() reuses, to size the budget from
    config = tensorstream.Config(
        device="cpu", storage_path=storage, budget_gb=budgets(storage, prefetch)["stream_all"], prefetch=prefetch
    )
    tensorstream.offload(model, config)
    assert len(model._tensorstream_engine.plan.streamed) == 4
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(x), expected)
    assert tensorstream.stats(model).blocks_run == 3 * 5


# -- memory bounds ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama-big-embed", "qwen2-moe"])
def test_streaming_peak_rss_within_budget_plus_overhead(tmp_path: Path, family: str) -> None:
    """A >= 300 MB fp32 model streamed with the smallest budget that streams every block, in a fresh process.

    ``llama-big-embed``: an 80k x 768 tied embedding makes the non-block weights most of the model.
    ``qwen2-moe``: mixture-of-experts blocks alternating with dense ones, so blocks are uneven.
    """
    from helpers.rss_probe import prepare

    prepare(tmp_path, family, reshard=True)  # here, where torch is imported already; the probe only measures
    result = subprocess.run(
        [sys.executable, str(HELPERS / "rss_probe.py"), "stream", str(tmp_path), "min", family],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["model_bytes"] >= 300e6, figures
    assert figures["streamed_blocks"] == figures["blocks"], figures
    # the budget bounds anonymous memory; with the zero-copy mmap mode (what "auto" picks on CPU when the store
    # fits in memory) the weights are mapped page-cache pages, file-backed (see test_streaming's RSS test)
    assert figures["peak_anon_rss"] - figures["baseline_anon_rss"] <= figures["budget_bytes"] + 64e6, figures
    if figures["backend"].startswith("posix"):
        assert figures["peak_rss"] - figures["baseline_rss"] <= figures["budget_bytes"] + 64e6, figures


# -- the registry sweep's failure classes (scripts/registry_sweep.py, docs/models.md) ---------------------------

SCRIPTS = Path(__file__).parents[1] / "scripts"
#: one model type per failure class the registry sweep found, built by the sweep's generic tiny-config rule and
#: streamed with a budget of 85 % of its weights (below two of its largest blocks for some)
REGISTRY_SUBSET = {
    "xlnet": ("causal-lm", "bare parameters held directly by blocks (q/k/v/o): blocks/blocks/ path"),
    "mobilenet_v2": ("image-classification", "BatchNorm running statistics in blocks (randomised by the sweep)"),
    "resnet": ("image-classification", "CNN stages of different sizes: below two of the largest block"),
    # reported off by ~2e-7 with requires_grad=False bindings; exact here either way, so the binding itself is
    # checked by test_streamed_parameters_are_bound_as_the_resident_model_holds_them
    "led": ("seq2seq-lm", "encoder-decoder with global attention (class 3 as reported)"),
    "funnel": ("masked-lm", "blocks inside a list of lists (containers are never called)"),
    "albert": ("masked-lm", "no repeated stack: large modules stream as units"),
    "rembert": ("masked-lm", "an untied output head larger than the blocks streams as a unit"),
    "marian": ("seq2seq-lm", "tensors left out of the checkpoint, rebuilt by init: taken from transformers' init"),
    "granitemoe": ("causal-lm", "torch._grouped_mm bits depend on the weight address mod 64: phases kept (format 2)"),
    "pp_lcnet": ("image-classification", "convolution bits depend on the weight address mod 64: phases kept"),
}


def registry_sweep() -> Any:
    sys.path.insert(0, str(SCRIPTS))
    try:
        import registry_sweep as module
    finally:
        sys.path.remove(str(SCRIPTS))
    return module


@pytest.mark.parametrize("model_type", list(REGISTRY_SUBSET))
def test_registry_failure_classes_stream_bit_exactly(tmp_path: Path, model_type: str) -> None:
    task, why = REGISTRY_SUBSET[model_type]
    result = registry_sweep().run_one(task, model_type, ("tensorstream",), tmp_path)
    assert result["build"] == "ok", result
    assert result.get("tensorstream") == "ok", (why, result.get("tensorstream_trace"))
    assert result["streamed"] > 0 and result["budget_bytes"] < result["bytes"], result["plan"]


def test_streamed_parameters_are_bound_as_the_resident_model_holds_them(
    checkpoints: Checkpoints, storage: Path
) -> None:
    """Same requires_grad, dtype, shape and strides as the resident parameters, inside the forward."""
    reference = checkpoints.reference("llama")
    model = streamed("llama", checkpoints("llama"), storage)
    seen: dict[str, tuple[Any, ...]] = {}

    def record(module: nn.Module, args: Any, output: Any) -> None:
        for name, p in module.named_parameters():
            seen[name] = (p.requires_grad, p.dtype, tuple(p.shape), p.stride(), p.device.type)

    model.model.layers[1].mlp.register_forward_hook(record)
    model(**inputs("llama"))
    expected = {
        name: (p.requires_grad, p.dtype, tuple(p.shape), p.stride(), p.device.type)
        for name, p in reference.model.layers[1].mlp.named_parameters()
    }
    assert seen == expected


def test_a_model_whose_largest_part_is_outside_the_blocks_streams_it_as_a_unit(tmp_path: Path) -> None:
    """An untied output head larger than every block is its own unit, kept resident first, streamed when needed."""
    from tensorstream.plan import find_units

    config = transformers.AutoConfig.for_model(
        "llama", **{**DECODER, "vocab_size": 4096, "tie_word_embeddings": False}
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    units = find_units(model)
    assert ("lm_head", "module") in units and ("model.embed_tokens", "module") not in units  # model.device
    model.save_pretrained(tmp_path / "src")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src")
    storage = tmp_path / "store"
    tensorstream.reshard(tmp_path / "src", storage, progress=False)
    (store,) = [p for p in storage.iterdir() if not p.name.startswith(".")]
    assert json.loads((store / "tensorstream.json").read_text())["units"] == ["lm_head"]
    head = 4096 * 32 * 4
    non_block = head + 32 * 4  # embeddings and final norm
    cfg = tensorstream.Config(device="cpu", storage_path=storage, budget_gb=(non_block + head + 2 * 4096) / 1e9)
    streamed_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "src", device_map="tensorstream", tensorstream_config=cfg
    )
    plan = streamed_model._tensorstream_engine.plan
    assert "lm_head" in plan.streamed and plan.resident == ()
    ids = inputs("llama")
    with torch.inference_mode():
        assert torch.equal(streamed_model(**ids).logits, reference(**ids).logits)
        args = generate_kwargs("llama")
        assert torch.equal(streamed_model.generate(**args), reference.generate(**args))


@pytest.mark.slow
def test_registry_sweep_script_on_a_subset(tmp_path: Path) -> None:
    """The sweep script end to end (both columns, the generated table) on the failure-class subset."""
    out, docs = tmp_path / "sweep.jsonl", tmp_path / "models.md"
    command = [sys.executable, str(SCRIPTS / "registry_sweep.py"), "--out", str(out), "--docs", str(docs)]
    subprocess.run([*command, "--only", *REGISTRY_SUBSET, "llama"], check=True, capture_output=True, timeout=1800)
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["model_type"] for r in results} >= set(REGISTRY_SUBSET)
    for r in results:
        if r["build"] == "ok" and r.get("accelerate") == "ok":
            assert r.get("tensorstream") == "ok", r
    text = docs.read_text()
    assert (
        f"transformers {transformers.__version__}" in text
        and "accelerate bit-exact but tensorstream not: **0**" in text
    )


class WideBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(64, width)
        self.down = nn.Linear(width, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x))) + x


class Uneven(nn.Module):
    """Blocks of very different sizes, run in whatever order ``self.order`` says (misses, repeats, skips)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 64)
        self.blocks = nn.ModuleList(WideBlock(w) for w in (16, 512, 16, 128, 1024, 32))
        self.out = nn.Linear(64, 4)
        self.order: list[int] = list(range(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for i in self.order:
            x = self.blocks[i](x)
        return self.out(x)


@pytest.mark.parametrize("extra", [0, 1, 3])
def test_uneven_blocks_in_any_order_through_the_arena(storage: Path, extra: int) -> None:
    """The arena stays correct when the order differs from the predicted one (misses) and on wrap-around.

    The budget is the planner's minimum for two blocks in flight plus ``extra`` small blocks' worth, far below
    two of the largest block: regions of different sizes share the arena in every pattern.
    """
    import copy
    import random

    from tensorstream.plan import arena_bytes
    from tensorstream.reshard import reshard_module
    from tensorstream.store import Store

    torch.manual_seed(0)
    model = Uneven()
    reference = copy.deepcopy(model)
    path = reshard_module(model, storage, progress=False)
    store = Store.open(path)
    sizes = [b.data_size for b in store.blocks]
    budget = store.non_block.data_size + arena_bytes(sizes, 2) + extra * 4096 * 8
    assert budget < store.non_block.data_size + 2 * max(sizes)
    tensorstream.offload(model, tensorstream.Config(device="cpu", storage_path=storage, budget_gb=budget / 1e9))
    plan = model._tensorstream_engine.plan
    assert plan.resident == () and plan.num_slots >= 2
    rng = random.Random(0)
    orders = [list(range(6)), list(range(6)), [5, 4, 3, 2, 1, 0], [1, 1, 4, 4, 0], [4], list(range(6))]
    orders += [[rng.randrange(6) for _ in range(rng.randint(1, 9))] for _ in range(12)]
    x = torch.randn(3, 8)
    with torch.no_grad():
        for order in orders:
            model.order = reference.order = order
            assert torch.equal(model(x), reference(x)), order
    engine = model._tensorstream_engine
    assert sorted(id(r) for r in engine.slots.live) == sorted(id(load.slot) for load in engine.pipeline.values())
    assert tensorstream.stats(model).prefetch_hits > 0
