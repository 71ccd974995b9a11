"""perf/ holds scripts, not a package (benchmark-only code stays out of the wheel): tests load one
by file path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PERF = Path(__file__).resolve().parents[1] / "perf"


def load_perf_script(stem: str, module_name: str | None = None) -> ModuleType:
    """perf/<stem>.py as a module, registered in sys.modules (dataclasses look their module up there)."""
    name = module_name or stem
    spec = importlib.util.spec_from_file_location(name, PERF / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
