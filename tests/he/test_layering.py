"""``lightning_privacy.he`` is layered: every module imports only from below, and alone (issue 11, §1).

The layers, bottom up, in the shape of ``onnx.reference`` (base -> one module per op -> the list):
pure IR and parameters; packing plans and serialization (numpy); SEAL objects; keys (the client's
and the owner's) and evaluation; sealed models; the compiled model; the ONNX importer; the compiler.
``export`` and ``nn`` (torch) stand apart.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_privacy.he

HE_ROOT = Path(lightning_privacy.he.__file__).parent
REPO_ROOT = str(HE_ROOT.parents[1])

#: Layer of every module (relative to ``lightning_privacy.he``; "" is the package itself). A module
#: may import only modules of lower layers. A new module gets its place here, deliberately.
LAYERS: dict[str, int] = {
    "polynomial": 0, "params": 0, "report": 0, "export": 0, "nn": 0, "memory": 0,
    "graph": 1,
    "depth": 2,
    "packing.batch": 3, "packing.single": 3,
    "packing.sealed": 4,
    "packing": 5,
    "input_range": 6, "serialization": 6,
    "wire": 7, "arithmetic": 7,
    "parallel": 8, "context": 8,
    "ciphertexts": 9, "kernels.batch": 9, "kernels.single": 9, "kernels.sealed": 9,
    "kernels": 10,
    "keys": 11, "evaluation": 11, "owner": 11,
    "perturbation": 11,
    "sealed": 12,
    "model": 13,
    "onnx.base": 14,
    "onnx.activations": 15, "onnx.convolution": 15, "onnx.elementwise": 15, "onnx.linear": 15, "onnx.shapes": 15,
    "onnx.ops": 16,
    "onnx.importer": 17,
    "onnx": 18,
    "compiler": 19,
    "": 20,
}  # fmt: skip


def _modules() -> dict[str, Path]:
    found = {}
    for path in HE_ROOT.rglob("*.py"):
        parts = path.relative_to(HE_ROOT).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        found[".".join(parts)] = path
    return found


def _imports(path: Path, module: str) -> tuple[set[str], list[str]]:
    """Modules of ``lightning_privacy.he`` imported at module level, and imports inside functions."""
    tree = ast.parse(path.read_text())
    top, nested = set(), []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def target(node: ast.ImportFrom) -> str:
        if node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if package else []
            return "lightning_privacy.he." + ".".join(filter(None, [*base, node.module or ""]))
        return node.module or ""

    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:  # ``from pkg import submodule`` imports the submodule, ``from module import name`` the module
            source = target(node)
            submodules = [f"{source}.{a.name}" for a in node.names]
            names = [n for n in submodules if _relative(n) in LAYERS] or [source]
        inside = [n for n in names if n == "lightning_privacy.he" or n.startswith("lightning_privacy.he.")]
        if node.col_offset > 0:
            nested += [n for n in names if n.startswith("lightning_privacy")]
        for name in inside:
            if _relative(name) in LAYERS and _relative(name) != module:
                top.add(_relative(name))
    return top, nested


def _relative(name: str) -> str:
    return name.removeprefix("lightning_privacy.he").removeprefix(".")


def test_every_module_has_a_layer():
    assert set(_modules()) == set(LAYERS)


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_imports_only_from_below_and_never_inside_functions(module):
    top, nested = _imports(_modules()[module], module)
    upward = sorted(m for m in top if LAYERS[m] >= LAYERS[module] and not (module == "" or m.startswith(f"{module}.")))
    assert not upward, f"{module or 'he'} (layer {LAYERS[module]}) imports {upward} from its own layer or above"
    if module != "":
        below = [m for m in top if m.startswith(f"{module}.")]
        assert all(LAYERS[m] < LAYERS[module] for m in below)
    assert not nested, f"{module or 'he'} imports {nested} inside a function or a conditional block"


def test_each_module_imports_alone_in_a_fresh_interpreter_in_reverse_order():
    names = [f"lightning_privacy.he.{m}" if m else "lightning_privacy.he" for m in sorted(LAYERS, reverse=True)]
    running, failures = [], []
    pending = list(names)
    while pending or running:
        while pending and len(running) < 4:
            name = pending.pop(0)
            process = subprocess.Popen(
                [sys.executable, "-c", f"import {name}"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=REPO_ROOT,
            )
            running.append((name, process))
        name, process = running.pop(0)
        _, err = process.communicate()
        if process.returncode != 0:
            failures.append(f"{name}: {err.strip().splitlines()[-1] if err.strip() else process.returncode}")
    assert not failures, failures
