"""compile_unet: the U-Net's forward under torch.compile (inductor, mode default) gives eager's
output within fp tolerance, runs no module hooks, and leaves the eager module as it was.

A small SDXL-shaped U-Net (one level of one layer, cross-attention, the text-time embedding):
inductor generates and compiles C++ for every graph, minutes for the tiny preset's on a loaded
2-core machine, and the block count, not the tensor sizes, is what that time grows with."""
from __future__ import annotations

import pytest
import torch

from vqdm.models.compile import compile_unet, is_recompile_refused
from vqdm.models.configs import TINY_UNET


@pytest.fixture(scope="module")
def small_unet():
    from diffusers import UNet2DConditionModel

    cfg = {**TINY_UNET, "block_out_channels": [16], "attention_head_dim": [2], "transformer_layers_per_block": [1],
           "down_block_types": ["CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D"],
           "layers_per_block": 1, "sample_size": 8}
    torch.manual_seed(0)
    return UNet2DConditionModel(**{k: v for k, v in cfg.items() if not k.startswith("_")}).eval()


def inputs(unet, rows: int):
    g = torch.Generator().manual_seed(rows)
    text_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    return (torch.randn(rows, 4, 8, 8, generator=g), torch.tensor(500.0),
            torch.randn(rows, 77, unet.config.cross_attention_dim, generator=g),
            {"text_embeds": torch.randn(rows, text_dim, generator=g), "time_ids": torch.randn(rows, 6, generator=g)})


def test_inductor_default_equals_eager_and_skips_module_hooks(small_unet):
    calls = []
    hook = small_unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        compiled = compile_unet(small_unet, "default")
        with torch.inference_mode():
            sample, t, ehs, added = inputs(small_unet, 2)
            want = small_unet(sample, t, ehs, added_cond_kwargs=added, return_dict=False)[0]
            got = compiled(sample, t, ehs, added_cond_kwargs=added, return_dict=False)[0]
            # Another shape under the fail_on_recompile stance: refused, and recognised as such.
            with torch.compiler.set_stance("fail_on_recompile"), pytest.raises(RuntimeError) as refused:
                compiled(*inputs(small_unet, 3)[:3], added_cond_kwargs=inputs(small_unet, 3)[3], return_dict=False)
    finally:
        hook.remove()
    assert calls == [1]  # the eager call ran the hook; the compiled one did not
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert is_recompile_refused(refused.value)
    assert "forward" not in small_unet.__dict__  # the module itself is untouched


def test_unknown_mode_is_refused(small_unet):
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        compile_unet(small_unet, "fast")
