"""The stable-diffusion.cpp side of benchmarks/peer_sdcpp.py, run by the benchmark venv's python (which
holds the bindings, and neither torch nor vqdm):

    .venv-peer/bin/python benchmarks/peer_sdcpp_worker.py '{"model": F, "wtype": "q3_K", ...}'

Loads F converting its weights to `wtype` at load (sd.cpp's own option), generates the requested images
and prints one JSON line: the library's version, commit and system info, every line it logged (with the
seconds since start), the per-step progress it reported, wall seconds, and this process's peak RSS.
Parsing the log is the driver's job (peer_sdcpp.parse_sdcpp_log), so this file stays a thin recorder.
"""
from __future__ import annotations

import ctypes
import json
import resource
import sys
import time


def main(spec: dict) -> dict:
    import stable_diffusion_cpp as sdc  # the bindings; their import registers a printing log callback
    from stable_diffusion_cpp import StableDiffusion

    t_start = time.perf_counter()
    log: list[list] = []

    @sdc.sd_log_callback
    def on_log(level: int, text: bytes, data: ctypes.c_void_p) -> None:
        log.append([round(time.perf_counter() - t_start, 3), level, text.decode("utf-8", errors="replace").rstrip()])
        print(f"[sd.cpp {log[-1][0]:8.2f}s] {log[-1][2]}", file=sys.stderr, flush=True)  # kept if the library crashes

    # Replaces the bindings' printing callback; `on_log` must outlive every call into the library (main's frame).
    sdc.sd_set_log_callback(on_log, ctypes.c_void_p(0))

    t0 = time.perf_counter()
    sd = StableDiffusion(model_path=spec["model"], wtype=spec["wtype"], n_threads=spec["threads"],
                         vae_decode_only=True, verbose=True)
    load_s = time.perf_counter() - t0
    rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    images = []
    for steps, repeats in spec["images"]:
        for _ in range(repeats):
            progress: list[list] = []
            first_log = len(log)
            t0 = time.perf_counter()
            out = sd.generate_image(
                prompt=spec["prompt"], width=spec["resolution"], height=spec["resolution"], cfg_scale=spec["cfg_scale"],
                sample_method="euler", scheduler="discrete", sample_steps=steps, seed=spec["seed"],
                progress_callback=lambda step, total, secs, p=progress: p.append([step, total, secs]))
            wall = time.perf_counter() - t0
            raw = out[0].tobytes() if out else b""
            images.append({"steps": steps, "wall_s": wall, "progress": progress, "log_from": first_log,
                           "log_to": len(log), "size": list(out[0].size) if out else None,
                           "distinct_pixel_values": len(set(raw[:: max(1, len(raw) // 16384)]))})
    return {"version": sdc.__version__, "commit": sdc.sd_commit().decode(), "sd_version": sdc.sd_version().decode(),
            "system_info": sdc.sd_get_system_info().decode(), "load_s": load_s, "images": images, "log": log,
            "peak_rss_after_load_bytes": rss_after_load,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
