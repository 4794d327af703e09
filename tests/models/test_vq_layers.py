import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vqdm.kernels import conv_weight_from_matrix, conv_weight_to_matrix, dequantize
from vqdm.models import VQConv2d, VQLinear, quantize_layers, select_layers, vq_modules, weight_matrix
from vqdm.models.quantized_unet import make_vq_module


def _random_format(n, d, k, g=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (n, d // g, k), generator=gen, dtype=torch.uint8)
    books = torch.randn(k, 256, g, generator=gen)
    scales = torch.rand(n, generator=gen) + 0.5
    return codes, books, scales


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_reference_decode_is_scaled_sum_of_codewords(k):
    codes, books, scales = _random_format(5, 24, k)
    w = dequantize(codes, books, scales)
    i, j = 3, 2
    expect = scales[i] * sum(books[m][codes[i, j, m].long()] for m in range(k))
    torch.testing.assert_close(w[i, 8 * j : 8 * j + 8], expect)


def test_vq_linear_matches_dense_linear_with_decoded_weight():
    layer = VQLinear(24, 5, num_codebooks=3)
    codes, books, scales = _random_format(5, 24, 3)
    layer.set_quantized(codes, books, scales)
    layer.bias.data = torch.randn(5)
    x = torch.randn(7, 24)
    torch.testing.assert_close(layer(x), F.linear(x, dequantize(codes, books, scales), layer.bias))


def test_conv_matrix_columns_are_kh_kw_cin_ordered():
    w = torch.randn(6, 16, 3, 3)
    m = conv_weight_to_matrix(w)
    kh, kw, c = 2, 1, 5
    assert torch.equal(m[:, (kh * 3 + kw) * 16 + c], w[:, c, kh, kw])
    assert torch.equal(conv_weight_from_matrix(m, 16, (3, 3)), w)
    # so one group of 8 columns is 8 input channels at one kernel tap
    assert torch.equal(m[:, 8:16], w[:, 8:16, 0, 0])


@pytest.mark.parametrize("stride,padding", [((1, 1), (1, 1)), ((2, 2), (1, 1)), ((1, 1), (0, 0))])
def test_vq_conv_matches_dense_conv_with_decoded_weight(stride, padding):
    dense = nn.Conv2d(16, 6, 3, stride=stride, padding=padding)
    vq = make_vq_module(dense, num_codebooks=2)
    assert isinstance(vq, VQConv2d) and vq.d == 9 * 16
    codes, books, scales = _random_format(6, 144, 2)
    vq.set_quantized(codes, books, scales)
    dense.weight.data = conv_weight_from_matrix(dequantize(codes, books, scales), 16, (3, 3))
    x = torch.randn(2, 16, 9, 11)
    torch.testing.assert_close(vq(x), dense(x), rtol=1e-5, atol=1e-5)


def test_set_quantized_rejects_wrong_shapes():
    layer = VQLinear(24, 5, num_codebooks=2)
    codes, books, scales = _random_format(5, 24, 3)
    with pytest.raises(ValueError, match="codes has shape"):
        layer.set_quantized(codes, books, scales)
    with pytest.raises(ValueError, match="must divide"):
        VQLinear(20, 5, num_codebooks=2)


def test_codebooks_and_scales_are_trainable_through_the_forward():
    layer = VQLinear(16, 4, num_codebooks=2)
    layer.set_quantized(*_random_format(4, 16, 2))
    layer.codebooks.requires_grad_(True)
    layer.scales.requires_grad_(True)
    layer(torch.randn(3, 16)).square().sum().backward()
    assert layer.codebooks.grad is not None and layer.codebooks.grad.abs().sum() > 0
    assert layer.scales.grad is not None and layer.codes.dtype == torch.uint8


def test_vq_pipeline_runs_end_to_end(tiny_pipeline, simple_quantizer):
    pipe = tiny_pipeline
    dense_unet_names = [n for n, _ in select_layers(pipe.unet)]
    originals = {n: weight_matrix(m).detach().clone() for n, m in select_layers(pipe.unet)}
    names = quantize_layers(pipe.unet, 2, simple_quantizer(2))
    assert names == dense_unet_names and len(vq_modules(pipe.unet)) == len(names)
    # the VQ weights approximate the dense ones (a simple 2-codebook assignment, not random codes)
    errs = [((m.dequantize_matrix() - originals[n]).norm() / originals[n].norm()).item() for n, m in vq_modules(pipe.unet)]
    assert max(errs) < 0.9
    image = pipe("a lighthouse at dusk", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images[0]
    assert image.shape == (128, 128, 3) and (image >= 0).all() and (image <= 1).all()
