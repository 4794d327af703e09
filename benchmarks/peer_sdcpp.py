"""vqdm against stable-diffusion.cpp on CPU (issue 29): the same single-file weights, the same threads.

    python benchmarks/peer_sdcpp.py [--only turbo-512,sdxl-512,sdxl-1024]
        [--bits 4,3,2] [--peer-types q4_K,...] [--vqdm-dtype fp32,bf16] [--threads 2] [--repeats 2]
        [--warmup 1] [--cache DIR] [--sdxl-file F] [--turbo-file F] [--no-f16] [--dry-run] [--merge]
        [--json benchmarks/results/peer_sdcpp.json]
    python benchmarks/peer_sdcpp.py --table      # the README's tables from the JSON

Both engines read one original-layout .safetensors file with seeded random fp16 weights, made by
`vqdm make-model sdxl|sdxl-turbo --single-file F --dtype fp16` into --cache when missing (about 7 GB
each; run under the big-memory lock on a shared machine: every cell loads a full-size model).

- stable-diffusion.cpp: the `stable-diffusion-cpp-python` bindings, built from source (CMake, default
  flags: GGML_NATIVE) into their own venv (--peer-venv, made on first use, reused after); each cell
  runs benchmarks/peer_sdcpp_worker.py there, which loads F converting its weights at load to the
  k-quant type (sd.cpp's wtype: q4_K, q4_0, q3_K, q2_K; f16 = its dense) and records the log.
- vqdm: in this (the project's) venv, a worker process builds the VQ U-Net of F's architecture with
  random codes (benchmarks/bench_unet.build: timing does not depend on code values; a real
  `vqdm quantize` of SDXL takes hours here), takes F's own text encoders and VAE
  (load_single_file(unet=...): F's U-Net tensors are never read) and generates through the serving
  runner (vqdm.server.runner.run_batch, what `vqdm generate` and `vqdm serve` run) in fp32 (what
  `vqdm serve` picks on CPU) and bf16 (`vqdm serve --dtype bfloat16`); --vqdm-dtype to choose.

What each figure covers (both engines alike):
- image_s: one image, prompt to decoded pixels: text encoders, every sampling step (CFG: cond and
  uncond passes for SDXL, guidance 5; Turbo: guidance off, one pass), VAE decode (sd.cpp's
  generate_image call; vqdm's run_batch). Min over --repeats.
- unet_step_s: one sampling step in steady state, i.e. the U-Net pass(es) of a step plus the
  sampler's arithmetic: the mean of steps 2..N of an N-step image (N = 3 for a 1-step cell), from
  the engine's own per-step marks (sd.cpp: its progress callback; vqdm: the runner's step marks).
  Step 1 is kept apart (first_step_s): sd.cpp builds and allocates its compute graph there.
- peak_rss_bytes: resource.getrusage of the worker process itself; weight_bytes: what the engine
  holds for the weights (sd.cpp: its "total params memory size" line; vqdm: stored bytes of the
  U-Net, text encoders and VAE).
The same-file check puts sd.cpp's load log (model version it detected, tensor count and types per
part) beside `vqdm plan` and the file's header.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

SDCPP_PACKAGE = "stable-diffusion-cpp-python==0.4.7"
PEER_WORKER = HERE / "peer_sdcpp_worker.py"
PROMPT = "a photograph of a red fox standing in fresh snow, morning light"
SEED = 7


@dataclass(frozen=True)
class Cell:
    preset: str  # the make-model preset of the file both engines read
    resolution: int
    steps: int  # steps of the timed image
    guidance: float  # vqdm's guidance_scale; sd.cpp's cfg_scale is the same, 1.0 (no uncond pass) where <= 1


CELLS = {"turbo-512": Cell("sdxl-turbo", 512, 1, 0.0),
         "sdxl-512": Cell("sdxl", 512, 4, 5.0),
         "sdxl-1024": Cell("sdxl", 1024, 4, 5.0)}
# vqdm bits -> the sd.cpp types at about those bits per weight (q4_K 4.5, q4_0 4.5, q3_K 3.4, q2_K 2.6)
PEER_TYPES = {4: ("q4_K", "q4_0"), 3: ("q3_K",), 2: ("q2_K",)}
STEP_IMAGE_STEPS = 3  # a 1-step cell's U-Net step comes from an extra image of this many steps


def images_to_make(cell: Cell, repeats: int, warmup: int) -> list[tuple[int, int]]:
    """(steps, count) of the images a worker generates: where the timed image has too few steps for a
    steady-state step, first one of STEP_IMAGE_STEPS steps (which also warms both engines up), then
    `warmup` untimed and `repeats` timed images."""
    extra = [(STEP_IMAGE_STEPS, 1)] if cell.steps < 2 else []
    return extra + [(cell.steps, warmup + repeats)]


def cfg_scale(guidance: float) -> float:
    return guidance if guidance > 1.0 else 1.0


def steady_step(step_s: list[float]) -> float | None:
    """Mean of the steps after the first (None for a 1-step image)."""
    return sum(step_s[1:]) / (len(step_s) - 1) if len(step_s) > 1 else None


_PARTS = (("model.diffusion_model.", "unet"), ("conditioner.", "text_encoders"), ("first_stage_model.", "vae"))


# ----------------------------------------------------------------------------------------------
# stable-diffusion.cpp's log: pure parsing (tests/benchmarks/test_peer_sdcpp.py)
# ----------------------------------------------------------------------------------------------
_STAT = re.compile(r"^(Weight|Conditioner weight|Diffusion model weight|VAE weight) type stat:\s*(.*)$")
_PARAMS = re.compile(r"total params memory size = ([\d.]+)MB .*text_encoders ([\d.]+)MB.*diffusion_model ([\d.]+)MB"
                     r".*vae ([\d.]+)MB")
_TAKING = re.compile(r"^(get_learned_condition|sampling|decode_first_stage|generating \d+ latent images|loading tensors)"
                     r" completed(?:, taking| in) ([\d.]+)s")
_DONE = re.compile(r"^generate_image completed in ([\d.]+)s")


def type_stat(text: str) -> dict[str, int]:
    """'     f16: 1680 |     f32: 3' -> {'f16': 1680, 'f32': 3}."""
    out = {}
    for part in text.split("|"):
        if ":" in part:
            name, count = part.split(":", 1)
            out[name.strip()] = int(count)
    return out


def parse_sdcpp_log(lines: list[str]) -> dict:
    """What sd.cpp's log says about the model it loaded and the seconds of each phase it timed."""
    out: dict = {"phases_s": {}}
    key = {"Weight": "tensor_types", "Conditioner weight": "conditioner_types",
           "Diffusion model weight": "diffusion_model_types", "VAE weight": "vae_types"}
    for line in lines:
        line = re.sub(r"^[\w.+-]+:\d+\s*- ", "", line.strip())  # log_printf's "file.cpp:123  - " prefix
        if line.startswith("Version: "):
            out["model_version"] = line.removeprefix("Version: ").strip()
        elif m := _STAT.match(line):
            out[key[m.group(1)]] = type_stat(m.group(2))
        elif m := _PARAMS.search(line):
            mib = [float(g) * 2**20 for g in m.groups()]
            out["params_bytes"] = dict(zip(("total", "text_encoders", "diffusion_model", "vae"), map(int, mib)))
        elif m := _TAKING.match(line):
            out["phases_s"][m.group(1).split(" ")[0] if m.group(1).startswith("generating") else m.group(1)] = float(m.group(2))
        elif m := _DONE.match(line):
            out["phases_s"]["generate_image"] = float(m.group(1))
    if "tensor_types" in out:
        out["tensor_count"] = sum(out["tensor_types"].values())
    return out


_BUFFER = re.compile(r"^(\w+) params backend buffer size =\s*([\d.]+) ?MB.*\((\d+) tensors\)")


def parse_sdcpp_buffers(lines: list[str]) -> dict[str, dict]:
    """sd.cpp's per-module weight buffers ('unet params backend buffer size = 1659.46 MB(RAM) (1680 tensors)'):
    {module: {"bytes", "tensors"}}, summed where a module has several (the two CLIP encoders)."""
    out: dict[str, dict] = {}
    for line in lines:
        line = re.sub(r"^[\w.+-]+:\d+\s*- ", "", line.strip())
        if m := _BUFFER.match(line):
            b = out.setdefault(m.group(1), {"bytes": 0, "tensors": 0})
            b["bytes"] += int(float(m.group(2)) * 2**20)
            b["tensors"] += int(m.group(3))
    return out


# ggml block layouts: (elements per block, bytes per block)
GGML_BLOCKS = {"q4_0": (32, 18), "q4_K": (256, 144), "q3_K": (256, 110), "q2_K": (256, 84), "f16": (1, 2)}
# Name parts sd.cpp never converts in a U-Net model (ModelLoader::tensor_should_be_converted, 0.4.7's vendored
# stable-diffusion.cpp); the FLUX / MMDiT names in the same list do not occur in an SDXL file.
_SDCPP_KEEP_SUFFIX = (".bias", ".scale")
_SDCPP_KEEP_PART = ("time_embed.", "label_emb.", "embedding")


def sdcpp_converts(name: str, shape: tuple[int, ...], wtype: str) -> bool:
    """Whether sd.cpp's load-time conversion to `wtype` takes this tensor: not biases or embeddings, and for a
    block type only rows (ggml's ne[0], the last torch dimension) that are a whole number of blocks. So every
    conv weight (ne[0] = the kernel width) stays in the file's type."""
    block = GGML_BLOCKS[wtype][0]
    if block > 1 and (shape[-1] if shape else 1) % block:
        return False
    return not name.endswith(_SDCPP_KEEP_SUFFIX) and not any(p in name for p in _SDCPP_KEEP_PART)


def sdcpp_expected(tensors: dict[str, tuple[str, tuple[int, ...]]], wtype: str) -> dict[str, dict]:
    """Per part of an original-layout SDXL file (unet, text_encoders, vae decoder: sd.cpp loads the decoder
    only): tensor types after sd.cpp's conversion to `wtype`, their bytes, and the share of weights converted.
    `tensors`: name -> (safetensors dtype, shape)."""
    from vqdm.models.safetensors_header import nbytes

    out: dict[str, dict] = {}
    for name, (dtype, shape) in tensors.items():
        part = next((p for prefix, p in _PARTS if name.startswith(prefix)), None)
        if part is None or (part == "vae" and not name.startswith(("first_stage_model.decoder.",
                                                                   "first_stage_model.post_quant_conv."))):
            continue
        numel = math.prod(shape)
        p = out.setdefault(part, {"types": {}, "bytes": 0, "weights": 0, "converted_weights": 0})
        if sdcpp_converts(name, shape, wtype):
            block, block_bytes = GGML_BLOCKS[wtype]
            kind, size = wtype, numel // block * block_bytes
            p["converted_weights"] += numel
        else:
            kind, size = dtype.lower(), nbytes(dtype, shape)
        p["types"][kind] = p["types"].get(kind, 0) + 1
        p["bytes"] += size
        p["weights"] += numel
    for p in out.values():
        p["bits_per_weight"] = round(8 * p["bytes"] / max(p["weights"], 1), 3)
    return out


def progress_step_seconds(progress: list[list]) -> list[float]:
    """Per-step seconds from sd.cpp's progress reports [step, steps, s/step averaged since sampling began]."""
    elapsed = {int(step): step * secs for step, _, secs in progress if step > 0}
    marks = [elapsed[k] for k in sorted(elapsed)]
    return [b - a for a, b in zip([0.0] + marks, marks)]


# ----------------------------------------------------------------------------------------------
# the benchmark venv with the bindings
# ----------------------------------------------------------------------------------------------
def peer_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_peer_venv(venv: Path) -> dict:
    """Build the bindings into `venv` once (CMake, about 5 min on 2 cores); reuse them after. The build's
    output stays in venv/build.log, whose CMake lines say which CPU flags it compiled for."""
    py, log = peer_python(venv), venv / "build.log"
    probe = [str(py), "-c", "import stable_diffusion_cpp as s; print(s.__version__)"]
    if not (py.exists() and subprocess.run(probe, capture_output=True).returncode == 0):
        print(f"building {SDCPP_PACKAGE} into {venv} (CMake; minutes), log in {log}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        with open(log, "w") as f:
            rc = subprocess.run([str(py), "-m", "pip", "install", "-v", "--no-binary", "stable-diffusion-cpp-python",
                                 SDCPP_PACKAGE], stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}).returncode
        if rc != 0:
            raise SystemExit(f"building {SDCPP_PACKAGE} failed (exit {rc}); see {log}")
    return {"venv": str(venv), "package": SDCPP_PACKAGE, "cmake_args_env": os.environ.get("CMAKE_ARGS", ""),
            **build_flags(log.read_text(errors="replace") if log.exists() else "")}


def build_flags(build_log: str) -> dict:
    """What CMake said about the CPU backend, and the flags ggml-cpu.c was compiled with, from the pip -v log."""
    first = lambda pattern: (re.findall(pattern, build_log) or [None])[0]  # noqa: E731
    compile_line = first(r"\S*(?:gcc|cc|clang)\s.*ggml-cpu\.c\.o -c .*")
    flags = [f for f in (compile_line or "").split() if re.match(r"-(D|O|m|f|std)", f) and not f.startswith(("-MF", "-MD", "-MT"))]
    return {"cpu_backend": [{"name": n, "flags": f.strip()} for n, f in re.findall(r"Adding CPU backend variant (\S+): (.*)", build_log)],
            "ggml_cpu_c_flags": flags, "ggml_version": first(r"ggml version: (\S+)"),
            "openmp": first(r"Found OpenMP: (.*)"), "compiler": first(r"The CXX compiler identification is (.*)")}


# ----------------------------------------------------------------------------------------------
# the shared model file, and what vqdm reads in it
# ----------------------------------------------------------------------------------------------
def ensure_model(preset: str, path: Path) -> Path:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "vqdm.cli", "make-model", preset, "--single-file", str(path), "--dtype", "fp16"]
        print("$", shlex.join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return path




_SDCPP_MODULES = {"unet": "unet", "clip": "text_encoders", "vae": "vae"}


def same_file_check(path: Path, wtype: str, load_log: dict) -> dict:
    """sd.cpp's load log for `wtype` beside what its conversion rule predicts from the file's header: per part,
    the bytes sd.cpp allocated against the predicted bytes, and the predicted tensor types."""
    from vqdm.models.single_file import read_header

    header = read_header(path)
    expected = sdcpp_expected({n: (e.dtype, tuple(e.shape)) for n, e in header.tensors.items()}, wtype)
    logged = {_SDCPP_MODULES.get(m, m): b for m, b in load_log.get("buffers", {}).items()}
    return {**{k: load_log.get(k) for k in ("model_version", "tensor_count", "tensor_types", "conditioner_types",
                                            "diffusion_model_types", "vae_types")},
            "buffers_logged": logged, "expected_from_header": expected,
            "logged_vs_expected_bytes": {part: round(logged[part]["bytes"] / expected[part]["bytes"], 4)
                                         for part in expected if part in logged}}


def vqdm_view(path: Path, bits: list[int]) -> dict:
    """The file as vqdm reads it: its header (tensor count and dtypes per part), family, and `vqdm plan`."""
    from vqdm.models.single_file import describe, read_header

    header = read_header(path)
    parts: dict[str, dict[str, int]] = {}
    for name, entry in header.tensors.items():
        part = next((p for prefix, p in _PARTS if name.startswith(prefix)), "other")
        parts.setdefault(part, {})
        parts[part][entry.dtype] = parts[part].get(entry.dtype, 0) + 1
    info = describe(path)
    plans = {}
    for b in bits:
        out = subprocess.run([sys.executable, "-m", "vqdm.cli", "plan", "--model", str(path), "--bits", str(b), "--json"],
                             check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        plans[b] = json.loads(out.stdout)
    return {"file": str(path), "file_bytes": path.stat().st_size, "tensor_count": len(header.tensors),
            "tensor_dtypes_by_part": parts, "family": info.family,
            "plan": {b: {k: p[k] for k in ("layers", "linear_layers", "conv_layers", "quantized_weights", "unet_params",
                                            "bits_per_weight_quantized", "bits_per_weight_unet", "unet_bytes",
                                            "dense_fp16_bytes") if k in p} for b, p in plans.items()}}


# ----------------------------------------------------------------------------------------------
# workers
# ----------------------------------------------------------------------------------------------
def run_sdcpp(venv: Path, model: Path, cell: Cell, wtype: str, threads: int, repeats: int, warmup: int) -> dict:
    spec = {"model": str(model), "wtype": wtype, "threads": threads, "resolution": cell.resolution,
            "cfg_scale": cfg_scale(cell.guidance), "prompt": PROMPT, "seed": SEED,
            "images": images_to_make(cell, repeats, warmup)}
    raw = _run_json([str(peer_python(venv)), str(PEER_WORKER), json.dumps(spec)])
    lines = [text for _, _, text in raw["log"]]
    load_lines = lines[: raw["images"][0]["log_from"]] if raw["images"] else lines
    res = {"engine": "stable-diffusion.cpp", "weights": wtype, "load_s": raw["load_s"],
           "peak_rss_bytes": raw["peak_rss_bytes"], "peak_rss_after_load_bytes": raw["peak_rss_after_load_bytes"],
           "library": {k: raw[k] for k in ("version", "commit", "sd_version", "system_info")},
           "load_log": {**parse_sdcpp_log(load_lines), "buffers": parse_sdcpp_buffers(load_lines)},
           "images": []}
    res["weight_bytes"] = res["load_log"].get("params_bytes", {}).get("total")
    for im in raw["images"]:
        steps = progress_step_seconds(im["progress"])
        res["images"].append({"steps": im["steps"], "image_s": im["wall_s"], "step_s": steps,
                              "phases_s": parse_sdcpp_log(lines[im["log_from"]:im["log_to"]])["phases_s"],
                              "distinct_pixel_values": im["distinct_pixel_values"]})
    res["log_lines"] = [f"{t:8.2f}s {text}" for t, _, text in raw["log"] if _worth_keeping(text)]
    return _summarise(res, cell, warmup)


def _worth_keeping(line: str) -> bool:
    return bool(re.search(r"Version|type stat|total params|completed|taking|System Info|threads|backend|wtype|"
                          r"Using|using|WARN|ERROR|unknown tensor", line))


def run_vqdm(model: Path, cell: Cell, bits: int, threads: int, repeats: int, warmup: int, dtype: str) -> dict:
    spec = {"model": str(model), "preset": cell.preset, "bits": bits, "threads": threads, "dtype": dtype,
            "resolution": cell.resolution, "guidance": cell.guidance, "images": images_to_make(cell, repeats, warmup)}
    res = _run_json([sys.executable, __file__, "--vqdm-worker", json.dumps(spec)])
    return _summarise(res, cell, warmup)


def _run_json(cmd: list[str]) -> dict:
    print("$", shlex.join(cmd)[:300], file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise SystemExit(f"worker failed (exit {proc.returncode}): {shlex.join(cmd)[:300]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summarise(res: dict, cell: Cell, warmup: int) -> dict:
    """image_s, unet_step_s and first_step_s of one worker's images, its warm-up images left out."""
    for im in [im for im in res["images"] if im["steps"] == cell.steps][:warmup]:
        im["warmup"] = True
    timed = [im for im in res["images"] if im["steps"] == cell.steps and not im.get("warmup")]
    stepped = [im for im in res["images"] if im["steps"] > 1 and not im.get("warmup")]
    res["image_s"] = min(im["image_s"] for im in timed)
    steady = [s for im in stepped if (s := steady_step(im["step_s"])) is not None]
    res["unet_step_s"] = min(steady) if steady else None
    res["first_step_s"] = min(im["step_s"][0] for im in timed if im["step_s"])
    return res


def vqdm_worker(spec: dict) -> dict:
    """One vqdm cell in this process: VQ U-Net with random codes + the file's text encoders and VAE,
    images through the serving runner."""
    import torch

    from bench_unet import DTYPES, build
    from vqdm.models import resident_weight_bytes
    from vqdm.models.single_file import load_single_file
    from vqdm.server.jobs import GenerationParams
    from vqdm.server.loader import prepare_replica
    from vqdm.server.runner import Member, run_batch
    from vqdm.server.settings import Settings

    torch.set_num_threads(spec["threads"])
    dtype = DTYPES[spec["dtype"]]
    t0 = time.perf_counter()
    unet = build(spec["preset"], "vq", spec["bits"], dtype, "cpu")
    pipe = load_single_file(spec["model"], dtype=dtype, unet=unet)
    replica = prepare_replica(pipe, "cpu", Settings(devices=["cpu"], dtype={"fp32": "float32", "bf16": "bfloat16"}[spec["dtype"]]))
    load_s = time.perf_counter() - t0
    rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stored = resident_weight_bytes(pipe.unet)["stored"]
    others = {name: sum(t.numel() * t.element_size() for t in [*getattr(pipe, name).parameters(), *getattr(pipe, name).buffers()])
              for name in ("text_encoder", "text_encoder_2", "vae")}
    images = []
    for steps, repeats in spec["images"]:
        for _ in range(repeats):
            params = GenerationParams(model="peer", prompt=PROMPT, negative_prompt=None, n=1, width=spec["resolution"],
                                      height=spec["resolution"], steps=steps, guidance=spec["guidance"], scheduler="euler",
                                      seed=SEED)
            t0 = time.perf_counter()
            out = run_batch(replica, [Member(params)])
            wall = time.perf_counter() - t0
            raw = out.images[0][0].tobytes()
            images.append({"steps": steps, "image_s": wall, "step_s": out.step_seconds,
                           "phases_s": {"text_encode": out.text_encode_s, "denoise": out.denoise_s,
                                        "vae_decode": out.vae_decode_s},
                           "distinct_pixel_values": len(set(raw[:: max(1, len(raw) // 16384)]))})
    return {"engine": "vqdm", "weights": f"vq{spec['bits']} random codes, {spec['dtype']}", "bits": spec["bits"],
            "dtype": spec["dtype"], "load_s": load_s, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_rss_after_load_bytes": rss_after_load, "weight_bytes": stored + sum(others.values()),
            "weight_bytes_by_part": {"unet": stored, **others}, "torch_threads": torch.get_num_threads(), "images": images}


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def plan_runs(cells: list[str], bits: list[int], with_f16: bool, dtypes: list[str] = ("fp32",),
              peer_types: list[str] | None = None) -> list[dict]:
    """Every worker run, in order: per cell, sd.cpp f16 (its dense), then per bit count vqdm (each dtype) and
    its sd.cpp peers (those in `peer_types`, when given)."""
    runs = []
    for name in cells:
        if with_f16:
            runs.append({"cell": name, "engine": "sdcpp", "weights": "f16"})
        for b in bits:
            runs += [{"cell": name, "engine": "vqdm", "weights": vqdm_label(b, dt), "bits": b, "dtype": dt} for dt in dtypes]
            runs += [{"cell": name, "engine": "sdcpp", "weights": t, "bits": b} for t in PEER_TYPES[b]
                     if peer_types is None or t in peer_types]
    return runs


def vqdm_label(bits: int, dtype: str) -> str:
    return f"vq{bits} random codes, {dtype}"


def merged_runs(previous: list[dict], new: dict) -> list[dict]:
    """A cell's runs with `new` in place of an earlier run of the same engine and weights (or appended)."""
    kept = [r for r in previous if (r["engine"], r["weights"]) != (new["engine"], new["weights"])]
    return kept + [new]


def _csv(text: str, choices) -> list:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in choices]
    if bad:
        raise SystemExit(f"unknown {bad[0]!r}; choose from {', '.join(map(str, choices))}")
    return items


COVERS = {"image_s": "one image: text encoders, every sampling step, VAE decode; min over repeats",
          "unet_step_s": "steady-state sampling step (U-Net pass(es) + sampler): mean of steps 2..N, "
                         f"N = {STEP_IMAGE_STEPS} extra image (made first) for 1-step cells",
          "first_step_s": "step 1 of the timed image (sd.cpp builds its graph there)",
          "peak_rss_bytes": "getrusage(RUSAGE_SELF) of the worker process",
          "weight_bytes": "sd.cpp: its total params memory line; vqdm: stored U-Net + text encoders + VAE"}


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(CELLS), help=f"cells, comma-separated ({', '.join(CELLS)})")
    ap.add_argument("--bits", default="4,3,2", help="vqdm bits to run, each against its sd.cpp peers")
    ap.add_argument("--peer-types", default=None,
                    help=f"sd.cpp types to run, comma-separated (default: every peer of --bits: {PEER_TYPES})")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of both engines")
    ap.add_argument("--repeats", type=int, default=2, help="timed images per worker (min reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed images per worker before the timed ones")
    ap.add_argument("--no-f16", action="store_true", help="skip sd.cpp's dense f16 run")
    ap.add_argument("--vqdm-dtype", default="fp32,bf16",
                    help="vqdm's compute dtypes, comma-separated (fp32: `vqdm serve`'s CPU default; bf16: --dtype bfloat16)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/vqdm-peer-sdcpp"),
                    help="where missing model files are made (sdxl-fp16.safetensors, sdxl-turbo-fp16.safetensors)")
    ap.add_argument("--sdxl-file", type=Path, help="an existing `vqdm make-model sdxl --single-file` fp16 file to use")
    ap.add_argument("--turbo-file", type=Path, help="the same for sdxl-turbo")
    ap.add_argument("--peer-venv", type=Path, default=REPO / ".venv-peer", help="venv for the sd.cpp bindings")
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks/results/peer_sdcpp.json")
    ap.add_argument("--merge", action="store_true",
                    help="keep --json's earlier runs, replacing those this invocation reruns (a sweep run in parts; "
                         "each run keeps its own commit, time and load)")
    ap.add_argument("--table", action="store_true", help="print --json as the README's markdown tables and exit")
    ap.add_argument("--dry-run", action="store_true", help="list the runs and files, run nothing")
    ap.add_argument("--note", default="", help="a remark stored in the JSON (e.g. that the machine was busy)")
    ap.add_argument("--vqdm-worker", metavar="SPEC", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.vqdm_worker:
        print(json.dumps(vqdm_worker(json.loads(a.vqdm_worker))), flush=True)
        return None
    if a.table:
        print(markdown_tables(json.loads(a.json.read_text())))
        return None
    cells = _csv(a.only, CELLS)
    bits = [int(b) for b in _csv(a.bits, [str(b) for b in PEER_TYPES])]
    dtypes = _csv(a.vqdm_dtype, ("fp32", "bf16"))
    peer_types = _csv(a.peer_types, [t for ts in PEER_TYPES.values() for t in ts]) if a.peer_types else None
    files = {"sdxl": a.sdxl_file or a.cache / "sdxl-fp16.safetensors",
             "sdxl-turbo": a.turbo_file or a.cache / "sdxl-turbo-fp16.safetensors"}
    runs = plan_runs(cells, bits, not a.no_f16, dtypes, peer_types)
    if a.dry_run:
        for name in cells:
            f = files[CELLS[name].preset]
            print(f"{name}: {asdict(CELLS[name])}, file {f}{'' if f.exists() else ' (to be made)'}")
        for r in runs:
            print(f"  {r['cell']:10s} {r['engine']:6s} {r['weights']} threads={a.threads} warmup={a.warmup} repeats={a.repeats}")
        print(f"writes {a.json}{' (merged)' if a.merge else ''}")
        return None

    from provenance import machine

    peer = ensure_peer_venv(a.peer_venv)
    invocation = {"command": "python " + shlex.join(sys.argv), "note": a.note, "threads": a.threads,
                  "repeats": a.repeats, "warmup_images": a.warmup,
                  "machine": {**machine("cpu"), "loadavg_at_start": os.getloadavg()}}
    result: dict = {"benchmark": "peer_sdcpp", "invocations": [], "prompt": PROMPT, "seed": SEED, "peer_build": peer,
                    "files": {}, "cells": {},
                    "vqdm_weights": "VQ U-Net of the file's architecture with random codes and codebooks (bench_unet.build: "
                                    "the same layers, shapes, bits and kernels as a quantized one; timing does not depend "
                                    "on code values), the file's own text encoders and VAE, all in the run's dtype",
                    "sdcpp_weights": "the file's fp16 tensors converted at load by sd.cpp's wtype option",
                    "covers": COVERS}
    if a.merge and a.json.exists():
        old = json.loads(a.json.read_text())
        if "invocations" not in old:
            raise SystemExit(f"{a.json} predates --merge (no 'invocations'); move it away or rerun without --merge")
        result.update({k: old[k] for k in ("invocations", "files", "cells")})
    result["invocations"].append(invocation)
    for name in cells:
        preset = CELLS[name].preset
        f = ensure_model(preset, files[preset])
        result["files"].setdefault(str(f), {})["vqdm"] = vqdm_view(f, bits)
    for r in runs:
        cell, f = CELLS[r["cell"]], files[CELLS[r["cell"]].preset]
        if r["engine"] == "vqdm":
            res = run_vqdm(f, cell, r["bits"], a.threads, a.repeats, a.warmup, r["dtype"])
        else:
            res = run_sdcpp(a.peer_venv, f, cell, r["weights"], a.threads, a.repeats, a.warmup)
            result["files"][str(f)].setdefault("sdcpp", {})[r["weights"]] = same_file_check(f, r["weights"], res["load_log"])
        res.update(loadavg_after=os.getloadavg(), commit=invocation["machine"].get("commit"),
                   measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), threads=a.threads)
        entry = result["cells"].setdefault(r["cell"], {"config": asdict(cell), "file": str(f), "runs": []})
        entry["runs"] = merged_runs(entry["runs"], res)
        print(f"{r['cell']} {res['engine']} {res['weights']}: image {res['image_s']:.2f}s, step "
              f"{res['unet_step_s'] if res['unet_step_s'] is None else round(res['unet_step_s'], 2)}s, peak RSS "
              f"{res['peak_rss_bytes'] / 1e9:.2f} GB", file=sys.stderr, flush=True)
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1))  # after every run: a long sweep keeps what it measured
    invocation["machine"]["loadavg_at_end"] = os.getloadavg()
    a.json.write_text(json.dumps(result, indent=1))
    print(f"wrote {a.json}", file=sys.stderr)
    return result


def markdown_tables(result: dict) -> str:
    """The README's tables: per cell, every run, and vqdm / sd.cpp at matching bits."""
    gb = lambda b: f"{b / 1e9:.2f} GB" if b else "–"  # noqa: E731
    sec = lambda x: f"{x:.1f} s" if x is not None else "–"  # noqa: E731
    out = []
    for name, cell in result["cells"].items():
        c = cell["config"]
        out.append(f"**{name}** ({c['resolution']}², {c['steps']} step{'s' if c['steps'] > 1 else ''}, "
                   f"guidance {c['guidance']}):\n")
        out.append("| engine, weights | image | U-Net step (steady) | first step | VAE decode | peak RSS | U-Net weights | all weights | commit |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for r in sorted(cell["runs"], key=_run_order):
            timed = [im for im in r["images"] if im["steps"] == c["steps"] and not im.get("warmup")]
            best = min(timed, key=lambda im: im["image_s"])
            vae = best["phases_s"].get("vae_decode", best["phases_s"].get("decode_first_stage"))
            unet = (r.get("weight_bytes_by_part", {}).get("unet")
                    or r.get("load_log", {}).get("params_bytes", {}).get("diffusion_model"))
            label = f"vqdm {r['weights'].replace(' random codes', '')}" if r["engine"] == "vqdm" else f"sd.cpp {r['weights']}"
            out.append(f"| {label} | {sec(r['image_s'])} | {sec(r['unet_step_s'])} | {sec(r['first_step_s'])} | {sec(vae)} "
                       f"| {gb(r['peak_rss_bytes'])} | {gb(unet)} | {gb(r['weight_bytes'])} | {str(r.get('commit', ''))[:7]} |")
        ratios = []
        for r in cell["runs"]:
            if r["engine"] != "vqdm":
                continue
            for t in PEER_TYPES[r["bits"]]:
                peer = next((p for p in cell["runs"] if p["engine"] != "vqdm" and p["weights"] == t), None)
                if peer is None:
                    continue
                ratio = lambda k: (f"{r[k] / peer[k]:.2f}×" if r.get(k) and peer.get(k) else "–")  # noqa: E731
                ratios.append(f"| vqdm {r['bits']}-bit {r['dtype']} / sd.cpp {t} | {ratio('image_s')} | {ratio('unet_step_s')} "
                              f"| {ratio('peak_rss_bytes')} | {ratio('weight_bytes')} |")
        if ratios:
            out += ["", "| vqdm / sd.cpp | image | U-Net step | peak RSS | all weights |", "|---|---|---|---|---|", *ratios]
        out.append("")
    return "\n".join(out)


def _run_order(r: dict) -> tuple:
    if r["engine"] == "vqdm":
        return (0, -r["bits"], r["dtype"])
    order = ["f16", "q4_K", "q4_0", "q3_K", "q2_K"]
    return (1, order.index(r["weights"]) if r["weights"] in order else 9, "")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))  # siblings: bench_unet (the VQ U-Net builder), provenance
    main()
