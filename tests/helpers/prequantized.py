"""Tiny checkpoints written in the published layouts of pre-quantized releases (no download, no GPU).

* fine-grained FP8 (DeepSeek-V3, Qwen3-FP8): every block linear's ``weight`` as ``float8_e4m3fn`` and
  ``weight_scale_inv`` (float32, one per 128x128 block), ``quantization_config={"quant_method": "fp8",
  "weight_block_size": [128, 128], ...}``; embeddings, norms and the head stay bf16.
* GPTQ (4 bits, group 32): ``qweight``/``qzeros`` packed int32, ``scales``, ``g_idx``, ``quant_method: "gptq"``.
* MXFP4 (gpt-oss): fused experts as ``*_blocks`` and ``*_scales``, ``quant_method: "mxfp4"``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FP8_CONFIG = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic", "fmt": "e4m3"}


def tiny_llama(layers: int = 3, hidden: int = 128, dtype: torch.dtype = torch.float32) -> Any:
    """A seeded random Llama whose block linears are whole 128x128 FP8 blocks (``head_dim`` 128)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=128,
        vocab_size=96,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).to(dtype)


def tiny_qwen3_moe(experts: int, top_k: int, hidden: int = 128, layers: int = 2) -> Any:
    """A seeded random Qwen3-MoE with ``experts`` experts (128 rows each), ``top_k`` of them routed per token."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        hidden_size=hidden,
        intermediate_size=256,
        moe_intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=128,
        vocab_size=96,
        num_experts=experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=64,
    )
    return Qwen3MoeForCausalLM(config)


def fp8_blockwise(weight: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` as float8 values and float32 ``scale_inv`` per block (as DeepSeek's conversion script does)."""
    rows, cols = weight.shape
    blocks = weight.float().reshape(rows // block, block, cols // block, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).reshape(rows, cols)
    return q, scale


def write_quantized(folder: Path, model: torch.nn.Module, convert: Any, quantization_config: dict[str, Any]) -> Path:
    """``model`` saved in bf16, then each tensor ``convert(name, tensor)`` returns replaced (a dict), and
    ``quantization_config`` written into ``config.json``."""
    model.to(torch.bfloat16).save_pretrained(folder)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in load_file(folder / "model.safetensors").items():
        tensors.update(convert(name, tensor))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def fp8_convert(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Block linears (``...layers.N....proj.weight``, 2-D, both dims multiples of 128) to fine-grained FP8."""
    if ".layers." in name and name.endswith("proj.weight") and tensor.dim() == 2:
        q, scale = fp8_blockwise(tensor)
        return {name: q, name.replace(".weight", ".weight_scale_inv"): scale}
    return {name: tensor}


def fp8_moe_convert(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fused experts ``[E, out, in]`` written as per-expert FP8 weights (Qwen3-30B-A3B-FP8's layout)."""
    if ".experts." in name and tensor.dim() == 3:
        prefix, proj = name.rsplit(".", 1)
        out: dict[str, torch.Tensor] = {}
        for e in range(tensor.shape[0]):
            parts = {"gate_proj": tensor[e].chunk(2)[0], "up_proj": tensor[e].chunk(2)[1]}
            parts = parts if proj == "gate_up_proj" else {"down_proj": tensor[e]}
            for part, w in parts.items():
                q, scale = fp8_blockwise(w.contiguous())
                out[f"{prefix}.{e}.{part}.weight"] = q
                out[f"{prefix}.{e}.{part}.weight_scale_inv"] = scale
        return out
    return fp8_convert(name, tensor)


def gptq_convert(name: str, tensor: torch.Tensor, group: int = 32) -> dict[str, torch.Tensor]:
    """Block linears in GPTQ's v1 serialized layout (4 bits, zero point 8 stored as 7: ``0x77777777``)."""
    if not (".layers." in name and name.endswith("proj.weight")):
        return {name: tensor}
    out_features, in_features = tensor.shape
    prefix = name.removesuffix(".weight")
    scales = (tensor.float().reshape(out_features, -1, group).abs().amax(-1) / 7).clamp(min=1e-6).t()
    q = (tensor.float().t() / scales.repeat_interleave(group, 0)).round().clamp(-8, 7).to(torch.int32) + 8
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    qweight = (q.reshape(in_features // 8, 8, out_features) << shifts[None, :, None]).sum(1, dtype=torch.int32)
    qzeros = torch.full((in_features // group, out_features // 8), 0x77777777, dtype=torch.int32)
    return {
        f"{prefix}.qweight": qweight,
        f"{prefix}.qzeros": qzeros,
        f"{prefix}.scales": scales.to(torch.float16).contiguous(),
        f"{prefix}.g_idx": torch.arange(in_features, dtype=torch.int32) // group,
    }


GPTQ_CONFIG = {
    "quant_method": "gptq",
    "bits": 4,
    "group_size": 32,
    "desc_act": False,
    "sym": True,
    "checkpoint_format": "gptq",
}


def mxfp4_convert(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """gpt-oss's fused experts ``[E, in, out]`` as MXFP4 ``*_blocks`` (``[E, out, in / 32, 16]`` bytes, two FP4
    values each) and ``*_scales`` (``[E, out, in / 32]`` E8M0 exponents): random valid codes, seeded by the name."""
    if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return {name: tensor}
    experts, rows, cols = tensor.shape
    generator = torch.Generator().manual_seed(len(name))
    return {
        f"{name}_blocks": torch.randint(
            0, 256, (experts, cols, rows // 32, 16), dtype=torch.uint8, generator=generator
        ),
        f"{name}_scales": torch.randint(118, 128, (experts, cols, rows // 32), dtype=torch.uint8, generator=generator),
    }


MXFP4_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}
