"""Per-model handlers: what each python model's initialize parses once and its execute runs per request."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from ..config import DENSE_TASKS, SPARSE_TASKS
from ..contract import protocol
from ..contract.params import _int_param, grid_from_params, limits_from_params, model_parameters, read_params
from ..contract.protocol import GEOMETRY, KP2D, KP3D, MAPS_PREFIX, PARAM_MAX_WINDOWS
from .. import budget
from ..errors import ShapeError
from .assets import load_assets, repository_root
from .ensemble import postprocess_dense, postprocess_sparse, preprocess
from .entry import ModelCall, entry_outputs, run_entry
from .requests import check_requested_outputs, read_clip, read_tasks


class EntryModel:
    """The `thfm` entry model: settings parsed and assets loaded once, in initialize."""

    input_names = (protocol.INPUT_VIDEO, protocol.INPUT_FRAMES, protocol.INPUT_TASKS, protocol.INPUT_OUTPUT_SIZE)

    def __init__(self, model_config: Mapping[str, Any], model_dir: str | Path, call: ModelCall):
        params = model_parameters(model_config)
        self.grid = grid_from_params(params)
        self.limits = limits_from_params(params)
        self.assets = load_assets(repository_root(model_dir))
        self.embeddings = self.assets.embeddings()
        self.call = call
        self.output_names = frozenset(o["name"] for o in model_config.get("output", []))
        entry = read_params(params)
        self.vae_max_batch, self.window_pipeline = entry.vae_max_batch, entry.window_pipeline

    def handle(self, inputs: Mapping[str, np.ndarray | None], wanted: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """The outputs for one request; `wanted` is request.requested_output_names() (checked against
        the tasks before any work, so that asking for an output of a task not in 'tasks' is an error
        rather than a silently empty response)."""
        tasks = read_tasks(inputs.get(protocol.INPUT_TASKS), self.assets.tasks)
        check_requested_outputs(wanted, tasks, self.output_names)
        output_size = budget.read_output_size(inputs.get(protocol.INPUT_OUTPUT_SIZE))
        joints, grid_hw = len(self.assets.config.joint_names), (self.grid.height, self.grid.width)
        budget.check_declared_video(inputs.get(protocol.INPUT_VIDEO), tasks, output_size, grid_hw, joints, self.limits,
                                    self.grid.window)
        frames = read_clip(inputs.get(protocol.INPUT_VIDEO), inputs.get(protocol.INPUT_FRAMES), self.limits)
        output_hw = budget.output_resolution(output_size, frames.shape[1:3], grid_hw)
        budget.check_response(tasks, frames.shape[0], output_hw, joints, self.limits.max_response_bytes,
                              grid_hw=grid_hw, window=self.grid.window)
        results = run_entry(frames, tasks, self.grid, self.assets.config, self.embeddings, self.call,
                            output_hw, self.vae_max_batch, self.window_pipeline)
        return entry_outputs(results)


class PreprocessModel:
    """The `preprocess` model (the ensembles' first step): grid, limits and embeddings read once."""

    input_names = (protocol.INPUT_VIDEO, protocol.INPUT_FRAMES)

    def __init__(self, model_config: Mapping[str, Any], model_dir: str | Path):
        params = model_parameters(model_config)
        self.grid = grid_from_params(params)
        self.limits = limits_from_params(params)
        self.max_windows = _int_param(params, PARAM_MAX_WINDOWS)
        assets = load_assets(repository_root(model_dir))
        self.embeddings = assets.embeddings()
        self.joints = len(assets.config.joint_names)

    def handle(self, inputs: Mapping[str, np.ndarray | None], wanted: Iterable[str]) -> dict[str, np.ndarray]:
        wanted = list(wanted)
        frames = read_clip(inputs.get(protocol.INPUT_VIDEO), inputs.get(protocol.INPUT_FRAMES), self.limits)
        # The ensemble's tasks are those whose prompt it wires up; it answers at the input's size.
        tasks = [t for t in self.embeddings if protocol.TEXT_PREFIX + t in wanted]
        budget.check_response(tasks, frames.shape[0], frames.shape[1:3], self.joints, self.limits.max_response_bytes,
                              fixed_tasks=protocol.ENTRY_MODEL)
        return preprocess(frames, self.grid, self.embeddings, self.max_windows, wanted)


class PostprocessModel:
    """postprocess_dense / postprocess_sparse: dense serves the tasks whose maps_<task> inputs its
    config has; sparse the keypoint tasks of the checkpoint."""

    def __init__(self, model_config: Mapping[str, Any], model_dir: str | Path, dense: bool):
        params = model_parameters(model_config)
        grid = grid_from_params(params)
        self.window, self.overlap = grid.window, grid.window_overlap
        self.cfg = load_assets(repository_root(model_dir)).config
        self.dense = dense
        names = [i["name"] for i in model_config.get("input", [])]
        if dense:
            self.tasks = [t for t in DENSE_TASKS if MAPS_PREFIX + t in names]
            self.input_names = (GEOMETRY, *[MAPS_PREFIX + t for t in self.tasks])
        else:
            self.tasks = [t for t in SPARSE_TASKS if t in self.cfg.tasks]
            self.input_names = (GEOMETRY, KP2D, KP3D)

    def handle(self, inputs: Mapping[str, np.ndarray | None]) -> dict[str, np.ndarray]:
        if inputs.get(GEOMETRY) is None:
            raise ShapeError(f"missing input {GEOMETRY!r}")
        if self.dense:
            maps = {t: inputs[MAPS_PREFIX + t] for t in self.tasks if inputs.get(MAPS_PREFIX + t) is not None}
            if not maps:
                raise ShapeError(f"no {MAPS_PREFIX}<task> input: send at least one of "
                                 f"{', '.join(MAPS_PREFIX + t for t in self.tasks)}")
            return postprocess_dense(inputs[GEOMETRY], maps, self.window, self.cfg.depth_code, self.overlap)
        kps = {t: inputs[k] for t, k in (("keypoints2d", KP2D), ("keypoints3d", KP3D))
               if t in self.tasks and inputs.get(k) is not None}
        if not kps:
            raise ShapeError(f"send at least one of {KP2D!r}, {KP3D!r}")
        return postprocess_sparse(inputs[GEOMETRY], kps, self.window, self.cfg.joint_names, self.overlap)

