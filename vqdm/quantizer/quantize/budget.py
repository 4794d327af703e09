"""`vqdm quantize --time-budget`: the AQ search settings that fit a wall-time budget.

The ladder runs from the default search down to the k-means start alone. Each rung's error cost
is measured against the default (`benchmarks/aq_budget_ladder.py` on trained MiniLM layers with
real calibration H, K = 3: median over layers of the rung's relative error / the default's,
`benchmarks/results/aq_budget_ladder.json`; tests/quantizer/quantize/test_budget.py keeps the two
equal). Its time is projected on the machine by the probe of `time_plan`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from vqdm.errors import ConfigError


@dataclass(frozen=True)
class Rung:
    """One search setting: AQConfig fields over the defaults, and its measured error cost."""

    name: str
    knobs: dict = field(default_factory=dict)
    error_ratio: float = 1.0  # median relative error / the default's (measured, see the module docstring)


# Most expensive first. error_ratio: benchmarks/results/aq_budget_ladder.json ("ladder").
LADDER: tuple[Rung, ...] = (
    Rung("default", {}, 1.0),
    Rung("4 passes, 4 rounds", {"init_passes": 4, "max_rounds": 4}, 1.04),
    Rung("1 pass, 2 rounds, beam 4", {"init_passes": 1, "max_rounds": 2, "beam_size": 4}, 1.183),
    Rung("1 greedy round", {"init_passes": 0, "max_rounds": 1, "beam_size": 1}, 1.606),
    Rung("k-means start only", {"init_passes": 0, "max_rounds": 0, "kmeans_iters": 20}, 4.448),
)

# AQConfig fields some rung sets: a run with --time-budget leaves them to the budget.
BUDGET_FIELDS = tuple(dict.fromkeys(k for rung in LADDER for k in rung.knobs))


class BudgetError(ConfigError):
    """No search setting fits the time budget."""


def choose_rung(project: Callable[[dict], float], budget_seconds: float) -> tuple[Rung, float]:
    """The most thorough rung whose projected seconds (`project(rung.knobs)`) fit the budget.

    The cheapest rung is projected first (BudgetError with its time when even it does not fit),
    then the others from the default down until one fits.
    """
    cheapest = project(LADDER[-1].knobs)
    if cheapest > budget_seconds:
        raise BudgetError(f"no search setting fits the time budget of {format_duration(budget_seconds)}: the "
                          f"cheapest ({LADDER[-1].name}) is projected at {format_duration(cheapest)}; give more time, or calibrate on less (--num-prompts, --steps, "
                          "--resolution) or fewer --subsets")
    for rung in LADDER[:-1]:
        seconds = project(rung.knobs)
        if seconds <= budget_seconds:
            return rung, seconds
    return LADDER[-1], cheapest


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds from '90m', '2h', '1.5h', '3600s' or '3600' (seconds); ConfigError otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text.lower())
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"--time-budget {text!r}: give a positive duration such as 90m, 2h or 3600s")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def format_duration(seconds: float) -> str:
    """'2 h 05 min', '7.5 min', '42 s' or '0.35 s'."""
    if seconds >= 3600:
        h, rest = divmod(round(seconds / 60), 60)
        return f"{h} h {rest:02d} min"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.2g} s"
