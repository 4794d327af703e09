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
    assert [(r["engine"], r["weights"]) for r in runs] == [("sdcpp", "f16"), ("vqdm", "vq4"), ("sdcpp", "q4_K"),
                                                          ("sdcpp", "q4_0"), ("vqdm", "vq2"), ("sdcpp", "q2_K")]
    # a 1-step cell gets an extra 3-step image for its steady-state step; a 4-step one does not
    assert peer.images_to_make(peer.CELLS["turbo-512"], 2, warmup=1) == [(1, 3), (3, 1)]
    assert peer.images_to_make(peer.CELLS["sdxl-1024"], 2, warmup=0) == [(4, 2)]
    assert peer.cfg_scale(0.0) == 1.0 and peer.cfg_scale(5.0) == 5.0
