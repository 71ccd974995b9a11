"""Checkpoint -> ONNX / TensorRT export for Triton (`thfm export`), installed as thfm_serve.export.

``specs`` (shapes, profiles, Triton dims) imports only numpy and the THFM config, so the repository
writer and clients can use it without torch; ``export_repository`` (build.py) is imported on first
use because it pulls in torch, diffusers and onnxruntime.
"""

from __future__ import annotations

from typing import Any

from thfm_serve.contract.specs import SubmodelSpec, TensorSpec, Tolerance, build_specs

__all__ = ["SubmodelSpec", "TensorSpec", "Tolerance", "build_specs", "export_repository"]


def __getattr__(name: str) -> Any:
    if name == "export_repository":
        from .build import export_repository

        return export_repository
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
