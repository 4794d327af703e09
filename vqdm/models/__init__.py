"""Architectures, loaders, VQ layers and the artifact format."""
from vqdm.models.accounting import Plan, layer_bits, layer_bytes, plan_unet, resident_weight_bytes
from vqdm.models.builders import build_pipeline, build_unet, make_model
from vqdm.models.configs import PRESETS, Preset
from vqdm.models.layer_selection import SUBSETS, layer_dims, layers_in_subsets, parse_subsets, select_layers, subset_of
from vqdm.models.loading import (base_unet_sha256, detect_family, is_checkpoint_file, load_pipeline, read_model_index,
                                 read_unet_config)
from vqdm.models.single_file import SingleFileOptions, add_single_file_flags, single_file_options
from vqdm.models.quantized_unet import (
    quantize_layers,
    replace_with_vq,
    set_backend,
    vq_modules,
    weight_matrix,
)
from vqdm.models.vq_layers import VQ_MODULES, VQConv2d, VQLinear

__all__ = [
    "PRESETS", "Plan", "Preset", "SUBSETS", "SingleFileOptions", "add_single_file_flags",
    "base_unet_sha256", "is_checkpoint_file", "single_file_options", "VQConv2d", "VQLinear", "VQ_MODULES", "build_pipeline",
    "build_unet", "detect_family", "layer_bits", "layer_bytes", "layer_dims", "layers_in_subsets", "load_pipeline",
    "make_model", "parse_subsets", "plan_unet", "quantize_layers", "read_model_index", "read_unet_config",
    "replace_with_vq", "resident_weight_bytes", "select_layers", "set_backend", "subset_of", "vq_modules", "weight_matrix",
]
