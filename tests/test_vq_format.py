"""The one format module: supported values, bits/bytes per layer, and the one decode everything uses."""
import pytest
import torch

from vqdm.errors import ConfigError
from vqdm.kernels import dequantize
from vqdm.models import layer_bits, layer_bytes
from vqdm.quantizer import aq_bits_per_weight
from vqdm.vq_format import VQFormat, decode, decode_groups


def test_bits_and_bytes_by_the_spec_formula_everywhere():
    fmt = VQFormat(4)
    assert fmt.bits_per_weight(1280, 1280) == pytest.approx(4 + 4 * 256 * 8 * 16 / 1280**2 + 16 / 1280)
    assert fmt.layer_bytes(1280, 1280) == 1280 * 160 * 4 + 4 * 256 * 8 * 2 + 2 * 1280
    # the callers that used to carry their own copy now agree with it exactly
    assert layer_bits(1280, 11520, 3) == VQFormat(3).bits_per_weight(1280, 11520) == aq_bits_per_weight(1280, 11520, 3)
    assert layer_bytes(640, 5760, 2) == VQFormat(2).layer_bytes(640, 5760)


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
