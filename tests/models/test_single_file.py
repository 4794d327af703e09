"""Single-file checkpoints in the original SDXL layout: the round trip to and from a diffusers folder
is exact, the layout is the one diffusers' own converters read, and every kind vqdm does not read
is refused with one line naming it."""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from vqdm.errors import ModelFolderError
from vqdm.models import (SingleFileOptions, detect_family, is_checkpoint_file, load_pipeline, make_model, read_model_index,
                         read_unet_config)
from vqdm.models.artifact_file import MANIFEST_KEY
from vqdm.models.builders import make_single_file
from vqdm.models.configs import PRESETS
from vqdm.models.single_file import describe, write_single_file

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")


def assert_same_weights(a, b, dtype=None):
    for name in COMPONENTS:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            want = sa[k] if dtype is None or not sa[k].is_floating_point() else sa[k].to(dtype)
            assert sb[k].dtype == want.dtype and torch.equal(sb[k], want), f"{name}.{k}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_model("tiny-sdxl", tmp_path_factory.mktemp("sf") / "tiny-sdxl", seed=0)


@pytest.fixture(scope="module")
def dense(folder):
    return load_pipeline(folder)


@pytest.fixture(scope="module")
def fp32_file(dense, tmp_path_factory):
    return write_single_file(dense, tmp_path_factory.mktemp("sf") / "tiny.safetensors", dtype=torch.float32,
                             family="sdxl")


def test_fp32_file_loads_equal_to_its_folder(dense, fp32_file, folder):
    pipe = load_pipeline(fp32_file)
    assert_same_weights(dense, pipe)
    assert type(pipe.scheduler) is type(dense.scheduler)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(pipe.scheduler.config) == public(dense.scheduler.config)
    assert pipe.tokenizer("a red fox").input_ids == dense.tokenizer("a red fox").input_ids
    assert pipe.tokenizer_2.pad_token == dense.tokenizer_2.pad_token
    assert public(pipe.unet.config) == public(dense.unet.config)
    folder_cfg = read_unet_config(folder)
    assert {k: folder_cfg[k] for k in read_unet_config(fp32_file)} == read_unet_config(fp32_file)
    assert read_model_index(fp32_file)["preset"] == "tiny-sdxl"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_files_equal_the_folder_in_that_dtype(dense, folder, tmp_path, dtype):
    path = write_single_file(dense, tmp_path / "half.safetensors", dtype=dtype)
    assert describe(path).dtype == {torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]
    assert_same_weights(dense, load_pipeline(path, dtype=dtype), dtype=dtype)


def test_make_single_file_matches_make_model(folder, tmp_path, dense):
    path = make_single_file("tiny-sdxl", tmp_path / "made.safetensors", seed=0, dtype=torch.float32)
    assert_same_weights(dense, load_pipeline(path))


def test_layout_is_the_one_diffusers_converters_read(dense, fp32_file):
    # An independent reader of the original layout: diffusers' single-file conversion functions.
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)

    sd = load_file(str(fp32_file))
    theirs = {"unet": convert_ldm_unet_checkpoint(sd, dict(dense.unet.config)),
              "vae": convert_ldm_vae_checkpoint(sd, dict(dense.vae.config)),
              "text_encoder_2": convert_open_clip_checkpoint(dense.text_encoder_2, sd,
                                                             prefix="conditioner.embedders.1.model.")}
    for name, converted in theirs.items():
        ours = getattr(dense, name).state_dict()
        assert converted.keys() == ours.keys(), name
        for k, t in ours.items():  # diffusers' VAE converter keeps the 1x1-conv attention shape
            assert torch.equal(converted[k].reshape(t.shape), t), f"{name}.{k}"
    # CLIP-L: HF names under the prefix, with the "text_model." level real files have (and stable-diffusion.cpp
    # needs) though transformers 5's CLIPTextModel no longer has it
    clip_l = convert_ldm_clip_checkpoint({k: t for k, t in sd.items() if k.startswith("conditioner.embedders.0.")})
    assert all(k.startswith("text_model.") for k in clip_l)
    ours = dense.text_encoder.state_dict()
    assert {k.removeprefix("text_model.") for k in clip_l} == {k.removeprefix("text_model.") for k in ours}
    assert all(torch.equal(clip_l["text_model." + k.removeprefix("text_model.")], t) for k, t in ours.items())


def test_family_from_flag_then_metadata_then_default(dense, tmp_path, caplog):
    turbo = write_single_file(dense, tmp_path / "turbo.safetensors", family="sdxl-turbo")
    bare = write_single_file(dense, tmp_path / "bare.safetensors", metadata=False)
    spec = tmp_path / "spec.safetensors"
    sd = load_file(str(bare))
    save_file(sd, str(spec), metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base",
                                       "modelspec.title": "My SDXL Turbo merge"})
    with caplog.at_level(logging.INFO, logger="vqdm.models.loading"):
        assert detect_family(turbo) == "sdxl-turbo"
    assert "family sdxl-turbo (from the file's vqdm.family metadata)" in caplog.text
    assert describe(spec).family == "sdxl-turbo" and "modelspec.title" in describe(spec).family_source
    info = describe(bare)
    assert info.family == "sdxl" and "--family sdxl-turbo" in info.family_source
    assert detect_family(bare, SingleFileOptions(family="sdxl-turbo")) == "sdxl-turbo"
    assert detect_family(turbo, SingleFileOptions(family="sdxl")) == "sdxl"
    preset = SingleFileOptions(fallback_family="sdxl-turbo", fallback_source="from --preset")  # quantize, distill
    assert (describe(bare, preset).family, describe(bare, preset).family_source) == (
        "sdxl-turbo", "from --preset: neither --family nor the file's metadata say")
    assert describe(turbo, SingleFileOptions(fallback_family="sdxl")).family == "sdxl-turbo"
    pipe = load_pipeline(turbo)
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert pipe.scheduler.config.timestep_spacing == "trailing"


def test_config_names_the_architecture(fp32_file):
    assert describe(fp32_file, SingleFileOptions(config="tiny-sdxl")).preset == "tiny-sdxl"
    with pytest.raises(ModelFolderError, match=r"match no packaged architecture \(sdxl: U-Net width 32, expected 320\)"):
        describe(fp32_file, SingleFileOptions(config="sdxl"))
    with pytest.raises(ModelFolderError, match=r"tiny-sdxl-digits: 28 unexpected tensor\(s\), e.g. first_stage_model.decoder.up.3."):
        describe(fp32_file, SingleFileOptions(config="tiny-sdxl-digits"))
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        SingleFileOptions(config="huge")


def test_no_baked_vae_needs_vae_file_or_folder(dense, folder, fp32_file, tmp_path):
    path = write_single_file(dense, tmp_path / "novae.safetensors", dtype=torch.float32, include_vae=False)
    with pytest.raises(ModelFolderError, match=r"novae.safetensors: no VAE baked in .*--vae FILE_OR_FOLDER"):
        load_pipeline(path)
    vae_only = tmp_path / "vae-original.safetensors"  # the original layout without a prefix, as sdxl_vae.safetensors
    save_file({k[len("first_stage_model."):]: t for k, t in load_file(str(fp32_file)).items()
               if k.startswith("first_stage_model.")}, str(vae_only))
    for vae in (folder, folder / "vae" / "diffusion_pytorch_model.safetensors", vae_only, fp32_file):
        assert_same_weights(dense, load_pipeline(path, single_file=SingleFileOptions(vae=str(vae))))


def test_ema_and_extra_tensors_are_ignored(dense, fp32_file, tmp_path, caplog):
    sd = load_file(str(fp32_file))
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.diffusion_modelconv_in_weight"] = torch.zeros(2, 2)
    sd["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6)
    sd["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    path = tmp_path / "ema.safetensors"
    save_file(sd, str(path))
    with caplog.at_level(logging.INFO, logger="vqdm.models.single_file"):
        pipe = load_pipeline(path)
    assert "ignoring 2 EMA tensors (model_ema.*)" in caplog.text
    assert_same_weights(dense, pipe)


def _unet_sig(in_channels=4, context=2048, label=True, width=320):
    p = "model.diffusion_model."
    sd = {p + "input_blocks.0.0.weight": torch.zeros(width, in_channels, 3, 3),
          p + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, context)}
    if label:
        sd[p + "label_emb.0.0.weight"] = torch.zeros(4, 4)
    return sd


SDXL_TEXT = {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(4),
             "conditioner.embedders.1.model.ln_final.weight": torch.zeros(4)}
# The key signatures of each refused kind (zeros: only the names and the shapes read are real).
REFUSED = {
    "sd1": ({**_unet_sig(context=768, label=False), "cond_stage_model.transformer.text_model.x": torch.zeros(1)},
            r"an SD 1.x checkpoint \(no SDXL conditioner / size embedding, cross-attention width 768\)"),
    "sd2": ({**_unet_sig(context=1024, label=False), "cond_stage_model.model.ln_final.weight": torch.zeros(1)},
            r"an SD 2.x checkpoint .*cross-attention width 1024"),
    "refiner": ({**_unet_sig(width=384), "conditioner.embedders.0.model.ln_final.weight": torch.zeros(4)},
                r"an SDXL refiner checkpoint \(one text encoder, OpenCLIP bigG .*U-Net width 384\)"),
    "inpaint": ({**_unet_sig(in_channels=9), **SDXL_TEXT}, r"an inpainting U-Net \(9 input channels\)"),
    "unet-only": (_unet_sig(), r"no text encoder weights under conditioner.embedders.0.transformer.\*"),
    "lora": ({"lora_unet_down_blocks_0.lora_up.weight": torch.zeros(2, 2)}, r"a LoRA, not a model"),
    "diffusers-unet": ({"conv_in.weight": torch.zeros(2, 4, 3, 3)}, r"a diffusers-layout U-Net"),
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_unsupported_kinds_are_refused_naming_what_was_found(kind, tmp_path):
    tensors, message = REFUSED[kind]
    path = tmp_path / f"{kind}.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ModelFolderError, match=message):
        read_model_index(path)


def test_pickles_are_refused_unread(tmp_path):
    zipped = tmp_path / "model.safetensors"
    zipped.write_bytes(b"PK\x03\x04" + b"\0" * 64)  # torch.save's zip signature: never unpickled
    legacy = tmp_path / "legacy.safetensors"
    legacy.write_bytes(b"\x80\x02" + b"\0" * 64)
    named = tmp_path / "model.ckpt"
    named.write_bytes(b"anything")
    for path in (zipped, legacy, named):
        with pytest.raises(ModelFolderError, match=r"a pickle checkpoint \(.ckpt/.pt\), which vqdm never loads"):
            load_pipeline(path)


def test_truncated_and_corrupt_files_are_refused(fp32_file, tmp_path):
    data = fp32_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFolderError, match=rf"cut.safetensors: truncated: its header declares {len(data):,} bytes"):
        load_pipeline(cut)
    header_cut = tmp_path / "header.safetensors"
    header_cut.write_bytes(data[:100])
    with pytest.raises(ModelFolderError, match=r"not a safetensors file, or truncated \(header of"):
        read_model_index(header_cut)
    garbled = tmp_path / "garbled.safetensors"
    n = int.from_bytes(data[:8], "little")
    garbled.write_bytes(data[:8] + b"{" * n + data[8 + n:])
    with pytest.raises(ModelFolderError, match="corrupt safetensors header"):
        read_model_index(garbled)
    tiny = tmp_path / "empty.safetensors"
    tiny.write_bytes(b"\x01\x00")
    with pytest.raises(ModelFolderError, match=r"truncated or not a safetensors file \(2 bytes\)"):
        read_model_index(tiny)


def test_a_vqdm_artifact_file_is_not_read_as_a_dense_checkpoint(tmp_path):
    path = tmp_path / "artifact.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={MANIFEST_KEY: "{}"})
    with pytest.raises(ModelFolderError, match="a compressed vqdm artifact, not a dense checkpoint"):
        describe(path)
    assert not is_checkpoint_file(path)  # left to the artifact loader, whichever branch of loading.py runs first


def test_full_size_layout_matches_sdxl_key_names():
    # The real SDXL base file's names for a few tensors of each kind (sd_xl_base_1.0.safetensors).
    from vqdm.models.single_file import _preset_layout

    _, shapes = _preset_layout("sdxl")
    assert shapes["model.diffusion_model.input_blocks.0.0.weight"] == (320, 4, 3, 3)
    assert shapes["model.diffusion_model.output_blocks.2.2.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes["model.diffusion_model.output_blocks.5.2.conv.weight"] == (640, 640, 3, 3)
    assert shapes["model.diffusion_model.middle_block.1.transformer_blocks.9.attn2.to_k.weight"] == (1280, 2048)
    assert shapes["model.diffusion_model.label_emb.0.0.weight"] == (1280, 2816)
    assert shapes["conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight"] == (768, 3072)
    assert shapes["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"] == (49408, 768)
    assert shapes["conditioner.embedders.0.transformer.text_model.final_layer_norm.bias"] == (768,)
    assert shapes["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert shapes["conditioner.embedders.1.model.text_projection"] == (1280, 1280)
    assert shapes["first_stage_model.decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert shapes["first_stage_model.encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    counts = {p: sum(k.startswith(p) for k in shapes) for p in
              ("model.diffusion_model.", "conditioner.embedders.0.", "conditioner.embedders.1.", "first_stage_model.")}
    assert list(counts.values()) == [1680, 196, 389, 248]  # bigG: q, k, v fused into in_proj (32 x 12 + 5)
    assert set(PRESETS["sdxl"].unet) == set(PRESETS["sdxl-turbo"].unet)


def test_make_model_single_file_flags_need_single_file(tmp_path, capsys):
    from vqdm.cli import main

    assert main(["make-model", "tiny-sdxl", "--out", str(tmp_path / "m"), "--dtype", "bf16"]) == 1
    assert "--dtype, --no-vae and --no-metadata apply to --single-file" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_a_vq_pipeline_is_not_written_as_a_dense_checkpoint(tiny_pipeline, simple_quantizer, tmp_path):
    from vqdm.models import quantize_layers

    quantize_layers(tiny_pipeline.unet, 2, simple_quantizer(2), names=["mid_block.attentions.0.proj_in"])
    with pytest.raises(ValueError, match="holds VQ layers; a dense checkpoint holds dense weights"):
        write_single_file(tiny_pipeline, tmp_path / "vq.safetensors")
    assert not list(tmp_path.iterdir())


def test_a_unet_given_in_place_of_the_files_is_used_and_must_match_it(dense, fp32_file):
    from vqdm.models import build_unet, replace_with_vq, vq_modules
    from vqdm.models.single_file import load_single_file

    vq = build_unet("tiny-sdxl")
    replace_with_vq(vq, num_codebooks=2)
    pipe = load_single_file(fp32_file, unet=vq)
    assert pipe.unet is vq and vq_modules(pipe.unet)
    for name in ("text_encoder", "text_encoder_2", "vae"):  # the file's, as a plain load reads them
        a, b = getattr(dense, name).state_dict(), getattr(pipe, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    other = build_unet("tiny-sdxl-digits")  # same blocks, another sample size
    with pytest.raises(ModelFolderError, match="another architecture.*sample_size"):
        load_single_file(fp32_file, unet=other)
