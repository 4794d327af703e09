"""compile_unet: the U-Net's forward under torch.compile, whole (fullgraph) and for static shapes:
eager's output, no module hooks run, a new shape refused under the fail_on_recompile stance that
compiled serving relies on, and the eager module left as it was.

aot_eager traces what inductor would compile without generating code (inductor's C++ compile takes
minutes on the 2-core CI box); tests/models/test_compile.py runs inductor once on a VQ block. The
U-Net is small and SDXL-shaped: one level of one layer, cross-attention, the text-time embedding.
"""
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


def test_compiled_forward_equals_eager_skips_module_hooks_and_refuses_new_shapes(small_unet):
    calls = []
    hook = small_unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        compiled = compile_unet(small_unet, "default", backend="aot_eager")
        with torch.inference_mode():
            sample, t, ehs, added = inputs(small_unet, 2)
            want = small_unet(sample, t, ehs, added_cond_kwargs=added, return_dict=False)[0]
            got = compiled(sample, t, ehs, added_cond_kwargs=added, return_dict=False)[0]
            # Another shape under the fail_on_recompile stance: refused, and recognised as such.
            *other, other_added = inputs(small_unet, 3)
            with torch.compiler.set_stance("fail_on_recompile"), pytest.raises(RuntimeError) as refused:
                compiled(*other, added_cond_kwargs=other_added, return_dict=False)
    finally:
        hook.remove()
    assert calls == [1]  # the eager call ran the hook; the compiled one did not
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert is_recompile_refused(refused.value)
    assert "forward" not in small_unet.__dict__  # the module itself is untouched


def test_unknown_mode_is_refused(small_unet):
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        compile_unet(small_unet, "fast")
