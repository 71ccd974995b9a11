"""What the python models read from a THFM model repository once, in initialize: the manifest, the
export specs, the checkpoint's THFM config and the cached task embeddings."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import TASKS, ThfmConfig
from ..contract import protocol
from ..contract.protocol import MANIFEST_FORMAT, MANIFEST_VERSION, REPOSITORY_MANIFEST, TASK_EMBEDDINGS, THFM_CONFIG
from ..contract.specs import SubmodelSpec
from ..errors import CheckpointError


@dataclass
class RepositoryAssets:
    """What the python models read from the repository once, in initialize."""

    root: Path
    config: ThfmConfig
    specs: dict[str, SubmodelSpec]
    manifest: dict[str, Any]

    @property
    def tasks(self) -> list[str]:
        return [t for t in TASKS if t in self.config.tasks]

    def embeddings(self) -> dict[str, np.ndarray]:
        return load_task_embeddings(self.root / protocol.CORE / protocol.MODEL_VERSION / TASK_EMBEDDINGS, self.config)


def repository_root(model_dir: str | Path) -> Path:
    """args["model_repository"] of a python model is <repo>/<model>; the repository is its parent."""
    return Path(model_dir).resolve().parent


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The repository manifest; CheckpointError when `root` is not a THFM repository."""
    path = Path(root) / REPOSITORY_MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{root} is not a THFM model repository: {REPOSITORY_MANIFEST} is missing "
                              "(write one with `thfm export` or thfm_serve.repository.write_repository)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{path} is not a THFM repository manifest (format {data.get('format')!r})"
                              if isinstance(data, dict) else f"{path} is not a THFM repository manifest")
    if data.get("format_version") != MANIFEST_VERSION:
        raise CheckpointError(f"{path} has format_version {data.get('format_version')!r}; this code reads "
                              f"{MANIFEST_VERSION}: rewrite the repository with this version of thfm")
    return data


def load_assets(root: str | Path) -> RepositoryAssets:
    root = Path(root)
    manifest = read_manifest(root)
    try:
        specs = {name: SubmodelSpec.from_dict(d) for name, d in manifest["specs"].items()}
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{root / REPOSITORY_MANIFEST} lacks or garbles {e}") from None
    cfg = ThfmConfig.load(root / protocol.CORE / protocol.MODEL_VERSION / THFM_CONFIG)
    return RepositoryAssets(root, cfg, specs, manifest)


def load_task_embeddings(path: str | Path, cfg: ThfmConfig) -> dict[str, np.ndarray]:
    """task -> float32 [text_len, text_dim] for every task the config serves."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            emb = {k: np.asarray(data[k], dtype=np.float32) for k in data.files}
    except FileNotFoundError:
        raise CheckpointError(f"task embeddings {path} are missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable .npz: {e}") from None
    missing = [t for t in cfg.tasks if t not in emb]
    if missing:
        raise CheckpointError(f"{path} lacks embeddings for tasks {missing}")
    for task, e in emb.items():
        if e.shape != (cfg.text_len, cfg.text_dim):
            raise CheckpointError(f"{path}: embedding {task!r} has shape {list(e.shape)}, expected "
                                  f"[{cfg.text_len}, {cfg.text_dim}]")
    return {t: emb[t] for t in TASKS if t in cfg.tasks}

