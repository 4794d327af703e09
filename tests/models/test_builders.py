import numpy as np
import pytest
import torch

from vqdm.models import Preset, build_pipeline
from vqdm.models.tokenizers import build_clip_tokenizer


def test_clip_tokenizer_offline_matches_clip_ids():
    tok = build_clip_tokenizer()
    ids = tok("a photo of an astronaut riding a horse").input_ids
    # CLIP ViT-L/14 ids: <start> a photo of an astronaut riding a horse <end>
    assert ids == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]
    assert len(tok) == 49408 and tok.model_max_length == 77


@pytest.mark.parametrize("preset", ["tiny-sdxl", "tiny-sdxl-turbo"])
def test_tiny_pipelines_generate_deterministically(preset):
    p = Preset.from_name(preset)
    pipe = build_pipeline(preset, seed=3)
    kwargs = dict(num_inference_steps=p.steps, guidance_scale=p.guidance, output_type="np")
    a = pipe("a red bicycle", generator=torch.Generator().manual_seed(1), **kwargs).images[0]
    b = build_pipeline(preset, seed=3)("a red bicycle", generator=torch.Generator().manual_seed(1), **kwargs).images[0]
    assert a.shape == (p.resolution, p.resolution, 3)
    np.testing.assert_array_equal(a, b)
    c = pipe("a red bicycle", generator=torch.Generator().manual_seed(2), **kwargs).images[0]
    assert np.abs(a - c).mean() > 1e-3


def test_turbo_preset_has_turbo_sampling_defaults():
    p = Preset.from_name("sdxl-turbo")
    assert (p.steps, p.guidance, p.resolution, p.uses_cfg) == (4, 0.0, 512, False)
    assert p.scheduler["timestep_spacing"] == "trailing"
    s = Preset.from_name("sdxl")
    assert (s.steps, s.guidance, s.resolution, s.uses_cfg) == (30, 5.0, 1024, True)
    with pytest.raises(ValueError, match="unknown preset"):
        Preset.from_name("sd15")
