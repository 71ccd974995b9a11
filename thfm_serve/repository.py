"""Write the Triton model repository for THFM: every config.pbtxt, derived from the export specs.

The exporter (thfm_serve.export.build.export_repository) puts the graphs and the checkpoint's
serving assets into the repository and then calls ``write_repository``, which adds:

    <repo>/thfm_repository.json             manifest: target, precision, grid, limits, specs (read by the
                                            python models and by `thfm serve`)
    <repo>/<model>/config.pbtxt             for each of the nine models (thfm_serve.contract.protocol names)
    <repo>/<model>/1/model.py               for the python-backend models, copied from model_repository/

Targets:
- ``cpu``: every model runs in the python backend (the tritonserver bundled in nvidia-pytriton has
  no onnxruntime or TensorRT backend); vae_encoder/core/vae_decoder run their ONNX graph through
  onnxruntime inside the python model. KIND_CPU everywhere.
- ``gpu``: NVIDIA's Triton container: core is a TensorRT plan (core/1/model.plan, built by the
  exporter on a TensorRT host), the VAE graphs run in the onnxruntime backend, both KIND_GPU; the
  pre/post-processing and entry models stay python (KIND_CPU: decoding and resizing are CPU work).

Every dims/dtype/max_batch_size of the submodels comes from the SubmodelSpec (triton_dims,
max_batch, tensor names and dtypes); tensors between the python models are shaped after the spec
tensor they feed, so the ensembles' tensors agree by construction.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .config import ThfmConfig
from .contract import protocol
from .contract.geometry import latent_frames, patch_pixels, patches, video_frames
from .contract.params import Grid, Limits
from .contract.specs import Precision, SubmodelSpec, Target, parse_precision, parse_target
from .contract.tasks import DENSE_TASKS, SPARSE_TASKS, TASKS
from .errors import CheckpointError, ThfmError
from .serving.assets import load_task_embeddings, read_manifest
from .gpu_options import DEFAULT_CLIP_PIXELS, VaeGpuOptions, vae_batch_cap

logger = logging.getLogger(__name__)

# model_repository/ at the project root holds the model.py sources (committed with the code); an
# installed wheel carries them as package data of thfm_serve.model_repository.
def _sources() -> Path:
    tree = Path(__file__).resolve().parents[1] / "model_repository"
    if tree.is_dir():
        return tree
    from importlib.resources import files

    return Path(str(files("thfm_serve.model_repository")))


SOURCES = _sources()
VERSION = protocol.MODEL_VERSION
# The exporter writes the checkpoint's THFM config next to the core graph (export/build.py CONFIG_FILE).
CONFIG_FILE = protocol.THFM_CONFIG

PYTHON_ALWAYS = (protocol.PREPROCESS, protocol.POSTPROCESS_DENSE, protocol.POSTPROCESS_SPARSE, protocol.ENTRY_MODEL)
SUBMODELS = (protocol.VAE_ENCODER, protocol.CORE, protocol.VAE_DECODER)
ENSEMBLES = (protocol.DENSE_ENSEMBLE, protocol.SPARSE_ENSEMBLE)
ALL_MODELS = (protocol.PREPROCESS, *SUBMODELS, protocol.POSTPROCESS_DENSE, protocol.POSTPROCESS_SPARSE,
              *ENSEMBLES, protocol.ENTRY_MODEL)

# Dynamic batching, where it pays: the core (batch = tasks: the dense ensemble sends one core request
# per task at the same moment, and concurrent clients' windows of the same shape merge) and the
# VAE decoder (one request per dense task from the dense ensemble). The delay is what a request may
# wait for partners: 2 ms against a core forward of seconds on CPU and ~1 s on a GPU for the real
# model. The encoder is left without: one call per window, and a batched Wan VAE encode of full
# windows is the largest activation in the whole path.
QUEUE_DELAY_US = 2000
DYNAMIC_BATCHED = (protocol.CORE, protocol.VAE_DECODER)

_TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
                  "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL", "bytes": "TYPE_STRING"}


# --- a small protobuf text-format writer ---------------------------------------------------------

class Ident(str):
    """An enum value, written bare (TYPE_FP32, KIND_CPU)."""


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, Ident):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string literal is a valid text-format string for these values
    raise TypeError(f"cannot write {v!r} to a model config")


def _is_flat(d: Mapping[str, Any]) -> bool:
    return all(not isinstance(v, (dict, list)) or (isinstance(v, list) and all(not isinstance(x, dict) for x in v))
               or (isinstance(v, dict) and _is_flat(v) and len(v) <= 2) for v in d.values())


def _inline(d: Mapping[str, Any]) -> str:
    parts = []
    for k, v in d.items():
        if v is None:
            continue
        if isinstance(v, dict):
            parts.append(f"{k} {{ {_inline(v)} }}")
        elif isinstance(v, list):
            parts.append(f"{k}: [ {', '.join(_scalar(x) for x in v)} ]")
        else:
            parts.append(f"{k}: {_scalar(v)}")
    return " ".join(parts)


def to_pbtxt(fields: Mapping[str, Any], indent: int = 0) -> str:
    """dict -> protobuf text format: dicts are messages, lists of dicts repeated messages (maps too)."""
    pad = "  " * indent
    lines = []
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, dict):
            if _is_flat(value):
                lines.append(f"{pad}{key} {{ {_inline(value)} }}")
            else:
                lines.append(f"{pad}{key} {{\n{to_pbtxt(value, indent + 1)}\n{pad}}}")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            items = []
            for item in value:
                if _is_flat(item):
                    items.append(f"{pad}  {{ {_inline(item)} }}")
                else:
                    items.append(f"{pad}  {{\n{to_pbtxt(item, indent + 2)}\n{pad}  }}")
            lines.append(f"{pad}{key} [\n" + ",\n".join(items) + f"\n{pad}]")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(x) for x in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "\n".join(lines)


# --- config pieces --------------------------------------------------------------------------------

def _tensor(name: str, dtype: str, dims: Sequence[int], optional: bool = False) -> dict[str, Any]:
    if dtype not in _TRITON_DTYPES:
        raise ThfmError(f"tensor {name!r}: dtype {dtype} has no Triton type")
    out: dict[str, Any] = {"name": name, "data_type": Ident(_TRITON_DTYPES[dtype]), "dims": [int(d) for d in dims]}
    if optional:
        out["optional"] = True
    return out


def _spec_tensor(spec: SubmodelSpec, name: str, batched: bool, rename: str | None = None,
                 optional: bool = False) -> dict[str, Any]:
    """A spec tensor; batched=True leaves out the batch axis (max_batch_size > 0), else it is -1."""
    return _tensor(rename or name, spec.tensor(name).dtype, spec.triton_dims(name, drop_batch=batched), optional)


def _params(values: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"key": k, "value": {"string_value": str(v)}} for k, v in values.items()]


def _instances(kind: str, count: int = 1) -> list[dict[str, Any]]:
    return [{"count": count, "kind": Ident(kind)}]


def _front_queue(limits: Limits) -> dict[str, Any]:
    """Requests in flight at a front model (max_batch_size 0): a bounded wait queue.

    Triton's queue lives in the dynamic batcher, the only scheduler with a queue policy; with
    max_batch_size 0 it batches nothing (one request per execute, checked with tritonserver 2.51)
    and only bounds the queue. A request that finds max_in_flight requests waiting is rejected by
    tritonserver with UNAVAILABLE "Exceeds maximum queue size" (a client retries it later or on
    another server); the one the instance is running comes on top. max_queue_size 0 would mean
    unbounded, which Limits.validate rules out.
    """
    return {"default_queue_policy": {"max_queue_size": int(limits.max_in_flight)}}


def _clip_inputs() -> list[dict[str, Any]]:
    # Exactly one of the two is sent; the models check that and name the problem otherwise.
    return [_tensor(protocol.INPUT_VIDEO, "bytes", [1], optional=True),
            _tensor(protocol.INPUT_FRAMES, "uint8", [-1, -1, -1, 3], optional=True)]


def _task_output(task: str, num_joints: int) -> dict[str, Any]:
    """The entry model's (and the postprocess models') output for a task: processing.OUTPUT_KEYS layouts."""
    dims = {"depth": [-1, -1, -1], "normals": [-1, -1, -1, 3], "segmentation": [-1, -1, -1],
            "densepose": [-1, -1, -1, 3], "keypoints2d": [-1, num_joints, 2], "keypoints3d": [-1, num_joints, 3]}
    return _tensor(protocol.OUTPUT_FOR_TASK[task], "float32", dims[task])


def _joint_names_output(num_joints: int) -> dict[str, Any]:
    return _tensor(protocol.OUTPUT_JOINT_NAMES, "bytes", [num_joints])


def _header(name: str, target: Target, precision: Precision) -> str:
    return (f"# {name}: written by thfm_serve.repository.write_repository from the export specs "
            f"(target {target.value}, precision {precision.value}).\n"
            "# Regenerate it (thfm export / write_repository) rather than editing it by hand.\n")


# --- the configs ----------------------------------------------------------------------------------

def model_configs(specs: Mapping[str, SubmodelSpec], target: str | Target, precision: str | Precision,
                  cfg: ThfmConfig, grid: Grid, limits: Limits, threads: int = 0,
                  queue_delay_us: int = QUEUE_DELAY_US, window_pipeline: bool | None = None) -> dict[str, str]:
    """model name -> config.pbtxt text, for every model the repository serves.

    window_pipeline: the entry model runs the next window's encoder and core while this window is
    decoded. Default: on for a GPU repository, where the decoder's GPU work and the next window's
    can fill each other's host-side gaps (not measured: no GPU has served a multi-window clip here);
    off on CPU, where every model's onnxruntime session already uses all the cores and two at once
    only contend for them.
    """
    target, precision = parse_target(target), parse_precision(precision)
    if window_pipeline is None:
        window_pipeline = target == Target.GPU
    enc, core, dec = specs[protocol.VAE_ENCODER], specs[protocol.CORE], specs[protocol.VAE_DECODER]
    tasks = [t for t in TASKS if t in cfg.tasks]
    dense = [t for t in tasks if t in DENSE_TASKS]
    sparse = [t for t in tasks if t in SPARSE_TASKS]
    k = cfg.num_joints
    grid_params = grid.to_params()
    configs: dict[str, dict[str, Any]] = {}
    vae_batch = _vae_batch(target, grid, enc.max_batch)

    # preprocess: the ensembles' first step. Its outputs are shaped as the spec tensors they feed.
    configs[protocol.PREPROCESS] = {
        "name": protocol.PREPROCESS, "backend": "python", "max_batch_size": 0,
        "input": _clip_inputs(),
        "output": [_spec_tensor(enc, protocol.ENCODER_IN, False, rename=protocol.CLIP),
                   _tensor(protocol.GEOMETRY, "int64", [3])]
                  + [_spec_tensor(core, protocol.CORE_IN[1], False, rename=protocol.TEXT_PREFIX + t) for t in tasks],
        # The ensembles' front door: bounded like the entry model's (see _front_queue).
        "dynamic_batching": _front_queue(limits),
        "instance_group": _instances("KIND_CPU"),
        # The ensembles' batch axis is the clip's windows, so a request may take max_batch windows.
        "parameters": _params({**grid_params, **limits.to_params(), protocol.PARAM_MAX_WINDOWS: vae_batch}),
    }

    # vae_encoder / core / vae_decoder: the exported graphs, batched (batch axis dropped from dims).
    for spec in (enc, core, dec):
        conf: dict[str, Any] = {"name": spec.name}
        if target == Target.CPU:
            conf["backend"] = "python"
        elif spec.name == protocol.CORE:
            conf.update(platform="tensorrt_plan", default_model_filename="model.plan")
        else:
            conf.update(platform="onnxruntime_onnx", default_model_filename=protocol.ONNX_FILE)
        conf["max_batch_size"] = spec.max_batch if spec.name == protocol.CORE else vae_batch
        conf["input"] = [_spec_tensor(spec, n, True) for n in spec.input_names]
        conf["output"] = [_spec_tensor(spec, n, True) for n in spec.output_names]
        if spec.name in DYNAMIC_BATCHED:
            conf["dynamic_batching"] = {"max_queue_delay_microseconds": int(queue_delay_us)}
        conf["instance_group"] = _instances("KIND_CPU" if target == Target.CPU else "KIND_GPU")
        if target == Target.CPU:
            conf["parameters"] = _params({protocol.PARAM_THREADS: threads})
        elif spec.name != protocol.CORE:
            conf["parameters"] = _params(VaeGpuOptions().to_params())
        configs[spec.name] = conf

    configs[protocol.POSTPROCESS_DENSE] = {
        "name": protocol.POSTPROCESS_DENSE, "backend": "python", "max_batch_size": 0,
        "input": [_tensor(protocol.GEOMETRY, "int64", [3])]
                 + [_spec_tensor(dec, protocol.DECODER_OUT, False, rename=protocol.MAPS_PREFIX + t, optional=True)
                    for t in dense],
        "output": [_task_output(t, k) for t in dense],
        "instance_group": _instances("KIND_CPU"),
        "parameters": _params(grid_params),
    }
    configs[protocol.POSTPROCESS_SPARSE] = {
        "name": protocol.POSTPROCESS_SPARSE, "backend": "python", "max_batch_size": 0,
        "input": [_tensor(protocol.GEOMETRY, "int64", [3]),
                  _spec_tensor(core, protocol.KP2D, False, optional=True),
                  _spec_tensor(core, protocol.KP3D, False, optional=True)],
        "output": [_task_output(t, k) for t in sparse] + [_joint_names_output(k)],
        "instance_group": _instances("KIND_CPU"),
        "parameters": _params(grid_params),
    }
    if dense:
        configs[protocol.DENSE_ENSEMBLE] = _ensemble(protocol.DENSE_ENSEMBLE, dense, k)
    if sparse:
        configs[protocol.SPARSE_ENSEMBLE] = _ensemble(protocol.SPARSE_ENSEMBLE, sparse, k)

    outputs = [_task_output(t, k) for t in tasks] + ([_joint_names_output(k)] if sparse else [])
    configs[protocol.ENTRY_MODEL] = {
        "name": protocol.ENTRY_MODEL, "backend": "python", "max_batch_size": 0,
        "input": _clip_inputs() + [_tensor(protocol.INPUT_TASKS, "bytes", [-1]),
                                   _tensor(protocol.INPUT_OUTPUT_SIZE, "bytes", [1], optional=True)],
        "output": outputs,
        "dynamic_batching": _front_queue(limits),
        "instance_group": _instances("KIND_CPU"),
        # protocol.PARAM_*: a client reads these (get_model_config) to plan its windows and sizes.
        "parameters": _params({**grid_params, **limits.to_params(), protocol.PARAM_VAE_MAX_BATCH: vae_batch,
                               protocol.PARAM_WINDOW_PIPELINE: int(window_pipeline)}),
    }
    # An exported submodel's header names its own precision (an int8 VAE beside an fp32 core, say);
    # the pre/post-processing models carry the repository's.
    return {name: _header(name, target, parse_precision(specs[name].precision) if name in specs else precision)
            + to_pbtxt(conf) + "\n" for name, conf in configs.items()}


# Pixels one VAE call may hold on CPU: one 17x256x256 window. onnxruntime's CPU arena keeps what the
# largest call needed; a Wan2.1-sized decoder row at 17x256x256 takes about 4.5 GB, and a six-task
# request decoding its four dense rows in one call had the decoder's process killed by the OOM killer
# on a 24 GB machine (perf/results/e2e_ck13_17x256x256.md). Rows decoded one after another cost the
# same arithmetic.
CPU_VAE_CALL_PIXELS = 17 * 256 * 256


def _vae_batch(target: Target, grid: Grid, max_batch: int) -> int:
    """Rows per VAE call (gpu_options.vae_batch_cap): windows up to CPU_VAE_CALL_PIXELS on CPU, one
    default clip's pixels on a GPU."""
    budget = CPU_VAE_CALL_PIXELS if target == Target.CPU else DEFAULT_CLIP_PIXELS
    return vae_batch_cap(grid.window, grid.height, grid.width, max_batch, budget)


# The core output a keypoint task takes from its own core step (that step's row has the task's prompt).
_KEYPOINTS = {"keypoints2d": protocol.KP2D, "keypoints3d": protocol.KP3D}


def _ensemble(name: str, tasks: list[str], num_joints: int) -> dict[str, Any]:
    """A fixed DAG computing every task of its path; the encoder output feeds one core step per task."""
    dense = name == protocol.DENSE_ENSEMBLE
    step_pre = {"model_name": protocol.PREPROCESS, "model_version": -1,
                "input_map": [{"key": n, "value": n} for n in (protocol.INPUT_VIDEO, protocol.INPUT_FRAMES)],
                "output_map": [{"key": n, "value": n} for n in (protocol.CLIP, protocol.GEOMETRY)]
                + [{"key": protocol.TEXT_PREFIX + t, "value": protocol.TEXT_PREFIX + t} for t in tasks]}
    step_enc = {"model_name": protocol.VAE_ENCODER, "model_version": -1,
                "input_map": [{"key": protocol.ENCODER_IN, "value": protocol.CLIP}],
                "output_map": [{"key": protocol.ENCODER_OUT, "value": "latent"}]}
    steps = [step_pre, step_enc]
    for t in tasks:
        if dense:
            out_map = [{"key": protocol.CORE_OUT[0], "value": f"pred_{t}"}]
        else:
            out_map = [{"key": _KEYPOINTS[t], "value": _KEYPOINTS[t]}]
        steps.append({"model_name": protocol.CORE, "model_version": -1,
                      "input_map": [{"key": protocol.CORE_IN[0], "value": "latent"},
                                    {"key": protocol.CORE_IN[1], "value": protocol.TEXT_PREFIX + t}],
                      "output_map": out_map})
        if dense:
            steps.append({"model_name": protocol.VAE_DECODER, "model_version": -1,
                          "input_map": [{"key": protocol.DECODER_IN, "value": f"pred_{t}"}],
                          "output_map": [{"key": protocol.DECODER_OUT, "value": protocol.MAPS_PREFIX + t}]})
    post_in = [{"key": protocol.GEOMETRY, "value": protocol.GEOMETRY}]
    if dense:
        post_in += [{"key": protocol.MAPS_PREFIX + t, "value": protocol.MAPS_PREFIX + t} for t in tasks]
    else:
        post_in += [{"key": _KEYPOINTS[t], "value": _KEYPOINTS[t]} for t in tasks]
    post_out = [{"key": protocol.OUTPUT_FOR_TASK[t], "value": protocol.OUTPUT_FOR_TASK[t]} for t in tasks]
    outputs = [_task_output(t, num_joints) for t in tasks]
    if not dense:
        post_out.append({"key": protocol.OUTPUT_JOINT_NAMES, "value": protocol.OUTPUT_JOINT_NAMES})
        outputs.append(_joint_names_output(num_joints))
    steps.append({"model_name": protocol.POSTPROCESS_DENSE if dense else protocol.POSTPROCESS_SPARSE,
                  "model_version": -1, "input_map": post_in, "output_map": post_out})
    return {"name": name, "platform": "ensemble", "max_batch_size": 0, "input": _clip_inputs(), "output": outputs,
            "ensemble_scheduling": {"step": steps}}


# --- the writer -----------------------------------------------------------------------------------

def default_grid(specs: Mapping[str, SubmodelSpec]) -> Grid:
    """Window = the frame count the VAE graphs were exported for; resolution = the export (opt) shape."""
    enc = specs[protocol.VAE_ENCODER]
    lt = enc.dims("opt")["latent_frames"]
    dims = specs[protocol.CORE].dims("opt")
    return Grid(video_frames(lt), patch_pixels(dims["hp"]), patch_pixels(dims["wp"])).validate()


def check_grid(specs: Mapping[str, SubmodelSpec], grid: Grid) -> None:
    """The grid must be what the graphs take: the VAE's static window, a size inside every profile."""
    grid.validate()
    for spec in specs.values():
        dims = {"latent_frames": latent_frames(grid.window), "hp": patches(grid.height), "wp": patches(grid.width)}
        if "latent_frames" in spec.static_dims and dims["latent_frames"] != spec.dims("opt")["latent_frames"]:
            raise ThfmError(f"window {grid.window} frames differs from the {video_frames(spec.dims('opt')['latent_frames'])}"
                            f"-frame window {spec.name} was exported for")
        spec.check_dims(dims)


def write_repository(
    repo: str | Path,
    specs: Mapping[str, SubmodelSpec],
    target: str | Target = Target.CPU,
    precision: str | Precision = Precision.FP32,
    cfg: ThfmConfig | None = None,
    *,
    embeddings: Mapping[str, np.ndarray] | None = None,
    grid: Grid | None = None,
    limits: Limits | None = None,
    threads: int = 0,
    queue_delay_us: int = QUEUE_DELAY_US,
    sources: str | Path | None = None,
    report: Mapping[str, Any] | None = None,
    window_pipeline: bool | None = None,
) -> dict[str, Any]:
    """Write every config.pbtxt, the python models' model.py and the repository manifest into `repo`.

    cfg/embeddings: the checkpoint's THFM config and task embeddings; when not given they must be
    in core/1/ already (the exporter writes thfm_config.json and task_embeddings.npz there).
    grid: the model grid (default: the export shape, see default_grid); limits: request limits
    (default: those the repository already has, so that re-exporting keeps an operator's limits;
    Limits() for a new repository); window_pipeline: see model_configs (default by target).
    Returns a summary: models written and artifacts still missing (e.g. a TensorRT plan to build).
    """
    target, precision = parse_target(target), parse_precision(precision)
    repo = Path(repo)
    if repo.name == "triton":
        raise ThfmError(f"model repository {repo} is named 'triton', which breaks torch when it is on sys.path; "
                        "choose another name")
    missing_specs = [m for m in SUBMODELS if m not in specs]
    if missing_specs:
        raise ThfmError(f"write_repository needs the specs of {', '.join(SUBMODELS)}; missing {missing_specs}")
    sources = Path(sources) if sources is not None else SOURCES
    core_dir = repo / protocol.CORE / VERSION
    # Everything is checked before the first file is written.
    grid = grid or default_grid(specs)
    check_grid(specs, grid)
    limits = (limits or current_limits(repo) or Limits()).validate()
    cfg = ThfmConfig.load(core_dir / CONFIG_FILE) if cfg is None else cfg.validate()
    configs = model_configs(specs, target, precision, cfg, grid, limits, threads, queue_delay_us, window_pipeline)

    core_dir.mkdir(parents=True, exist_ok=True)
    (core_dir / CONFIG_FILE).write_text(cfg.to_json())
    if embeddings is not None:
        np.savez(core_dir / protocol.TASK_EMBEDDINGS, **{t: np.asarray(embeddings[t], dtype=np.float32) for t in cfg.tasks})
    load_task_embeddings(core_dir / protocol.TASK_EMBEDDINGS, cfg)  # present and shaped as cfg says
    python_models = [m for m in configs if m in PYTHON_ALWAYS or (target == Target.CPU and m in SUBMODELS)]

    for name, text in configs.items():
        mdir = repo / name
        (mdir / VERSION).mkdir(parents=True, exist_ok=True)
        (mdir / "config.pbtxt").write_text(text)
        model_py = mdir / VERSION / "model.py"
        if name in python_models:
            src = sources / name / "model.py"
            if not src.is_file():
                raise ThfmError(f"model source {src} is missing (the model_repository/ folder of the THFM sources)")
            shutil.copyfile(src, model_py)
        elif model_py.exists():
            model_py.unlink()  # left by an earlier write for the other target
    for name in set(ALL_MODELS) - set(configs):
        if (repo / name / "config.pbtxt").exists():
            # A path this checkpoint no longer has (e.g. no sparse task): unload it, keep its files.
            (repo / name / "config.pbtxt").unlink()

    manifest = {
        "format": protocol.MANIFEST_FORMAT, "format_version": protocol.MANIFEST_VERSION,
        "target": target.value, "precision": precision.value,
        "models": list(configs), "python_models": python_models,
        "grid": asdict(grid), "limits": asdict(limits),
        # Kept so that set_limits can rewrite the configs without changing anything else.
        "threads": int(threads), "queue_delay_us": int(queue_delay_us),
        "specs": {n: specs[n].to_dict() for n in SUBMODELS},
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checkpoint": (report or {}).get("checkpoint"),
        "checkpoint_sha256": (report or {}).get("checkpoint_sha256"),
    }
    (repo / protocol.REPOSITORY_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    missing = missing_artifacts(repo, manifest)
    for m in missing:
        logger.warning("repository %s: %s", repo, m)
    logger.info("wrote Triton configs for %s (%s, %s) in %s", ", ".join(configs), target.value, precision.value, repo)
    return {"repo": str(repo), "target": target.value, "precision": precision.value, "models": list(configs),
            "python_models": python_models, "missing": missing}


def current_limits(repo: str | Path) -> Limits | None:
    """The limits written in a repository's manifest, or None when it has none (or no manifest)."""
    try:
        manifest = read_manifest(repo)
    except CheckpointError:
        return None
    stored = manifest.get("limits")
    if not isinstance(stored, dict):
        return None
    try:
        # Fields a newer Limits added take their defaults; unknown ones (from a newer writer) are dropped.
        return Limits(**{k: v for k, v in stored.items() if k in Limits.__dataclass_fields__})
    except TypeError:
        return None


def set_limits(repo: str | Path, limits: Limits | None = None, **changes: int) -> Limits:
    """Rewrite an existing repository's configs with new request limits; returns the limits written.

    `limits` replaces them all; keyword changes (max_frames=..., max_in_flight=...) start from the
    limits the repository has now. Everything else (target, precision, grid, specs, the checkpoint
    it came from) is kept from the manifest. A running tritonserver reads configs only at load, so
    restart `thfm serve` afterwards.
    """
    repo = Path(repo)
    manifest = read_manifest(repo)
    try:
        specs = {n: SubmodelSpec.from_dict(d) for n, d in manifest["specs"].items()}
        grid = Grid(**manifest["grid"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{repo / protocol.REPOSITORY_MANIFEST} lacks or garbles {e}") from None
    unknown = sorted(set(changes) - set(Limits.__dataclass_fields__))
    if unknown:
        raise ThfmError(f"unknown limits {unknown}; known: {', '.join(Limits.__dataclass_fields__)}")
    current = current_limits(repo) or Limits()
    new = limits if limits is not None else Limits(**{**asdict(current), **changes})
    write_repository(repo, specs, manifest["target"], manifest["precision"], grid=grid, limits=new,
                     threads=int(manifest.get("threads", 0)),
                     queue_delay_us=int(manifest.get("queue_delay_us", QUEUE_DELAY_US)),
                     report={k: manifest.get(k) for k in ("checkpoint", "checkpoint_sha256")})
    logger.info("limits of %s: %s", repo, ", ".join(f"{k}={v}" for k, v in asdict(new).items()))
    return new


def missing_artifacts(repo: Path, manifest: Mapping[str, Any]) -> list[str]:
    """What a written repository still lacks to be served (graphs, the TensorRT plan, model.py files)."""
    repo = Path(repo)
    out = []
    target = manifest.get("target")
    for name in manifest.get("models", []):
        vdir = repo / name / VERSION
        if not (repo / name / "config.pbtxt").is_file():
            out.append(f"{name}/config.pbtxt is missing")
        if name in manifest.get("python_models", []) and not (vdir / "model.py").is_file():
            out.append(f"{name}/{VERSION}/model.py is missing")
        if name in SUBMODELS:
            need = protocol.PLAN_FILE if (target == Target.GPU.value and name == protocol.CORE) else protocol.ONNX_FILE
            if not (vdir / need).is_file():
                hint = ("build it on a TensorRT host (thfm export --target gpu)" if need == "model.plan"
                        else "export it (thfm export)")
                out.append(f"{name}/{VERSION}/{need} is missing: {hint}")
    for f in (CONFIG_FILE, protocol.TASK_EMBEDDINGS):
        if not (repo / protocol.CORE / VERSION / f).is_file():
            out.append(f"{protocol.CORE}/{VERSION}/{f} is missing")
    return out


def check_repository(repo: str | Path, target: str | Target | None = None,
                     tensorrt_version: str | None = None) -> dict[str, Any]:
    """The manifest of a servable THFM repository; CheckpointError naming what is wrong otherwise.

    For a gpu repository the plan's TensorRT version must be the serving image's (tensorrt_version,
    or what engine_version_problem can detect)."""
    repo = Path(repo)
    if not repo.is_dir():
        raise CheckpointError(f"model repository {repo} is not a directory")
    if repo.name == "triton":
        raise CheckpointError(f"model repository {repo} is named 'triton', which breaks torch when it is on sys.path")
    manifest = read_manifest(repo)
    if target is not None and manifest.get("target") != parse_target(target).value:
        raise CheckpointError(f"{repo} is a {manifest.get('target')!r} repository, not {parse_target(target).value!r}")
    missing = missing_artifacts(repo, manifest)
    if missing:
        raise CheckpointError(f"{repo} is not a complete THFM repository: " + "; ".join(missing))
    if manifest.get("target") == Target.GPU.value:
        problem = engine_version_problem(repo, tensorrt_version)
        if problem:
            raise CheckpointError(f"{repo}: {problem}")
    return manifest


def engine_version_problem(repo: str | Path, serving: str | None = None) -> str | None:
    """A GPU repository's TensorRT plan against the serving TensorRT (default: the version this
    process can see, gpu_options.serving_tensorrt_version); None when they agree or either is unknown."""
    from .gpu_options import plan_version_problem, serving_tensorrt_version

    path = Path(repo) / protocol.CORE / VERSION / protocol.MODEL_MANIFEST
    core = json.loads(path.read_text()) if path.is_file() else {}
    return plan_version_problem(core.get("engine"), serving or serving_tensorrt_version())
