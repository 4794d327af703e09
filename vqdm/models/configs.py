"""Named SDXL-architecture presets: full size (SDXL base / Turbo) and tiny test sizes.

Each preset holds diffusers configs for every pipeline component; the tiny ones keep the SDXL
block structure (DownBlock2D + 2 cross-attention down blocks, cross-attention mid block, mirrored
up blocks, two text encoders) at widths that run a 4-step sampling in well under a second on CPU;
the micro ones (benchmarks/run_gpu.sh's dry run) only the fewest blocks, for fast tracing.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

SDXL_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": True,
}

SDXL_TEXT_ENCODER: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "projection_dim": 768, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
}
SDXL_TEXT_ENCODER_2: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu",
    "projection_dim": 1280, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
}
SDXL_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True,
}
_SCHEDULER_COMMON: dict[str, Any] = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1,
    "interpolation_type": "linear", "use_karras_sigmas": False,
}
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", **_SCHEDULER_COMMON, "timestep_spacing": "leading"}
TURBO_SCHEDULER = {"_class_name": "EulerAncestralDiscreteScheduler", **_SCHEDULER_COMMON, "timestep_spacing": "trailing"}

_TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "projection_dim": 32}
_TINY_TIME_DIM = 8
TINY_UNET: dict[str, Any] = {
    **SDXL_UNET,
    "block_out_channels": [32, 64, 64],
    "attention_head_dim": [2, 4, 4],
    "transformer_layers_per_block": [1, 1, 1],
    "norm_num_groups": 8,
    "cross_attention_dim": 2 * _TINY_TEXT["hidden_size"],
    "addition_time_embed_dim": _TINY_TIME_DIM,
    "projection_class_embeddings_input_dim": 6 * _TINY_TIME_DIM + _TINY_TEXT["projection_dim"],
    "sample_size": 16,
}
# The dry run of benchmarks/run_gpu.sh (and its test): the fewest blocks the SDXL U-Net class takes
# with both block kinds (one plain, one cross-attention, each one layer deep; the cross-attention mid
# block), so that tracing it whole with torch.compile takes seconds, not the tens of seconds
# tiny-sdxl's U-Net does on a loaded 2-core machine. Width 16: a single-file checkpoint of a tiny
# model is never laid out against it.
MICRO_UNET: dict[str, Any] = {
    **TINY_UNET,
    "block_out_channels": [16, 32],
    "attention_head_dim": [2, 4],
    "transformer_layers_per_block": [1, 1],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "sample_size": 8,
}
TINY_VAE: dict[str, Any] = {**SDXL_VAE, "block_out_channels": [8, 16, 16, 16], "norm_num_groups": 8,
                            "layers_per_block": 1, "sample_size": 128}

# The trained digits model (benchmarks/train_tiny.py, shipped in vqdm/models/pretrained/): tiny-sdxl's
# U-Net, its VAE one stage shorter (factor 4), 32² images and 8×8 latents (which hold an 8×8 digit
# exactly; 32² keeps VAE training cheap on a 2-core CPU) and text encoders over CLIP's
# BPE cut to its first 4,096 merges. Any text still tokenizes (down to single bytes, never <unk>),
# but the token table is 4,610 rows instead of 49,408: with the full table the two 32-wide
# encoders alone would be 6.4 MB and the tokenizer files 7.3 MB, over the 10 MB the repo carries.
DIGITS_BPE_MERGES = 4096
_DIGITS_VOCAB = 512 + DIGITS_BPE_MERGES + 2  # bytes, bytes + </w>, merges, <|startoftext|>, <|endoftext|>
# initializer_factor 3: the frozen random encoders are never trained, and at CLIP's default init
# scale the digit is ~4% of their token outputs' spread and the U-Net learned to ignore them; at 3×
# it is ~10% and conditioning is learned (10× made training unstable).
_DIGITS_TEXT = {**_TINY_TEXT, "vocab_size": _DIGITS_VOCAB, "bos_token_id": _DIGITS_VOCAB - 2,
                "eos_token_id": _DIGITS_VOCAB - 1, "initializer_factor": 3.0}


@dataclass
class Preset:
    """Every config a pipeline needs, plus the sampling defaults of that model family."""

    name: str
    family: str  # "sdxl" or "sdxl-turbo": decides CFG, scheduler and default steps
    unet: dict[str, Any]
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any]
    steps: int
    guidance: float
    resolution: int
    bpe_merges: int | None = None  # CLIP BPE merges the tokenizers keep; None: all of them (SDXL's vocabulary)
    vae_scale_factor: int = field(init=False)

    def __post_init__(self) -> None:
        self.vae_scale_factor = 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def uses_cfg(self) -> bool:
        return self.guidance > 1.0

    @classmethod
    def from_name(cls, name: str) -> "Preset":
        try:
            return copy.deepcopy(PRESETS[name])
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


PRESETS: dict[str, Preset] = {
    "sdxl": Preset("sdxl", "sdxl", SDXL_UNET, SDXL_TEXT_ENCODER, SDXL_TEXT_ENCODER_2, SDXL_VAE,
                   SDXL_SCHEDULER, steps=30, guidance=5.0, resolution=1024),
    "sdxl-turbo": Preset("sdxl-turbo", "sdxl-turbo", {**SDXL_UNET, "sample_size": 64}, SDXL_TEXT_ENCODER,
                         SDXL_TEXT_ENCODER_2, {**SDXL_VAE, "sample_size": 512}, TURBO_SCHEDULER,
                         steps=4, guidance=0.0, resolution=512),
    "tiny-sdxl": Preset("tiny-sdxl", "sdxl", TINY_UNET, {**SDXL_TEXT_ENCODER, **_TINY_TEXT},
                        {**SDXL_TEXT_ENCODER_2, **_TINY_TEXT}, TINY_VAE, SDXL_SCHEDULER,
                        steps=4, guidance=5.0, resolution=128),
    "tiny-sdxl-turbo": Preset("tiny-sdxl-turbo", "sdxl-turbo", TINY_UNET, {**SDXL_TEXT_ENCODER, **_TINY_TEXT},
                              {**SDXL_TEXT_ENCODER_2, **_TINY_TEXT}, TINY_VAE, TURBO_SCHEDULER,
                              steps=2, guidance=0.0, resolution=128),
    "micro-sdxl": Preset("micro-sdxl", "sdxl", MICRO_UNET, {**SDXL_TEXT_ENCODER, **_TINY_TEXT},
                         {**SDXL_TEXT_ENCODER_2, **_TINY_TEXT}, TINY_VAE, SDXL_SCHEDULER,
                         steps=2, guidance=5.0, resolution=64),
    "micro-sdxl-turbo": Preset("micro-sdxl-turbo", "sdxl-turbo", MICRO_UNET, {**SDXL_TEXT_ENCODER, **_TINY_TEXT},
                               {**SDXL_TEXT_ENCODER_2, **_TINY_TEXT}, TINY_VAE, TURBO_SCHEDULER,
                               steps=1, guidance=0.0, resolution=64),
    "tiny-sdxl-digits": Preset("tiny-sdxl-digits", "sdxl", {**TINY_UNET, "sample_size": 8},
                               {**SDXL_TEXT_ENCODER, **_DIGITS_TEXT}, {**SDXL_TEXT_ENCODER_2, **_DIGITS_TEXT},
                               {**TINY_VAE, "block_out_channels": [8, 16, 16], "down_block_types": ["DownEncoderBlock2D"] * 3,
                                "up_block_types": ["UpDecoderBlock2D"] * 3, "sample_size": 32},
                               SDXL_SCHEDULER, steps=20, guidance=4.0, resolution=32, bpe_merges=DIGITS_BPE_MERGES),
}
