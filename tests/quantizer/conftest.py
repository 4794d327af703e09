"""Tiny diffusers folders and one tiny `vqdm quantize` run, shared by the driver and CLI tests."""
from __future__ import annotations

import contextlib
import io
from types import SimpleNamespace

import pytest

# Calibration and AQ small enough for CPU tests: 2 prompts x 2 steps at 64², a token AQ search.
TINY_ARGS = ["--num-prompts", "2", "--steps", "2", "--resolution", "64", "--batch-size", "2",
             "--beam", "2", "--adam-steps", "2", "--max-rounds", "1", "--kmeans-iters", "5", "--damping", "0.1",
             "--init-passes", "1", "--tolerance", "0.01",
             "--no-progress"]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (`pytestmark = pytest.mark.usefixtures("one_thread")`).

    Small tensors and tiny models on a shared 2-core machine: a second thread fights other
    processes and ran the distillation tests ~10x slower. Module scope, so module-scoped fixtures
    that do the heavy work (quantizing, distilling) run under it too.
    """
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def tiny_args() -> list[str]:
    return list(TINY_ARGS)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    from vqdm.models import make_model

    return make_model("tiny-sdxl", tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_turbo_dir(tmp_path_factory):
    from vqdm.models import make_model

    return make_model("tiny-sdxl-turbo", tmp_path_factory.mktemp("models") / "tiny-sdxl-turbo", seed=1)


@pytest.fixture(scope="session")
def sdxl_run(tiny_sdxl_dir, tmp_path_factory):
    """`vqdm quantize --preset sdxl --bits 3` on the tiny SDXL folder, uninterrupted.

    A spy around the real `collect_hessians` records, for every calibration pass, which layers
    it measured and which layers of the student were already VQ at that moment.
    """
    import vqdm.quantizer.quantize.run as driver
    from vqdm.cli import main
    from vqdm.models import vq_modules

    real = driver.collect_hessians
    passes = []

    def spy(pipe, names, cfg, prompts, **kwargs):
        passes.append({"names": list(names), "vq": [n for n, _ in vq_modules(pipe.unet)]})
        return real(pipe, names, cfg, prompts, **kwargs)

    out = tmp_path_factory.mktemp("runs") / "sdxl-3bit"
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        mp.setattr(driver, "collect_hessians", spy)
        rc = main(["quantize", "--model", str(tiny_sdxl_dir), "--preset", "sdxl", "--bits", "3", "--out", str(out),
                   *TINY_ARGS])
    return SimpleNamespace(rc=rc, out=out, passes=passes, stdout=stdout.getvalue(), stderr=stderr.getvalue(),
                           args=["--model", str(tiny_sdxl_dir), "--preset", "sdxl", "--bits", "3", *TINY_ARGS])
