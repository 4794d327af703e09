"""`vqdm plan --time`, `vqdm quantize --time-budget` and the ETA: the projection against real runs
of the tiny SDXL U-Net (one subset), and its parts."""
from __future__ import annotations

import contextlib
import io
import json
import re
import time
from pathlib import Path

import pytest

from vqdm.cli import main
from vqdm.errors import ConfigError
from vqdm.quantizer.quantize.budget import LADDER, BudgetError, choose_rung, parse_duration
from vqdm.quantizer.quantize.time_plan import forward_census, project_layers

pytestmark = pytest.mark.usefixtures("one_thread")

# TINY_ARGS's calibration on one subset; the AQ search is left to the budget.
CALIBRATION = ["--subsets", "down_blocks.0", "--num-prompts", "2", "--steps", "2", "--resolution", "64",
               "--batch-size", "2", "--device", "cpu"]
# Projection vs the run: the probe and the run share this loaded machine, but not the same moments.
FACTOR = 4.0


def _run(argv: list[str]) -> tuple[int, str, str, float]:
    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue(), time.perf_counter() - t0


@pytest.mark.parametrize("text, seconds", [("90m", 5400), ("2h", 7200), ("3600s", 3600), ("1.5h", 5400), ("45", 45)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "2 days", "-5m", "0h", "h"])
def test_parse_duration_refuses(text):
    with pytest.raises(ConfigError, match="--time-budget .*give a positive duration such as 90m, 2h or 3600s"):
        parse_duration(text)


def test_project_layers_reproduces_and_scales_a_reference():
    ref = {"shape": "r", "n": 128, "d": 1280, "rounds": 2,
           "seconds_by_phase": {"kmeans": 1.0, "cholesky": 0.5, "pass_fit": 2.0, "pass_search": 3.0,
                                "lsq": 4.0, "adam": 0.0, "beam": 6.0, "loss": 1.0}}
    same = project_layers([(128, 1280)], [ref])
    assert same["seconds"] == pytest.approx(17.5)  # every phase once, as measured
    double_n = project_layers([(256, 1280)], [ref])["seconds"]
    assert double_n == pytest.approx(2 * (17.5 - 0.5) + 0.5)  # all but the d³ Cholesky is linear in n
    assert project_layers([(128, 1280)], [ref], rounds=4)["seconds"] == pytest.approx(17.5 + 11.0)


def test_census_counts_rows_and_shared_inputs():
    from vqdm.models import build_unet

    c = forward_census(build_unet("tiny-sdxl", device="meta"), latent_side=8)
    assert c.rows["down_blocks.0.resnets.0.conv1"] == 64  # 8x8 output positions
    assert c.rows["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == 16  # 4x4 tokens
    q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_"
    assert c.owner[q + "k"] == c.owner[q + "v"] == q + "q"  # self-attention reads one input
    k2 = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    assert c.owner[k2] == "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"  # the text embedding
    assert c.flops > 0 and c.ops > 100


def test_ladder_error_costs_are_the_measured_ones():
    measured = json.loads((Path(__file__).parents[3] / "benchmarks/results/aq_budget_ladder.json").read_text())
    assert [(r["rung"], r["knobs"], r["error_ratio"]) for r in measured["ladder"]] == \
        [(r.name, r.knobs, r.error_ratio) for r in LADDER]
    assert [r.error_ratio for r in LADDER] == sorted(r.error_ratio for r in LADDER)  # cheaper costs error


def test_choose_rung_takes_the_most_thorough_that_fits():
    seconds = {id(r.knobs): 100.0 / (i + 1) for i, r in enumerate(LADDER)}  # the default slowest
    assert choose_rung(lambda k: seconds[id(k)], 1000)[0] is LADDER[0]
    assert choose_rung(lambda k: seconds[id(k)], 40)[0] is LADDER[2]
    with pytest.raises(BudgetError, match=rf"the cheapest \({LADDER[-1].name}\) is projected at 20 s"):
        choose_rung(lambda k: seconds[id(k)], 10)


@pytest.fixture(scope="module")
def budget_runs(tiny_sdxl_dir, tmp_path_factory):
    """A budget nothing fits (the cheapest projection comes back in the message), then a real run with
    a budget between that and the default's projection, progress bar on."""
    base = ["quantize", "--model", str(tiny_sdxl_dir), "--preset", "sdxl", "--bits", "3", *CALIBRATION]
    runs = tmp_path_factory.mktemp("budget")
    rc, _, none_err, _ = _run([*base, "--out", str(runs / "none"), "--time-budget", "0.01s", "--no-progress"])
    assert rc == 1, none_err
    cheapest = float(re.search(r"is projected at ([\d.e+-]+) s", none_err).group(1))
    rc, out_plan, err_plan, _ = _run(["plan", "--preset", "tiny-sdxl", "--bits", "3", "--time", "--json", *CALIBRATION])
    assert rc == 0, err_plan
    default = json.loads(out_plan)["time"]["seconds"]
    budget = (cheapest * default) ** 0.5  # between the two
    rc, out, err, wall = _run([*base, "--out", str(runs / "tight"), "--time-budget", f"{budget:.0f}s"])
    return {"none_dir": runs / "none", "none_err": none_err, "cheapest": cheapest, "default": default, "budget": budget,
            "rc": rc, "out": out, "err": err, "wall": wall, "plan": out_plan}


def test_nothing_fits_exits_before_any_work(budget_runs):
    assert "no search setting fits the time budget of 0.01 s" in budget_runs["none_err"]
    assert not budget_runs["none_dir"].exists()


def test_tight_budget_picks_cheaper_settings_and_keeps_to_it(budget_runs):
    r = budget_runs
    assert r["rc"] == 0, r["err"]
    assert r["cheapest"] < r["default"]  # the probe sees the default search cost more
    picked = re.search(r"picked '([^']+)'", r["out"]).group(1)
    assert picked != LADDER[0].name, r["out"]  # the default did not fit
    # the run's calibration + AQ (its summary) within the budget, up to the projection's tolerance
    done = re.search(r"quantization ([\d.]+) s", r["out"])
    calib = sum(float(x) for x in re.findall(r"calibration ([\d.]+) s in", r["out"]))
    real = calib + float(done.group(1))
    assert real <= r["budget"] * FACTOR, (real, r["budget"])


def test_eta_projection_against_the_real_time(budget_runs):
    r = budget_runs
    real, projected = map(float, re.search(r"calibration \+ AQ ([\d.]+) s, projected ([\d.]+) s", r["out"]).groups())
    assert projected / FACTOR <= real <= projected * FACTOR, (projected, real)
    bar = r["err"].replace("\r", "\n")
    assert "5/5 layers" in bar and "quantize:" in bar  # the bar counts layers, with an ETA ([elapsed<remaining])
    assert re.search(r"\[\d+:\d+<\d+:\d+, \d/5 layers\]", bar)
