"""LoRA adapters a server (or `vqdm generate`) holds: parse the `--lora` specs, load every adapter
onto every replica within the memory budget, and check what a request asks for.

Each replica gets one `vqdm.models.lora.LoraRuntime`; the runner activates a batch's adapter set
on it around the pipeline call. Batches never mix adapter sets (the set is part of the batch key).
An adapter is attached to every served model it fits; one that fits none stops start-up with the
error naming its first bad key.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from vqdm.models.lora import MAX_ABS_SCALE, LoraError, LoraRuntime, load_lora, lora_files
from vqdm.models.lora_keys import lora_file_weights
from vqdm.models.weight_cache import parse_bytes
from vqdm.server.errors import APIError

if TYPE_CHECKING:
    from vqdm.server.loader import ServedModel
    from vqdm.server.settings import Settings

log = logging.getLogger("vqdm.server")
LORA_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_LORAS_PER_REQUEST = 8


@dataclass(frozen=True)
class LoraSpec:
    name: str
    path: Path


def parse_lora_specs(text: str) -> list[LoraSpec]:
    """'NAME=PATH', or 'PATH' (a file named after its stem, or a folder: each .safetensors in it)."""
    name, sep, path = text.partition("=")
    if not sep:
        name, path = "", text
    name, path = name.strip(), Path(path.strip()).expanduser()
    if not str(path):
        raise ValueError(f"lora {text!r}: empty path; write NAME=PATH, e.g. pixel-art=/loras/pixel-art.safetensors")
    if path.is_dir():
        if name:
            raise ValueError(f"lora {text!r}: a folder loads every .safetensors in it under its file stem; "
                             "give the folder without NAME=")
        specs = [LoraSpec(p.stem, p) for p in lora_files(path)]
    else:
        specs = [LoraSpec(name or path.stem, path)]
    for s in specs:
        if not LORA_NAME_RE.match(s.name):
            raise ValueError(f"lora name {s.name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return specs


def lora_specs(entries: Sequence[str]) -> list[LoraSpec]:
    specs = [s for e in entries for s in parse_lora_specs(e)]
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"lora name(s) given twice: {', '.join(dup)}")
    return specs


def held_bytes(adapters: Sequence[tuple[int, int]]) -> int:
    """What a replica holds for adapters of (bytes at rest, bytes built) each, at most: all of them at
    rest, plus the branch set a request builds (kept for the next batch) at its largest, the
    MAX_LORAS_PER_REQUEST adapters with the most bytes built."""
    return sum(rest for rest, _ in adapters) + sum(sorted(built for _, built in adapters)[-MAX_LORAS_PER_REQUEST:])


def _over_budget(spec: LoraSpec, dev: str, budget: int, held: int, need: int, what: str) -> ValueError:
    return ValueError(f"lora {spec.name!r} does not fit the LoRA memory budget of {budget / 1e6:.2f} MB on {dev}: "
                      f"it needs {need / 1e6:.2f} MB ({what}), {held / 1e6:.2f} MB are held already; raise "
                      "--lora-memory-budget / VQDM_LORA_MEMORY_BUDGET or load fewer adapters")


def attach_loras(models: Sequence["ServedModel"], settings: "Settings") -> None:
    """Load every configured adapter onto every replica of every model it fits, within the budget."""
    specs = lora_specs(settings.loras)
    budget = parse_bytes(settings.lora_memory_budget)
    for model in models:
        model.loras = {}
        for replica in model.replicas.values():
            if replica.loras is None:
                replica.loras = LoraRuntime(replica.pipe)
    held: dict[tuple[str, str], list[tuple[int, int]]] = {}  # (model, device) -> (at rest, built) per adapter
    for spec in specs:
        errors = []
        least = 2 * lora_file_weights(spec.path)  # fp16 at rest, from the header: checked before reading
        for model in models:
            for dev, replica in model.replicas.items():
                adapters = held.setdefault((model.id, dev), [])
                before = held_bytes(adapters)
                if before + least > budget:
                    raise _over_budget(spec, dev, budget, before, least,
                                       "at least, its weights in fp16 by the file's header; the file was not read")
                known = replica.loras.adapters.get(spec.name)
                if known is not None and known.source == str(spec.path):
                    adapter = known  # already attached by an earlier app on the same models (tests)
                else:
                    try:
                        adapter = load_lora(spec.path, replica.pipe, spec.name)
                    except LoraError as e:
                        errors.append(f"{model.id}: {e}")
                        break
                    if known is not None:  # same name, another file: the new configuration wins
                        replica.loras.remove(spec.name)
                        known = None
                entry = (adapter.nbytes, replica.loras.built_nbytes(adapter))
                need = held_bytes([*adapters, entry]) - before
                if before + need > budget:
                    raise _over_budget(spec, dev, budget, before, need,
                                       f"{entry[0] / 1e6:.2f} MB at rest in fp16, and its branch in the compute "
                                       "dtype, cached while requests use it")
                adapters.append(entry)
                if known is None:
                    replica.loras.add(adapter)
                model.loras[spec.name] = adapter.card()
        if not any(spec.name in m.loras for m in models):
            raise ValueError(f"lora {spec.name!r} fits no served model: {'; '.join(errors)}")
        for e in errors:
            log.warning("lora %s not attached to %s", spec.name, e)
        log.info("lora %s (%s) attached to %s", spec.name, spec.path,
                 ", ".join(m.id for m in models if spec.name in m.loras))


def check_request_loras(choices, model: "ServedModel") -> tuple[tuple[str, float], ...]:
    """A request's `loras` as ((name, scale), ...) sorted by name, or a 400 naming the entry."""
    if not choices:
        return ()
    if len(choices) > MAX_LORAS_PER_REQUEST:
        raise APIError(400, f"at most {MAX_LORAS_PER_REQUEST} LoRAs per request (got {len(choices)})", param="loras",
                       code="invalid_value")
    seen: dict[str, float] = {}
    for i, c in enumerate(choices):
        if c.name not in model.loras:
            raise APIError(400, f"LoRA {c.name!r} is not loaded for model {model.id!r}; available: "
                                f"{', '.join(model.loras) or 'none'} (GET /v1/models)",
                           param=f"loras.{i}.name", code="lora_not_found")
        if not -MAX_ABS_SCALE <= c.scale <= MAX_ABS_SCALE:
            raise APIError(400, f"LoRA {c.name!r}: scale {c.scale:g} is outside [-{MAX_ABS_SCALE:g}, {MAX_ABS_SCALE:g}]",
                           param=f"loras.{i}.scale", code="invalid_value")
        if c.name in seen:
            raise APIError(400, f"LoRA {c.name!r} is named twice", param=f"loras.{i}.name", code="invalid_value")
        seen[c.name] = float(c.scale)
    return tuple(sorted((n, s) for n, s in seen.items() if s != 0.0))
