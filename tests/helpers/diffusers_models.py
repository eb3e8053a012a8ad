"""Tiny random diffusers models and a tiny Flux pipeline, built from diffusers' and transformers' own config classes
(nothing is downloaded), with fixed inputs for each model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

KINDS = ("flux", "sd3", "wan", "unet", "vae")


def tiny_model(kind: str) -> Any:
    """A random tiny diffusers model of ``kind`` (seeded)."""
    torch.manual_seed(0)
    if kind == "flux":
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=(4, 6, 6),
        )
    if kind == "sd3":
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=3,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=32,
            pooled_projection_dim=64,
            out_channels=4,
            pos_embed_max_size=16,
        )
    if kind == "wan":
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=4,
            out_channels=4,
            text_dim=16,
            freq_dim=256,
            ffn_dim=32,
            num_layers=3,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )
    if kind == "unet":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            norm_num_groups=8,
        )
    if kind == "vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL(
            block_out_channels=(16, 32),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            norm_num_groups=8,
        )
    raise ValueError(kind)


def inputs(kind: str, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Fixed inputs for ``tiny_model(kind)`` (``return_dict=False``: the output is a tuple)."""
    generator = torch.Generator().manual_seed(1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    if kind == "flux":
        return {
            "hidden_states": randn(1, 16, 4),
            "encoder_hidden_states": randn(1, 8, 32),
            "pooled_projections": randn(1, 32),
            "timestep": torch.tensor([0.5], dtype=dtype),
            "img_ids": torch.zeros(16, 3),
            "txt_ids": torch.zeros(8, 3),
            "return_dict": False,
        }
    if kind == "sd3":
        return {
            "hidden_states": randn(1, 4, 8, 8),
            "encoder_hidden_states": randn(1, 8, 32),
            "pooled_projections": randn(1, 64),
            "timestep": torch.tensor([10]),
            "return_dict": False,
        }
    if kind == "wan":
        return {
            "hidden_states": randn(1, 4, 2, 8, 8),
            "encoder_hidden_states": randn(1, 8, 16),
            "timestep": torch.tensor([10]),
            "return_dict": False,
        }
    if kind == "unet":
        return {
            "sample": randn(1, 4, 16, 16),
            "timestep": torch.tensor([10]),
            "encoder_hidden_states": randn(1, 8, 32),
            "return_dict": False,
        }
    if kind == "vae":
        return {"sample": randn(1, 3, 16, 16), "sample_posterior": False, "return_dict": False}
    raise ValueError(kind)


def clip_tokenizer(folder: Path) -> Any:
    """A CLIP tokenizer over single letters (vocab and merges written into ``folder``)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[f"{letter}</w>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!", model_max_length=16)


def save_flux_pipeline(work: Path) -> Path:
    """A tiny random Flux pipeline (transformer, CLIP and T5 encoders, VAE) saved with ``save_pretrained``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    clip = CLIPTextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    t5 = T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4, pad_token_id=2, eos_token_id=1
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    tokenizer = clip_tokenizer(work / "tokenizer")
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=CLIPTextModel(clip),
        tokenizer=tokenizer,
        text_encoder_2=T5EncoderModel(t5),
        tokenizer_2=tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(work / "pipeline")
    return work / "pipeline"


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
