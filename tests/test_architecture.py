"""The package's layers and what may import what (docs/architecture.md), checked on the source.

Every module under `vqdm/` is parsed with `ast`; every import counts, at module level, inside a
function or under `if TYPE_CHECKING:`. A module belongs to the longest layer in `RULES` that names
it or a package above it, and may import its own layer, `OPEN_TO_ALL`, and what its row lists.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vqdm"

OPEN_TO_ALL = ("vqdm", "vqdm.errors")  # the package root (__version__, error re-exports) and the errors
PIPELINE_DEPS = ("vqdm.quantizer", "vqdm.quantizer.layer", "vqdm.models", "vqdm.kernels", "vqdm.vq_format")
ANYTHING = ("*",)
# layer                       -> the layers it may import besides its own. "X (package only)": the
#                                package's __init__ (its public entry points), none of its modules.
RULES: dict[str, tuple[str, ...]] = {
    "vqdm": (),
    "vqdm.errors": (),
    "vqdm.vq_format": (),
    "vqdm.single_file_flags": (),  # standard library only: the server's parser adds these flags too
    "vqdm.kernels": ("vqdm.vq_format",),
    "vqdm.models": ("vqdm.kernels", "vqdm.vq_format", "vqdm.single_file_flags"),
    "vqdm.quantizer.layer": ("vqdm.vq_format",),
    # the quantizer's shared modules (sampling, unet_samples, checkpoint, recipes): never a pipeline
    "vqdm.quantizer": ("vqdm.quantizer.layer", "vqdm.models", "vqdm.kernels", "vqdm.vq_format"),
    # the three pipelines: the shared quantizer and below, never one another
    "vqdm.quantizer.quantize": PIPELINE_DEPS,
    "vqdm.quantizer.distill": PIPELINE_DEPS,
    "vqdm.quantizer.evaluate": PIPELINE_DEPS,
    # the service loads artifacts; it never imports the quantizer
    "vqdm.server": ("vqdm.models", "vqdm.kernels (package only)", "vqdm.vq_format", "vqdm.single_file_flags"),
    "vqdm.cli": ANYTHING,  # loads the command modules of every area
}
# Third-party packages only some layers may import: scikit-learn is a test extra (the digit judge).
EXTERNAL_ONLY_IN: dict[str, tuple[str, ...]] = {"sklearn": ("vqdm.quantizer.evaluate",)}


@dataclass(frozen=True)
class Violation:
    module: str
    line: int
    target: str
    rule: str

    @property
    def key(self) -> str:
        return f"{self.module} -> {self.target}"

    def __str__(self) -> str:
        path = self.module.replace(".", "/")
        return f"{path}.py:{self.line}: imports {self.target}: {self.rule}"


def package_modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted name -> file for every module under `root` (a package is named by its __init__)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def layer_of(module: str) -> str | None:
    if module == "vqdm":
        return "vqdm"
    hits = [layer for layer in RULES if layer != "vqdm" and (module == layer or module.startswith(layer + "."))]
    return max(hits, key=len, default=None)


def imports_of(module: str, source: str, modules: set[str]) -> list[tuple[int, str]]:
    """(line, imported module) for every import of the source, relative ones resolved; a
    `from X import y` imports X.y when that is a module, else X."""
    is_package = module in modules and any(m.startswith(module + ".") for m in modules)
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((node.lineno, sub if sub in modules else base))
    return found


def check_module(module: str, source: str, modules: set[str]) -> list[Violation]:
    own = layer_of(module)
    if own is None:
        return [Violation(module, 1, "-", "the module belongs to no layer: add its layer to RULES")]
    allowed = RULES[own]
    out = []
    for line, target in imports_of(module, source, modules):
        top = target.split(".")[0]
        if top in EXTERNAL_ONLY_IN and own not in EXTERNAL_ONLY_IN[top]:
            out.append(Violation(module, line, top, f"{top} may be imported only by "
                                 f"{', '.join(EXTERNAL_ONLY_IN[top])}"))
        if top != "vqdm":
            continue
        if target not in modules:
            out.append(Violation(module, line, target, "no such module in vqdm (a stale import?)"))
            continue
        theirs = layer_of(target)
        if (target in OPEN_TO_ALL or theirs == own or allowed == ANYTHING or theirs in allowed
                or (f"{theirs} (package only)" in allowed and target == theirs)):
            continue
        why = (f"only the package {theirs} itself, not its modules" if f"{theirs} (package only)" in allowed
               else "not allowed")
        out.append(Violation(module, line, target, f"layer {own} may import {', '.join(allowed) or 'nothing'} "
                             f"(besides itself and {', '.join(OPEN_TO_ALL)}); {theirs}: {why}"))
    return out


def check_package(root: Path = PACKAGE) -> list[Violation]:
    files = package_modules(root)
    names = set(files)
    return [v for mod, path in files.items() for v in check_module(mod, path.read_text(), names)]


def test_imports_follow_the_layer_rules():
    violations = [str(v) for v in check_package()]
    assert not violations, "imports that break the layer rules (docs/architecture.md):\n" + "\n".join(violations)


def test_every_rule_names_a_real_package_or_module():
    names = set(package_modules())
    for layer, allowed in RULES.items():
        assert layer in names, layer
        for entry in allowed:
            assert entry == "*" or entry.removesuffix(" (package only)") in names, (layer, entry)


def test_checker_reports_deliberate_violations():
    names = set(package_modules()) | {"vqdm.server.fake"}
    source = ("from vqdm.models import load_pipeline\n"  # allowed
              "from vqdm.quantizer import quantize_weight\n"  # the server may not import the quantizer
              "from vqdm.kernels import vq_linear\n"  # allowed: the kernels' public entry points
              "def f():\n"
              "    from vqdm.kernels.dispatch import choose_backend\n"  # kernels internals, in a function
              "    from .registry import ServedModel\n"  # a stale relative import
              "    import sklearn.linear_model\n")
    got = {(v.line, v.target) for v in check_module("vqdm.server.fake", source, names)}
    assert got == {(2, "vqdm.quantizer"), (5, "vqdm.kernels.dispatch"), (6, "vqdm.server.registry"),
                   (7, "sklearn")}, got
    [v] = check_module("vqdm.quantizer.distill.fake", "import vqdm.quantizer.evaluate.run\n", names)
    assert str(v).startswith("vqdm/quantizer/distill/fake.py:1: imports vqdm.quantizer.evaluate.run: layer "
                             "vqdm.quantizer.distill may import")
    [v] = check_module("vqdm.quantizer.sampling", "from vqdm.quantizer.quantize import run\n", names)
    assert v.target == "vqdm.quantizer.quantize.run"  # a shared module never imports a pipeline
    [v] = check_module("vqdm.models.fake", "if True:\n    from vqdm.server.registry import X\n", names)
    assert (v.line, v.rule) == (2, "no such module in vqdm (a stale import?)")
    assert check_module("vqdm.cli", "import vqdm.server.cli, vqdm.quantizer.quantize.cli\n", names) == []
