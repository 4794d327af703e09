import pytest

from vqdm.models import build_unet, layer_bits, plan_unet


@pytest.mark.parametrize("k,quantized,whole,gbytes", [(4, 4.05, 4.17, 1.34), (3, 3.04, 3.17, 1.02), (2, 2.03, 2.17, 0.70)])
def test_sdxl_bits_table_matches_spec(k, quantized, whole, gbytes):
    plan = plan_unet(build_unet("sdxl", device="meta"), num_codebooks=k)
    assert round(plan.bits_per_weight_quantized, 2) == quantized
    assert round(plan.bits_per_weight_unet, 2) == whole
    assert round(plan.unet_bytes / 1e9, 2) == gbytes
    assert round(plan.dense_fp16_bytes / 1e9, 2) == 5.13


def test_layer_bits_formula():
    # K*B/g + K*2^B*g*16/(n*d) + 16/d
    assert layer_bits(1280, 1280, 4) == pytest.approx(4 + 4 * 256 * 8 * 16 / 1280**2 + 16 / 1280)
    assert layer_bits(10, 16, 1) == pytest.approx(1 + 256 * 8 * 16 / 160 + 1)


def test_plan_of_some_subsets_counts_the_others_as_dense_fp16():
    from vqdm.models import SUBSETS, build_unet, layer_bytes, layer_dims, layers_in_subsets, plan_unet, select_layers

    unet = build_unet("sdxl", device="meta")
    full = plan_unet(unet, 3)
    part = plan_unet(unet, 3, subsets=["mid_block", "down_blocks.0"])
    assert part.subsets == ["down_blocks.0", "mid_block"] and full.subsets == list(SUBSETS)
    assert part.layers == 5 + 106 and part.unet_params == full.unet_params
    skipped = [m for _, m in layers_in_subsets(select_layers(unet), SUBSETS[1:3] + SUBSETS[4:])]
    extra = sum(2 * layer_dims(m)[0] * layer_dims(m)[1] - layer_bytes(*layer_dims(m), 3) for m in skipped)
    assert part.unet_bytes == full.unet_bytes + extra
