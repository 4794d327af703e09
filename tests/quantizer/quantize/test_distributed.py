"""Two gloo processes, each sampling half of the prompts, all-reduce to the H of one process."""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from vqdm.quantizer.sampling import SamplingConfig

SUBSET = "down_blocks.1"  # convs (3x3, 1x1 shortcut, strided downsampler) and attention with shared inputs
CFG = SamplingConfig(num_prompts=4, steps=2, guidance=5.0, resolution=64, scheduler="ddim", batch_size=1, seed=3)
PROMPTS = ["a red fox in snow", "a lighthouse at night", "a bowl of ramen"]


def _subset_hessians(model_dir):
    from vqdm.models import load_pipeline, select_layers, subset_of
    from vqdm.quantizer.quantize.hessians import collect_hessians

    pipe = load_pipeline(model_dir)
    names = [n for n, _ in select_layers(pipe.unet) if subset_of(n) == SUBSET]
    return collect_hessians(pipe, names, CFG, PROMPTS)


def _worker(rank: int, world: int, init_file: str, model_dir: str, out_file: str) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        stats = _subset_hessians(model_dir)
        if rank == 0:
            save_file({n: h for n, h in stats.hessians.items() if n in stats.groups}, out_file,
                      metadata={n: str(c) for n, c in stats.counts.items()})
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_give_the_single_process_h(tiny_sdxl_dir, tmp_path, monkeypatch, pytestconfig):
    from safetensors import safe_open

    # Spawned children unpickle `_worker` by module name: let them import this test module.
    monkeypatch.syspath_prepend(str(pytestconfig.rootpath))
    out_file = tmp_path / "h.safetensors"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tiny_sdxl_dir), str(out_file)), nprocs=2, join=True)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as the workers
    try:
        single = _subset_hessians(tiny_sdxl_dir)
    finally:
        torch.set_num_threads(threads)
    with safe_open(str(out_file), "pt") as f:
        counts = {n: int(c) for n, c in f.metadata().items()}
        assert counts == single.counts
        assert set(f.keys()) == set(single.groups) and len(single.groups) < len(single.hessians)  # some sharing
        for owner in single.groups:
            h2 = f.get_tensor(owner)
            h1 = single.hessians[owner]
            assert h2.dtype == torch.float64
            # Same U-Net calls, summed in another order: equal to fp64 rounding.
            torch.testing.assert_close(h2, h1, rtol=1e-12, atol=1e-12 * h1.abs().max().item())


AQ = {"beam_size": 2, "adam_steps": 2, "max_rounds": 1, "kmeans_iters": 5, "init_passes": 1}


def _quantize_first_subset(model_dir, out):
    from vqdm.quantizer.quantize.run import QuantizeStopped, quantize_model
    from vqdm.quantizer.recipes import recipe

    calib = recipe("sdxl").replace(num_prompts=2, steps=2, resolution=64, batch_size=1)
    try:
        quantize_model(model_dir, "sdxl", 3, out, calibration=calib, aq_options=AQ, progress=False, stop_after_subset=0)
    except QuantizeStopped:
        pass


def _driver_worker(rank: int, world: int, init_file: str, model_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _quantize_first_subset(model_dir, out)
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_split_layers_and_match_one(tiny_sdxl_dir, tmp_path, monkeypatch, pytestconfig):
    """torchrun-style run: each rank quantizes its share of the layers, results are broadcast;
    rank 0's checkpoint equals a single process's bit for bit (one batch per rank: the same sums)."""
    import json

    from safetensors.torch import load_file

    from vqdm.quantizer.quantize.checkpoint import QuantizeCheckpoint

    monkeypatch.syspath_prepend(str(pytestconfig.rootpath))
    two, one = tmp_path / "two", tmp_path / "one"
    mp.spawn(_driver_worker, args=(2, str(tmp_path / "init"), str(tiny_sdxl_dir), str(two)), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _quantize_first_subset(tiny_sdxl_dir, one)
    finally:
        torch.set_num_threads(threads)
    states = [json.loads((QuantizeCheckpoint.dir_for(o) / "state.json").read_text()) for o in (two, one)]
    files = [load_file(str(QuantizeCheckpoint.dir_for(o) / s["finished"][0]["file"])) for o, s in zip((two, one), states)]
    assert len(files[0]) == 5 * 3 and files[0].keys() == files[1].keys()
    for k in files[0]:
        assert torch.equal(files[0][k], files[1][k]), k
    errors = [{n: s["rel_error"] for n, s in st["finished"][0]["layers"].items()} for st in states]
    # The reported error is a float64 trace over H, whose reduction order may differ between the
    # ranks' BLAS calls; the codes, codebooks and scales above are the bit-exact claim.
    assert errors[0].keys() == errors[1].keys()
    for name, err in errors[1].items():
        assert errors[0][name] == pytest.approx(err, rel=1e-12), name
