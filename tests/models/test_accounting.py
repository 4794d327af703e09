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
