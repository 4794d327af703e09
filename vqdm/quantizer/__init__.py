"""Per-layer quantizers (AQ, RTN, GPTQ), their error measure, and the `vqdm quantize` pipeline.

    from vqdm.quantizer import AQConfig, quantize_weight, rtn_quantize, gptq_quantize
    qw = quantize_weight(W, H, AQConfig(num_codebooks=3, nbits=8, group_size=8, beam_size=8))

The quantize pipeline, distillation and evaluation live in their own modules
(`vqdm.quantizer.quantize`, `.distill`, `.evaluate` packages) and are imported on use.
"""
from vqdm.quantizer.layer.aq import AQConfig, AQConfigError, QuantizedWeight, quantize_weight
from vqdm.quantizer.layer.error import layer_loss, rel_err, relative_error
from vqdm.quantizer.layer.scalar import gptq_quantize, rtn_quantize, scalar_bits_per_weight

__all__ = [
    "AQConfig", "AQConfigError", "QuantizedWeight", "gptq_quantize", "layer_loss",
    "quantize_weight", "rel_err", "relative_error", "rtn_quantize", "scalar_bits_per_weight",
]
