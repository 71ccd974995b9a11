"""How the code depends on itself: no import cycle between packages, export depends on the package
(never the reverse), and the contract, the gRPC client and `thfm perf` import no torch.

The import graph is read from the source (ast, every import statement, including the ones deferred
into functions), so a cycle that only shows at run time is caught too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the import name it installs as (pyproject.toml's package-dir).
FOLDERS = {"thfm_serve": "thfm_serve", "export": "thfm_serve.export", "client": "thfm_serve.client"}


def _modules():
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            yield path, ".".join([package, *parts]), is_package


def _imports(path: Path, name: str, is_package: bool):
    """Every module name an import statement in `path` names (absolute, relative ones resolved)."""
    base = name if is_package else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                mod = ".".join(parts + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod
            yield from (f"{mod}.{a.name}" for a in node.names)


def _unit(module: str) -> str | None:
    """The package a module belongs to: a subpackage of thfm_serve, or one of its top-level modules."""
    parts = module.split(".")
    if parts[0] != "thfm_serve":
        return None
    return ".".join(parts[:2]) if len(parts) > 1 else "thfm_serve"


def import_graph() -> dict[str, set[str]]:
    found = list(_modules())
    units = {_unit(name) for _, name, _ in found}
    graph: dict[str, set[str]] = {u: set() for u in units}
    for path, name, is_package in found:
        here = _unit(name)
        for mod in _imports(path, name, is_package):
            there = _unit(mod)
            if there in units and there != here and there != "thfm_serve":
                graph[here].add(there)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state:
                found = visit(v)
                if found:
                    return found
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state:
            found = visit(u)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_packages():
    graph = import_graph()
    assert "thfm_serve.contract" in graph and "thfm_serve.serving" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_export_depends_on_the_package_never_the_reverse():
    graph = import_graph()
    assert "thfm_serve.contract" in graph["thfm_serve.export"]
    importers = sorted(u for u, deps in graph.items() if "thfm_serve.export" in deps)
    assert importers == [], f"{importers} import the export toolchain"


def test_the_contract_depends_only_on_the_errors():
    graph = import_graph()
    assert graph["thfm_serve.contract"] <= {"thfm_serve.errors"}, graph["thfm_serve.contract"]


# A meta-path finder that makes torch (and what only torch code needs) unimportable.
_NO_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'diffusers', 'transformers', 'onnxscript'):
            raise ImportError(f'{name} is blocked in this test')
sys.meta_path.insert(0, Block())
"""


def test_client_perf_and_contract_import_no_torch():
    code = _NO_TORCH + """
import thfm_serve.contract.geometry, thfm_serve.contract.params, thfm_serve.contract.specs
import thfm_serve.contract.tasks, thfm_serve.contract.vae_window, thfm_serve.contract.windows
import thfm_serve.client, thfm_serve.client.command, thfm_serve.client.wire
import thfm_serve.perf, thfm_serve.commands.perf
from thfm_serve.cli import build_parser
from thfm_serve.client.core import Run
from thfm_serve.client.wire import ServerInfo
import numpy as np
build_parser()  # every subcommand registers without torch
info = ServerInfo('h:1', 'thfm', 9, 64, 64, None, None, None)
run = Run(__import__('thfm_serve.client.core', fromlist=['Clip']).Clip(np.zeros((31, 16, 16, 3), np.uint8)), ['depth'], info)
assert len(run.plan) == 4, run.plan
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit('torch was importable: the block did not work')
assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules), 'torch got imported'
print('ok')
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
