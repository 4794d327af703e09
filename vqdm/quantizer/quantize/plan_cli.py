"""`vqdm plan --time`: the projected wall time of `vqdm quantize`, composed onto `vqdm plan` by
`vqdm.cli` (the plan's layers and bytes live in `vqdm.models`, which never imports the quantizer)."""
from __future__ import annotations

import argparse
import json

from vqdm.models import detect_family, single_file_options
from vqdm.models.cli import plan_model, print_plan
from vqdm.models.configs import PRESETS
from vqdm.quantizer.quantize.cli import (_add_aq_flags, _add_calibration_flags, print_time_plan,
                                         project_run, run_settings, vae_scale_factor)
from vqdm.quantizer.runtime import DEVICE_HELP


def extend(p: argparse.ArgumentParser) -> None:
    """Add --time and the settings it projects (`vqdm quantize`'s calibration and AQ flags) to `vqdm plan`."""
    p.add_argument("--time", action="store_true",
                   help="also project the wall time of `vqdm quantize` with these settings on this machine, from a "
                        "short measured probe (seconds on tiny models, about a minute on full-size shapes)")
    p.add_argument("--calibrate-skipped", action="store_true", help="as `vqdm quantize --calibrate-skipped`")
    p.add_argument("--device", help=f"where the probe runs: {DEVICE_HELP}")
    _add_calibration_flags(p.add_argument_group("calibration, with --time (defaults: the model family's recipe)"))
    _add_aq_flags(p.add_argument_group("additive quantization, with --time"))
    bytes_only = p.get_default("func")
    p.set_defaults(func=lambda args: cmd_plan_time(args) if args.time else bytes_only(args))


def cmd_plan_time(args: argparse.Namespace) -> int:
    unet, plan, family = plan_model(args)
    if args.preset:
        factor = PRESETS[args.preset].vae_scale_factor
    else:
        opts = single_file_options(args)
        family, factor = family or detect_family(args.model, opts), vae_scale_factor(args.model, opts)
    calib, aq = run_settings(args, family)
    tp = project_run(args, unet, factor, calib, aq)
    if args.json:
        print(json.dumps({**plan, "time": tp.to_dict()}, indent=2))
        return 0
    print_plan(plan)
    print_time_plan(tp)
    return 0
