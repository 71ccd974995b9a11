"""Manifests: what each artifact was made from, so a stale one is re-exported, never silently reused.

``<repo>/<model>/1/manifest.json`` holds a ``key`` (checkpoint hash, precision, spec, exporter recipe,
calibration identity for int8) plus what was produced (file hashes and sizes, validation summary,
versions). An export whose key equals the stored key and whose files still hash the same is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from thfm_serve.contract import protocol

logger = logging.getLogger(__name__)

MANIFEST_NAME = protocol.MODEL_MANIFEST
# Bump when the export recipe changes in a way that changes the ONNX (islands, quantisation,
# cleanup passes): every existing artifact then counts as stale.
RECIPE_VERSION = 3  # 2: attention through ThfmAttnProcessor (no ScatterND rotary); int8 recipe per target; 3: hook calibration
# The parts of a checkpoint the exported graphs are made from (text_encoder/ is not: prompts are cached).
HASHED_PARTS = ("transformer", "vae", "thfm")


def checkpoint_hash(path: str | Path) -> str:
    """sha256 over the files of transformer/, vae/ and thfm/ (relative names and contents)."""
    root = Path(path)
    h = hashlib.sha256()
    t0 = time.perf_counter()
    total = 0
    for part in HASHED_PARTS:
        for f in sorted((root / part).rglob("*")):
            if not f.is_file():
                continue
            h.update(str(f.relative_to(root)).encode() + b"\0")
            with open(f, "rb") as fh:
                h.update(hashlib.file_digest(fh, "sha256").digest())
            total += f.stat().st_size
    logger.info("checkpoint hash: %.1f GB in %.1f s", total / 1e9, time.perf_counter() - t0)
    return h.hexdigest()


def file_hashes(paths: list[Path]) -> dict[str, dict[str, Any]]:
    out = {}
    for p in paths:
        with open(p, "rb") as f:
            out[p.name] = {"sha256": hashlib.file_digest(f, "sha256").hexdigest(), "bytes": p.stat().st_size}
    return out


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("thfm-serve", "torch", "diffusers", "onnx", "onnxruntime", "onnxscript", "onnx-ir", "polygraphy", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def read_manifest(version_dir: Path) -> dict[str, Any] | None:
    path = Path(version_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        logger.warning("%s is unreadable; the artifact counts as stale", path)
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON write (a crash never leaves half a manifest that could match)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=_jsonable)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; manifests are read by the server's user too
    os.replace(tmp, path)


def _jsonable(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def normalise(data: Any) -> Any:
    """Round-trip through JSON so a fresh key compares equal to a stored one (tuples -> lists)."""
    return json.loads(json.dumps(data, sort_keys=True, default=_jsonable))


def stale_reason(manifest: dict[str, Any] | None, key: dict[str, Any], version_dir: Path) -> str | None:
    """None when the stored artifact matches `key` and its files are intact; else why not."""
    if manifest is None:
        return "no manifest"
    stored = manifest.get("key")
    if stored != normalise(key):
        diff = sorted(k for k in set(stored or {}) | set(key) if (stored or {}).get(k) != normalise(key).get(k))
        return f"manifest differs in {', '.join(diff)}"
    for name, info in (manifest.get("files") or {}).items():
        p = Path(version_dir) / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != info.get("bytes"):
            return f"{name} changed size"
        with open(p, "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != info.get("sha256"):
                return f"{name} changed"
    if not manifest.get("files"):
        return "manifest lists no files"
    return None
