"""The one format module: supported values, bits/bytes per layer, and the one decode everything uses."""
import pytest
import torch

from vqdm.errors import ConfigError
from vqdm.kernels import dequantize
from vqdm.models import layer_bits, layer_bytes
from vqdm.quantizer import AQConfig
from vqdm.vq_format import CODE_DTYPE, VQFormat, decode, decode_groups


def test_bits_and_bytes_by_the_spec_formula_everywhere():
    fmt = VQFormat(4)
    assert fmt.bits_per_weight(1280, 1280) == pytest.approx(4 + 4 * 256 * 8 * 16 / 1280**2 + 16 / 1280)
    assert fmt.layer_bytes(1280, 1280) == 1280 * 160 * 4 + 4 * 256 * 8 * 2 + 2 * 1280
    # the callers that used to carry their own copy now agree with it exactly
    assert layer_bits(1280, 11520, 3) == VQFormat(3).bits_per_weight(1280, 11520) \
        == AQConfig(num_codebooks=3).vq_format.bits_per_weight(1280, 11520)
    assert layer_bytes(640, 5760, 2) == VQFormat(2).layer_bytes(640, 5760)


def test_bits_formula_matches_spec_table():
    # SPEC §2 table: 4.05 / 3.04 / 2.03 bits on SDXL's quantized layers; a 1280x1280 layer is close to it
    assert VQFormat(4).bits_per_weight(1280, 1280) == pytest.approx(4 + 4 * 256 * 8 * 16 / 1280**2 + 16 / 1280)
    assert VQFormat(3).bits_per_weight(1280, 11520) == pytest.approx(3.00806, abs=1e-5)  # 3 + 0.00667 + 0.00139


def test_empty_tensors_have_the_layout_and_the_shape_check_names_the_wrong_one():
    fmt = VQFormat(3)
    codes, books, scales = fmt.empty(4, 16, dtype=torch.float16)
    assert (codes.shape, codes.dtype) == ((4, 2, 3), CODE_DTYPE) and not codes.any()
    assert (books.shape, books.dtype) == ((3, 256, 8), torch.float16) and not books.any()
    assert (scales.shape, scales.dtype) == ((4,), torch.float16) and bool((scales == 1).all())
    assert fmt.shapes(4, 16) == {"codes": (4, 2, 3), "codebooks": (3, 256, 8), "scales": (4,)}
    fmt.check_shapes(4, 16, codes, books, scales)
    with pytest.raises(ValueError, match=r"codebooks has shape \(2, 256, 8\), this layer needs \(3, 256, 8\)"):
        fmt.check_shapes(4, 16, codes, books[:2], scales)
    with pytest.raises(ValueError, match="must divide the input dimension 12"):
        fmt.empty(4, 12)


@pytest.mark.parametrize("fields, flag", [((5, 8, 8), "--bits 5"), ((3, 4, 8), "B=4"), ((3, 8, 4), "g=4")])
def test_unsupported_formats_are_refused_with_the_supported_values(fields, flag):
    with pytest.raises(ConfigError, match=flag):
        VQFormat(*fields).check_artifact()
    VQFormat(3).check_artifact()


def test_decode_is_the_kernels_reference_and_scales_the_group_sums():
    assert dequantize is decode
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (6, 4, 3), generator=gen, dtype=torch.uint8)
    books = torch.randn(3, 256, 8, generator=gen)
    scales = torch.rand(6, generator=gen) + 0.5
    w = decode(codes, books, scales)
    assert w.shape == (6, 32)
    manual = sum(books[m][codes[:, :, m].long()] for m in range(3)).reshape(6, 32) * scales[:, None]
    torch.testing.assert_close(w, manual)
    torch.testing.assert_close(decode_groups(codes, books).reshape(6, 32) * scales[:, None], w)
    with pytest.raises(ValueError, match="scales must be"):
        decode(codes, books, scales[:5])
