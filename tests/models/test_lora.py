"""LoRA on VQ layers (vqdm.models.lora, vqdm.models.lora_keys) against an independent reference: the same file loaded by
diffusers + PEFT into the dense twin (every VQ layer decoded into an nn.Linear / nn.Conv2d) and
fused into its weights. Adapter files are made with PEFT on the tiny model, in the diffusers/PEFT
layout and converted to kohya-ss's, with alpha != rank so the alpha handling is exercised."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vqdm.kernels import conv_weight_from_matrix
from vqdm.models import VQConv2d, VQLinear, build_pipeline, quantize_layers, vq_modules
from vqdm.models.lora import LoraRuntime, load_lora, lora_files, parse_lora
from vqdm.models.lora_keys import LoraError
from vqdm.models.quantized_unet import set_submodule

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "conv_shortcut",
                "conv_in", "time_emb_proj", "linear_1"]  # conv_in, time_emb_proj, linear_1 stay dense
TE_TARGETS = ["q_proj", "v_proj", "fc1"]
# Unmerged VQ + LoRA vs dense decode + merged LoRA: A and B are held in fp16 here (fp32 in the
# reference) and the branch is summed in a different order, so latents agree to ~1e-4 relative.
REL_TOL = 2e-3


def make_peft_lora(pipe, seed: int, rank: int, alpha: float) -> tuple[dict, dict]:
    """A real PEFT LoRA on the U-Net and both text encoders, B made non-zero (PEFT starts it at 0)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = copy.deepcopy(pipe)
    torch.manual_seed(seed)
    layers, metas = {}, {}
    for comp, targets in (("unet", UNET_TARGETS), ("text_encoder", TE_TARGETS), ("text_encoder_2", TE_TARGETS)):
        model = getattr(pipe, comp)
        cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian")
        inject_adapter_in_model(cfg, model)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        layers[comp] = get_peft_model_state_dict(model)
        metas[comp] = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.to_dict().items()}
    return layers, metas


@pytest.fixture(scope="module")
def vq_pipe(simple_quantizer):
    pipe = build_pipeline("tiny-sdxl", seed=0)
    quantize_layers(pipe.unet, 2, simple_quantizer(2))
    return pipe


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """style.safetensors (diffusers layout) and style_kohya.safetensors (the same adapter, kohya-ss)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("loras")
    base = build_pipeline("tiny-sdxl", seed=0)
    layers, meta = make_peft_lora(base, seed=1, rank=4, alpha=8.0)
    StableDiffusionXLPipeline.save_lora_weights(
        out, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"], weight_name="style.safetensors",
        unet_lora_adapter_metadata=meta["unet"], text_encoder_lora_adapter_metadata=meta["text_encoder"],
        text_encoder_2_lora_adapter_metadata=meta["text_encoder_2"])
    full = {f"{c}.{k}": v for c, sd in layers.items() for k, v in sd.items()}
    kohya = convert_state_dict_to_kohya(full)
    kohya = {k: (torch.tensor(8.0) if k.endswith(".alpha") else v.contiguous()) for k, v in kohya.items()}
    save_file(kohya, out / "style_kohya.safetensors")
    other, _ = make_peft_lora(base, seed=2, rank=8, alpha=8.0)
    StableDiffusionXLPipeline.save_lora_weights(out, unet_lora_layers=other["unet"], weight_name="other.safetensors")
    return out


def dense_twin(pipe):
    """The pipeline with every VQ layer decoded into a plain nn.Linear / nn.Conv2d."""
    twin = copy.deepcopy(pipe)
    for name, m in vq_modules(twin.unet):
        w = m.dequantize_matrix().detach()
        if isinstance(m, VQConv2d):
            dense = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                              bias=m.bias is not None)
            w = conv_weight_from_matrix(w, m.in_channels, m.kernel_size)
        else:
            dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        with torch.no_grad():
            dense.weight.copy_(w)
            if m.bias is not None:
                dense.bias.copy_(m.bias)
        set_submodule(twin.unet, name, dense)
    return twin


def latents(pipe, seed: int = 3):
    with torch.inference_mode():
        return pipe(prompt=["a red cube", "a blue ball"], num_inference_steps=2, guidance_scale=5.0, height=64,
                    width=64, output_type="latent", generator=torch.Generator().manual_seed(seed)).images


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("file", ["style.safetensors", "style_kohya.safetensors"])
def test_unmerged_vq_lora_matches_dense_decode_with_merged_lora(vq_pipe, lora_dir, file):
    scale = 0.8
    twin = dense_twin(vq_pipe)
    # The reference always loads the diffusers-layout file: the kohya file holds the same adapter,
    # but diffusers' own kohya conversion mis-names the alphas of text-encoder layers (it would
    # fuse them at alpha = rank), so it cannot serve as the reference for that layout.
    twin.load_lora_weights(str(lora_dir / "style.safetensors"), adapter_name="style")
    twin.fuse_lora(lora_scale=scale, components=["unet", "text_encoder", "text_encoder_2"])
    twin.unload_lora_weights()
    want = latents(twin)

    rt = LoraRuntime(vq_pipe)
    adapter = load_lora(lora_dir / file, vq_pipe, name="style")
    rt.add(adapter)
    try:
        comps = {lay.component for lay in adapter.layers.values()}
        assert comps == {"unet", "text_encoder", "text_encoder_2"}
        adapted = {t: type(rt._modules[t]) for t in adapter.layers}
        assert VQLinear in adapted.values() and VQConv2d in adapted.values()
        assert nn.Conv2d in adapted.values() and nn.Linear in adapted.values()  # conv_in, time embedding, CLIP
        assert {round(lay.scale, 6) for lay in adapter.layers.values()} == {2.0}  # alpha 8 / rank 4
        base = latents(vq_pipe)
        with rt.activate([("style", scale)]):
            got = latents(vq_pipe)
        after = latents(vq_pipe)
    finally:
        rt.close()
    assert torch.equal(base, after)  # outside `activate` the hooks add nothing
    assert rel(base, want) > 50 * REL_TOL  # the adapter changes the result a lot...
    assert rel(got, want) < REL_TOL, rel(got, want)  # ...and exactly as the merged dense reference


def test_compressed_weights_untouched_and_adapters_add_linearly(vq_pipe, lora_dir):
    before = {n: (m.codes.clone(), m.codebooks.clone(), m.scales.clone()) for n, m in vq_modules(vq_pipe.unet)}
    rt = LoraRuntime(vq_pipe)
    style = load_lora(lora_dir / "style.safetensors", vq_pipe)
    other = load_lora(lora_dir / "other.safetensors", vq_pipe)
    rt.add(style)
    rt.add(other)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    ehs = torch.randn(2, 77, 64)
    cond = {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}
    # One VQLinear and one VQConv2d that both adapters adapt, each fed its own input.
    targets = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": torch.randn(2, 16, 64),
               "unet.down_blocks.1.resnets.0.conv1": torch.randn(2, 32, 8, 8)}
    mods = {tgt: vq_pipe.unet.get_submodule(tgt.removeprefix("unet.")) for tgt in targets}
    assert [type(m) for m in mods.values()] == [VQLinear, VQConv2d]
    assert all(tgt in style.layers and tgt in other.layers for tgt in targets)
    mixes = {"a": [("style", 0.5)], "b": [("other", -1.0)], "both": [("style", 0.5), ("other", -1.0)]}

    def unet() -> torch.Tensor:
        with torch.inference_mode():
            return vq_pipe.unet(x, t, ehs, added_cond_kwargs=cond).sample

    def layer_outputs() -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            return {tgt: mods[tgt](xin) for tgt, xin in targets.items()}

    try:
        base, base_layer = unet(), layer_outputs()
        full, layer = {}, {}
        for mix, choice in mixes.items():
            with rt.activate(choice):
                full[mix], layer[mix] = unet(), layer_outputs()
        with rt.activate([("style", 0.0)]):
            zero = unet()
    finally:
        rt.close()
    for n, m in vq_modules(vq_pipe.unet):
        assert all(torch.equal(x, y) for x, y in zip(before[n], (m.codes, m.codebooks, m.scales))), n
    assert torch.equal(zero, base)
    for target, xin in targets.items():
        d_a, d_b = layer["a"][target] - base_layer[target], layer["b"][target] - base_layer[target]
        d_both = layer["both"][target] - base_layer[target]
        # On one adapted layer the branches add: (A+B) - base == (A - base) + (B - base)...
        assert rel(d_both, d_a + d_b) < 1e-5, (target, rel(d_both, d_a + d_b))
        # ...and each is scale · ΔW applied to the input, ΔW = alpha/r · B·A from the file.
        conv = xin.dim() == 4
        for d, adapter, scale in ((d_a, style, 0.5), (d_b, other, -1.0)):
            dw = scale * adapter.layers[target].delta_weight()
            want = F.conv2d(xin, dw, padding=mods[target].padding) if conv else F.linear(xin, dw)
            assert rel(d, want) < 1e-3, (target, rel(d, want))
        assert d_a.norm() > 1e-2 * base_layer[target].norm() and d_b.norm() > 1e-2 * base_layer[target].norm()
    # The whole U-Net is nonlinear, so there "both" is not a + b - base; but each adapter matters in "both".
    assert rel(full["both"], full["a"]) > 1e-3 and rel(full["both"], full["b"]) > 1e-3
    numel = sum(lay.down.numel() + lay.up.numel() for a in rt.adapters.values() for lay in a.layers.values())
    assert rt.nbytes == 2 * numel  # A and B held in fp16


def test_folder_of_adapters_and_file_stems(lora_dir):
    assert [p.name for p in lora_files(lora_dir)] == ["other.safetensors", "style.safetensors",
                                                      "style_kohya.safetensors"]


def test_bad_lora_files_are_clear_errors(vq_pipe, lora_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    good = lora_dir / "style.safetensors"
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(LoraError, match="truncated or corrupt"):
        load_lora(truncated, vq_pipe)

    pickled = tmp_path / "adapter.safetensors"
    torch.save({"unet.conv_in.lora_A.weight": torch.zeros(4, 4, 3, 3)}, pickled)
    with pytest.raises(LoraError, match="pickled"):
        load_lora(pickled, vq_pipe)
    bin_file = tmp_path / "pytorch_lora_weights.bin"
    bin_file.write_bytes(b"whatever")
    with pytest.raises(LoraError, match="pickled"):
        load_lora(bin_file, vq_pipe)

    sd = load_file(good)
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
    wrong = dict(sd)
    wrong[key] = torch.zeros(4, 48)  # the layer reads 64 features
    save_file(wrong, tmp_path / "wrong_shape.safetensors")
    with pytest.raises(LoraError, match=r"attn1\.to_q.*\(4, 48\).*VQLinear 64->64"):
        load_lora(tmp_path / "wrong_shape.safetensors", vq_pipe)

    stray = dict(sd)
    stray["unet.down_blocks.9.attentions.0.proj_in.lora_A.weight"] = torch.zeros(4, 64)
    stray["unet.down_blocks.9.attentions.0.proj_in.lora_B.weight"] = torch.zeros(64, 4)
    save_file(stray, tmp_path / "stray.safetensors")
    with pytest.raises(LoraError, match=r"'unet.down_blocks.9.attentions.0.proj_in' matches no"):
        load_lora(tmp_path / "stray.safetensors", vq_pipe)

    half = {k: v for k, v in sd.items() if not k.endswith("to_q.lora_B.weight")}
    save_file(half, tmp_path / "half.safetensors")
    with pytest.raises(LoraError, match=r"to_q.*no up"):
        load_lora(tmp_path / "half.safetensors", vq_pipe)

    dora = {**sd, "unet.conv_in.lora_magnitude_vector": torch.ones(32)}
    save_file(dora, tmp_path / "dora.safetensors")
    with pytest.raises(LoraError, match="DoRA"):
        load_lora(tmp_path / "dora.safetensors", vq_pipe)

    with pytest.raises(LoraError, match="no such LoRA file"):
        load_lora(tmp_path / "missing.safetensors", vq_pipe)


def test_metadata_alpha_and_unknown_adapter(vq_pipe, lora_dir):
    from safetensors import safe_open

    with safe_open(str(lora_dir / "style.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.lora_alpha"] == 8.0 and meta["unet.r"] == 4
    rt = LoraRuntime(vq_pipe)
    rt.add(load_lora(lora_dir / "other.safetensors", vq_pipe))
    try:
        assert rt.adapters["other"].rank == 8
        assert {lay.scale for lay in rt.adapters["other"].layers.values()} == {1.0}
        with pytest.raises(LoraError, match="'nope' is not loaded"):
            with rt.activate([("nope", 1.0)]):
                pass
        with pytest.raises(LoraError, match="loaded twice"):
            rt.add(load_lora(lora_dir / "other.safetensors", vq_pipe))
    finally:
        rt.close()


def test_kohya_sgm_names_map_to_diffusers_layers(vq_pipe):
    """kohya-ss trains SDXL on the sgm U-Net: its keys say input_blocks_4_1 for down_blocks.1.attentions.0."""
    sgm_to_diffusers = {
        "input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks_2_0_in_layers_2": "down_blocks.0.resnets.1.conv1",
        "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
        "middle_block_1_proj_out": "mid_block.attentions.0.proj_out",
        "output_blocks_1_1_proj_in": "up_blocks.0.attentions.1.proj_in",
        "output_blocks_3_0_skip_connection": "up_blocks.1.resnets.0.conv_shortcut",
        "input_blocks_0_0": "conv_in",
    }
    unet = vq_pipe.unet
    torch.manual_seed(0)
    sd, want = {}, {}
    for sgm, name in sgm_to_diffusers.items():
        m = unet.get_submodule(name)
        if isinstance(m, (nn.Linear, VQLinear)):
            down, up = torch.randn(2, m.in_features), torch.randn(m.out_features, 2)
        else:
            down, up = torch.randn(2, m.in_channels, *m.kernel_size), torch.randn(m.out_channels, 2, 1, 1)
        sd[f"lora_unet_{sgm}.lora_down.weight"], sd[f"lora_unet_{sgm}.lora_up.weight"] = down, up
        sd[f"lora_unet_{sgm}.alpha"] = torch.tensor(1.0)
        want[f"unet.{name}"] = down
    adapter = parse_lora(sd, {}, vq_pipe, "sgm", dtype=torch.float32)
    assert set(adapter.layers) == set(want)
    for target, down in want.items():
        assert torch.equal(adapter.layers[target].down, down) and adapter.layers[target].scale == 0.5


def test_conv_shaped_lora_on_linear_layer_and_matrix_shaped_1x1_up():
    """SD 1.x-style files store proj_in LoRAs as 1x1 convs; SDXL's proj_in is a Linear layer."""
    import types

    from vqdm.models import build_unet

    pipe = types.SimpleNamespace(unet=build_unet("tiny-sdxl"))
    sd = {"unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": torch.randn(4, 64, 1, 1),
          "unet.down_blocks.1.attentions.0.proj_in.lora_B.weight": torch.randn(64, 4, 1, 1),
          "unet.conv_in.lora_A.weight": torch.randn(4, 4, 3, 3), "unet.conv_in.lora_B.weight": torch.randn(32, 4)}
    layers = parse_lora(sd, {}, pipe, "x").layers
    assert tuple(layers["unet.down_blocks.1.attentions.0.proj_in"].down.shape) == (4, 64)
    assert tuple(layers["unet.conv_in"].up.shape) == (32, 4, 1, 1)
