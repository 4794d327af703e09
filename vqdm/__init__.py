"""vqdm: additive vector quantization for SDXL / SDXL-Turbo U-Nets.

Subpackages: ``vqdm.quantizer`` (offline compression), ``vqdm.kernels`` (decode-and-multiply),
``vqdm.models`` (architectures, VQ layers, artifacts), ``vqdm.server`` (HTTP service).
Nothing heavy is imported here.
"""
from vqdm.errors import ArtifactError, VQDMError

__version__ = "0.1.0"
__all__ = ["ArtifactError", "VQDMError", "__version__"]
