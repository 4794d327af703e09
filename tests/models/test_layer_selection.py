import torch.nn as nn

from vqdm.models import build_unet, layer_dims, select_layers, subset_of, SUBSETS


def test_sdxl_selects_771_layers_with_spec_weight_count():
    unet = build_unet("sdxl", device="meta")
    layers = select_layers(unet)
    assert len(layers) == 771
    assert sum(isinstance(m, nn.Linear) for _, m in layers) == 722
    assert sum(isinstance(m, nn.Conv2d) for _, m in layers) == 49
    assert sum(layer_dims(m)[0] * layer_dims(m)[1] for _, m in layers) == 2_540_953_600
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684


def test_sdxl_excludes_in_out_convs_embeddings_and_time_emb_proj():
    unet = build_unet("sdxl", device="meta")
    names = {n for n, _ in select_layers(unet)}
    for excluded in ("conv_in", "conv_out"):
        assert excluded not in names
    assert not any(n.startswith(("time_embedding", "add_embedding")) for n in names)
    tep = [n for n, _ in unet.named_modules() if n.endswith("time_emb_proj")]
    assert len(tep) == 17 and not names.intersection(tep)
    assert all(subset_of(n) in SUBSETS for n in names)
    # every selected layer has min(in, out) >= 16 and sits in one of the seven subsets
    assert {subset_of(n) for n in names} == set(SUBSETS)


def test_conv_dims_count_kernel_taps():
    unet = build_unet("sdxl", device="meta")
    conv = unet.get_submodule("mid_block.resnets.0.conv1")
    assert layer_dims(conv) == (1280, 9 * 1280)


def test_tiny_keeps_the_sdxl_block_structure():
    unet = build_unet("tiny-sdxl", device="meta")
    names = {n for n, _ in select_layers(unet)}
    assert {subset_of(n) for n in names} == set(SUBSETS)
    assert any("attn2.to_k" in n for n in names) and any(n.endswith("conv1") for n in names)
    assert any("downsamplers" in n for n in names) and any("upsamplers" in n for n in names)


def test_parse_subsets_orders_validates_and_names_the_valid_ones():
    import pytest

    from vqdm.errors import ConfigError
    from vqdm.models import parse_subsets

    assert parse_subsets(None) == SUBSETS
    assert parse_subsets("mid_block, down_blocks.0,mid_block") == ("down_blocks.0", "mid_block")
    assert parse_subsets(["up_blocks.2", "down_blocks.1"]) == ("down_blocks.1", "up_blocks.2")
    with pytest.raises(ConfigError, match=r"unknown subset\(s\) mid; the U-Net's subsets are down_blocks.0, "):
        parse_subsets("mid")
    with pytest.raises(ConfigError, match="no subset given"):
        parse_subsets(",")
