"""Before/after table of two `quant_quality.py` runs over the same layers: per AQ config, the median
over layers of (after / before) relative error on the calibration H and on the held-out H, and of
the time per layer. Each run is its --json output, or its printed log (one line per finished cell)
when the run was stopped early: then only the cells both runs finished are compared.

    python benchmarks/compare_quality.py BEFORE.json AFTER.json --json benchmarks/results/X.json
    python benchmarks/compare_quality.py before.log after.log --subtract after:LAYER:aq3:545.8
        # a cell's seconds minus time its process spent stopped (e.g. SIGSTOP while tests ran)
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path


LOG_LINE = re.compile(r"^\[\d+/\d+\] (\S+)\s+(\S+)\s+rel_error ([\d.e-]+) \(held-out ([\d.e-]+)\) "
                      r"bits ([\d.]+) ([\d.]+)s$")


def read_run(path: Path) -> dict:
    """A run as quant_quality's JSON has it ({"layers": {layer: {method: cell}}}), from JSON or a log."""
    if path.suffix == ".json":
        return json.loads(path.read_text())
    layers: dict = {}
    for line in path.read_text().splitlines():
        m = LOG_LINE.match(line.strip())
        if m:
            layer, method, err, held, bits, sec = m.groups()
            layers.setdefault(layer, {})[method] = {"rel_error": float(err), "rel_error_heldout": float(held),
                                                    "bits": float(bits), "seconds": float(sec)}
    return {"layers": layers, "command": None, "source": "log"}


def compare(before: dict, after: dict) -> dict:
    layers = sorted(set(before["layers"]) & set(after["layers"]))
    methods = sorted({m for n in layers for m in after["layers"][n] if m.startswith("aq") and m in before["layers"][n]},
                     key=lambda m: -int(m[2:]))
    out = {}
    for m in methods:
        rows = {}
        for n in layers:
            if m not in before["layers"][n] or m not in after["layers"][n]:
                continue
            b, a = before["layers"][n][m], after["layers"][n][m]
            rows[n] = {"rel_error": a["rel_error"] / b["rel_error"],
                       "rel_error_heldout": a["rel_error_heldout"] / b["rel_error_heldout"],
                       "seconds": a["seconds"] / b["seconds"], "rounds_before": b.get("rounds"),
                       "rounds_after": a.get("rounds")}
        out[m] = {
            "layers": len(rows),
            "median_ratio_rel_error": statistics.median(r["rel_error"] for r in rows.values()),
            "median_ratio_rel_error_heldout": statistics.median(r["rel_error_heldout"] for r in rows.values()),
            "median_ratio_seconds": statistics.median(r["seconds"] for r in rows.values()),
            "max_ratio_rel_error": max(r["rel_error"] for r in rows.values()),
            "max_ratio_seconds": max(r["seconds"] for r in rows.values()),
            "per_layer": rows,
        }
    return out


def markdown(table: dict) -> str:
    lines = ["| config | layers | median error after/before (calibration H) | held-out H | time per layer after/before "
             "(median, max) |", "|---|---|---|---|---|"]
    for m, t in table.items():
        lines.append(f"| {m} | {t['layers']} | {t['median_ratio_rel_error']:.3f} | "
                     f"{t['median_ratio_rel_error_heldout']:.3f} | {t['median_ratio_seconds']:.2f}x, "
                     f"{t['max_ratio_seconds']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--json", type=Path, help="write the comparison (with both runs' settings) here")
    ap.add_argument("--subtract", action="append", default=[], metavar="RUN:LAYER:METHOD:SECONDS",
                    help="RUN is before or after; take SECONDS off that cell's time (time spent stopped)")
    args = ap.parse_args(argv)
    runs = {"before": read_run(args.before), "after": read_run(args.after)}
    adjustments = []
    for spec in args.subtract:
        run, layer, method, seconds = spec.split(":")
        cell = runs[run]["layers"].get(layer, {}).get(method)
        if cell is not None:
            cell["seconds"] -= float(seconds)
            adjustments.append({"run": run, "layer": layer, "method": method, "seconds_subtracted": float(seconds)})
    before, after = runs["before"], runs["after"]
    table = compare(before, after)
    print(markdown(table))
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "compare_quality", "before": {"file": str(args.before), "command": before.get("command"),
                                                       "aq": before.get("aq"), "machine": before.get("machine")},
            "after": {"file": str(args.after), "command": after.get("command"), "aq": after.get("aq"),
                      "machine": after.get("machine")},
            "time_adjustments": adjustments, "table": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
