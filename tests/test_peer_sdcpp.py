"""benchmarks/peer_sdcpp.py's pure parts: reading stable-diffusion.cpp's log and progress reports, and the
runs a selection makes (the benchmark itself needs full-size models and the bindings: not in `make test`)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("peer_sdcpp", Path(__file__).resolve().parents[1] / "benchmarks" / "peer_sdcpp.py")
peer = sys.modules["peer_sdcpp"] = importlib.util.module_from_spec(_spec)  # dataclasses look their module up
_spec.loader.exec_module(peer)

LOG = """stable-diffusion.cpp:305  - Version: SDXL 
stable-diffusion.cpp:333  - Weight type stat:                     f32: 6    |    q3_K: 1788 |     f16: 843  
stable-diffusion.cpp:334  - Conditioner weight type stat:         f32: 2    |    q3_K: 388  
stable-diffusion.cpp:335  - Diffusion model weight type stat:     f32: 4    |    q3_K: 1400 |     f16: 276  
stable-diffusion.cpp:336  - VAE weight type stat:                 f16: 567  
model.cpp:993  - loading tensors completed, taking 41.50s (process: 0.01s, read: 30.00s, memcpy: 0.00s, convert: 11.00s, copy_to_backend: 0.00s)
stable-diffusion.cpp:858  - total params memory size = 2000.50MB (VRAM 0.00MB, RAM 2000.50MB): text_encoders 500.25MB(RAM), diffusion_model 1400.00MB(RAM), vae 100.25MB(RAM), controlnet 0.00MB(VRAM), pmid 0.00MB(RAM)
stable-diffusion.cpp:3168 - get_learned_condition completed, taking 1.25s
stable-diffusion.cpp:3432 - sampling completed, taking 20.00s
stable-diffusion.cpp:3212 - decode_first_stage completed, taking 6.50s
stable-diffusion.cpp:3591 - generate_image completed in 28.00s
""".splitlines()


def test_sdcpp_log_gives_version_types_bytes_and_phases():
    got = peer.parse_sdcpp_log(LOG)
    assert got["model_version"] == "SDXL"
    assert got["tensor_types"] == {"f32": 6, "q3_K": 1788, "f16": 843} and got["tensor_count"] == 2637
    assert got["diffusion_model_types"] == {"f32": 4, "q3_K": 1400, "f16": 276} and got["vae_types"] == {"f16": 567}
    assert got["params_bytes"] == {"total": int(2000.5 * 2**20), "text_encoders": int(500.25 * 2**20),
                                   "diffusion_model": 1400 * 2**20, "vae": int(100.25 * 2**20)}
    assert got["phases_s"] == {"loading tensors": 41.5, "get_learned_condition": 1.25, "sampling": 20.0,
                               "decode_first_stage": 6.5, "generate_image": 28.0}


def test_progress_reports_become_per_step_seconds():
    # sd.cpp reports, after step k, the seconds per step averaged since sampling began
    assert peer.progress_step_seconds([[0, 3, 0.0], [1, 3, 10.0], [2, 3, 7.5], [3, 3, 7.0]]) == pytest.approx([10, 5, 6])
    assert peer.steady_step([10.0, 5.0, 6.0]) == pytest.approx(5.5) and peer.steady_step([10.0]) is None


def test_selection_makes_each_bit_count_meet_its_peers():
    runs = peer.plan_runs(["turbo-512"], [4, 2], with_f16=True)
    assert [(r["engine"], r["weights"]) for r in runs] == [
        ("sdcpp", "f16"), ("vqdm", "vq4 random codes, fp32"), ("sdcpp", "q4_K"), ("sdcpp", "q4_0"),
        ("vqdm", "vq2 random codes, fp32"), ("sdcpp", "q2_K")]
    runs = peer.plan_runs(["sdxl-1024"], [3], with_f16=False, dtypes=["fp32", "bf16"], peer_types=["q3_K", "q4_K"])
    assert [(r["engine"], r["weights"], r.get("dtype")) for r in runs] == [
        ("vqdm", "vq3 random codes, fp32", "fp32"), ("vqdm", "vq3 random codes, bf16", "bf16"), ("sdcpp", "q3_K", None)]
    # a 1-step cell first makes an extra 3-step image (its steady-state step; it warms both engines up too)
    assert peer.images_to_make(peer.CELLS["turbo-512"], 2, warmup=1) == [(3, 1), (1, 3)]
    assert peer.images_to_make(peer.CELLS["sdxl-1024"], 2, warmup=0) == [(4, 2)]
    assert peer.cfg_scale(0.0) == 1.0 and peer.cfg_scale(5.0) == 5.0


def test_summary_leaves_warmup_images_out_and_takes_the_step_from_the_longer_image():
    res = {"images": [{"steps": 3, "image_s": 60.0, "step_s": [15.0, 12.0, 14.0]},
                      {"steps": 1, "image_s": 40.0, "step_s": [16.0]},
                      {"steps": 1, "image_s": 34.0, "step_s": [13.5]}]}
    out = peer._summarise(res, peer.CELLS["turbo-512"], warmup=1)
    assert out["images"][1]["warmup"] and "warmup" not in out["images"][2]
    assert out["image_s"] == 34.0 and out["first_step_s"] == 13.5 and out["unet_step_s"] == pytest.approx(13.0)


BUFFERS = """ggml_extend.hpp:2580 - clip params backend buffer size =  107.87 MB(RAM) (196 tensors)
ggml_extend.hpp:2580 - clip params backend buffer size =  387.10 MB(RAM) (389 tensors)
ggml_extend.hpp:2580 - unet params backend buffer size =  1659.46 MB(RAM) (1680 tensors)
ggml_extend.hpp:2580 - vae params backend buffer size =  94.47 MB(RAM) (140 tensors)""".splitlines()


def test_sdcpp_buffer_lines_sum_per_module():
    got = peer.parse_sdcpp_buffers(BUFFERS)
    assert got["clip"] == {"bytes": int(107.87 * 2**20) + int(387.10 * 2**20), "tensors": 585}
    assert got["unet"]["tensors"] == 1680 and got["vae"]["tensors"] == 140


def test_sdcpp_conversion_rule():
    # rows that are whole k-quant blocks convert; conv kernels (ne[0] = 3), biases and embeddings stay
    assert peer.sdcpp_converts("model.diffusion_model.input_blocks.4.1.proj_in.weight", (640, 640), "q4_0")
    assert not peer.sdcpp_converts("model.diffusion_model.input_blocks.4.1.proj_in.weight", (640, 640), "q4_K")
    assert peer.sdcpp_converts("model.diffusion_model.middle_block.1.proj_in.weight", (1280, 1280), "q3_K")
    assert not peer.sdcpp_converts("model.diffusion_model.middle_block.0.in_layers.2.weight", (1280, 1280, 3, 3), "q3_K")
    assert not peer.sdcpp_converts("model.diffusion_model.middle_block.1.proj_in.bias", (1280,), "f16")
    assert not peer.sdcpp_converts("model.diffusion_model.time_embed.0.weight", (1280, 320), "q4_0")
    assert not peer.sdcpp_converts("conditioner.embedders.1.model.token_embedding.weight", (49408, 1280), "q3_K")


def test_sdcpp_expected_bytes_and_types_per_part():
    tensors = {"model.diffusion_model.middle_block.1.proj_in.weight": ("F16", (1280, 1280)),
               "model.diffusion_model.middle_block.0.in_layers.2.weight": ("F16", (1280, 1280, 3, 3)),
               "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": ("F16", (768,)),
               "first_stage_model.decoder.conv_in.weight": ("F16", (512, 4, 3, 3)),
               "first_stage_model.encoder.conv_in.weight": ("F16", (128, 3, 3, 3))}  # sd.cpp loads no encoder
    got = peer.sdcpp_expected(tensors, "q3_K")
    assert got["unet"]["types"] == {"q3_K": 1, "f16": 1}
    assert got["unet"]["bytes"] == 1280 * 1280 // 256 * 110 + 1280 * 1280 * 9 * 2
    assert got["unet"]["converted_weights"] == 1280 * 1280 and got["unet"]["weights"] == 1280 * 1280 * 10
    assert got["text_encoders"]["types"] == {"q3_K": 1}  # 768 = 3 blocks of 256
    assert got["vae"]["weights"] == 512 * 4 * 9


def test_merge_replaces_the_same_run_and_keeps_the_others():
    old = [{"engine": "vqdm", "weights": "vq3 random codes, fp32", "image_s": 40.0},
           {"engine": "stable-diffusion.cpp", "weights": "q3_K", "image_s": 80.0}]
    new = {"engine": "vqdm", "weights": "vq3 random codes, fp32", "image_s": 30.0}
    assert peer.merged_runs(old, new) == [old[1], new]


def test_table_rows_and_ratios_come_from_the_json():
    def run(engine, weights, image, step, rss, **kw):
        return {"engine": engine, "weights": weights, "image_s": image, "unet_step_s": step, "first_step_s": step,
                "peak_rss_bytes": rss, "weight_bytes": rss // 2, "commit": "abcdef0123",
                "images": [{"steps": 1, "image_s": image, "phases_s": {"vae_decode": 5.0}}], **kw}
    result = {"cells": {"turbo-512": {"config": {"resolution": 512, "steps": 1, "guidance": 0.0}, "runs": [
        run("stable-diffusion.cpp", "q3_K", 80.0, 20.0, 4_000_000_000),
        run("vqdm", "vq3 random codes, bf16", 20.0, 5.0, 3_000_000_000, bits=3, dtype="bf16")]}}}
    table = peer.markdown_tables(result)
    assert "| vqdm vq3, bf16 | 20.0 s | 5.0 s |" in table
    assert "| vqdm 3-bit bf16 / sd.cpp q3_K | 0.25× | 0.25× | 0.75× | 0.75× |" in table
