"""`export_repository`: checkpoint -> validated ONNX (and TensorRT engine) in a Triton model repository.

Layout written (the Triton config.pbtxt / model.py files are the repository writer's job; see
thfm_serve.repository, called at the end when it exists)::

    <repo>/core/1/model.onnx [+ model.onnx.data]   transformer + THFM tokens/heads (precision applies here)
    <repo>/core/1/task_embeddings.npz              cached prompt embeddings, one [text_len, text_dim] per task
    <repo>/core/1/thfm_config.json                 the checkpoint's thfm/config.json (tasks, joints, clip)
    <repo>/core/1/model.plan                       --target gpu: TensorRT engine (+ timing cache)
    <repo>/core/1/polygraphy/                      validation inputs/outputs as polygraphy JSON
    <repo>/vae_encoder/1/model.onnx                fp32 (int8 Q/DQ, or fp32 run by OpenVINO in bf16: --vae-precision),
    <repo>/vae_decoder/1/model.onnx                the same; frames static at the window
    <repo>/<model>/1/manifest.json                 key (checkpoint hash, precision, spec, recipe), files, validation
    <repo>/export_report.json                      this run: per-model status, numbers, drift, engine

Each model is exported into a staging folder and moved into place only after it validated, so a
failed export never leaves a model that looks valid.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from thfm_serve.config import ThfmConfig
from thfm_serve.errors import CheckpointError, ExportError, ThfmError
from thfm_serve.machine import read_cpu
from thfm_serve.contract.geometry import latent_size, patch_pixels, video_frames
from thfm_serve.contract.protocol import (
    CORE,
    DECODER_IN,
    ENCODER_IN,
    MODEL_VERSION,
    ONNX_FILE,
    TASK_EMBEDDINGS,
    THFM_CONFIG,
    VAE_DECODER,
    VAE_ENCODER,
)

from . import manifest as mf
from .calibration import calibration_grid, calibration_set, clip_latent, default_clips, procedural_clips, task_texts
from .onnx_export import check_structure, export_onnx, initializer_dtypes, onnx_files, op_counts, trace_dims
from .precision import (QUANTIZED, check_core_runtime, check_target_precision, check_target_vae_precision,
                        check_vae_runtime, default_core_runtime, default_precision,
                        default_vae_precision, default_vae_runtime, lowered_core,
                        precision_summary)
from thfm_serve.contract.specs import (AUTO_RUNTIME, MAX_BATCH, VAE_DRIFT_BOUNDS, Precision, Runtime, SubmodelSpec, Target,
                                       build_specs, default_runtime, parse_precision, parse_runtime, parse_target,
                                       parse_vae_precision)
from thfm_serve.serving.sessions import runs_in_openvino
from .validate import (OnnxVae, RowMemo, check_vae_drift, describe_drift_region, make_runner, once_per_input, task_drift,
                       torch_runner, torch_vae, validate_values, vae_drift)
from thfm_serve.contract.vae_window import decode_in_window, encode_in_window

logger = logging.getLogger(__name__)

MODELS = (CORE, VAE_ENCODER, VAE_DECODER)
# Where the serving side reads them (contract.protocol).
VERSION = MODEL_VERSION
MODEL_FILE = ONNX_FILE
EMBEDDINGS_FILE = TASK_EMBEDDINGS
CONFIG_FILE = THFM_CONFIG
REPORT_FILE = "export_report.json"
DRIFT_SEED = 1234  # the drift clip differs from the calibration clips (seed 0)


def export_repository(
    checkpoint: str | Path,
    repo: str | Path,
    target: str | Target = Target.CPU,
    precision: str | Precision | None = None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    calibration: Iterable[str | Path] | None = None,
    *,
    models: Iterable[str] | None = None,
    build_engine: bool = True,
    force: bool = False,
    max_batch: int = MAX_BATCH,
    max_frames: int | None = None,
    max_height: int | None = None,
    max_width: int | None = None,
    calibration_clips: int | None = None,
    write_configs: bool = True,
    vae_precision: str | Precision | None = Precision.FP32,
    core_runtime: str | Runtime | None = Runtime.ONNXRUNTIME,
    vae_runtime: str | Runtime | None = None,
) -> dict[str, Any]:
    """Export (or reuse) every submodel into `repo`; returns the report (also in <repo>/export_report.json).

    Raises ThfmError subclasses for every user-caused problem (checkpoint, precision, target, shapes)
    and ExportError for failed validation or a missing TensorRT (after everything before it ran).
    precision: None takes the target's default (precision.default_precision: bf16 on gpu; on cpu the
    recipe for this machine's instruction sets, thfm_serve.machine.cpu_recipe).
    write_configs: call thfm_serve.repository.write_repository (Triton configs) at the end, also when
    the engine stage stops (the configs do not depend on the plan).
    vae_precision: the VAE graphs' precision (fp32; for --target cpu also int8, quantize.VAE_RECIPE, or bf16,
        the fp32 graph run by OpenVINO in bf16 on a CPU with bf16 instructions). None takes the
        machine's (precision.default_vae_precision), as `thfm export` does without --vae-precision.
    core_runtime: what runs the core on the cpu target: onnxruntime, or openvino (an int8 or fp32 core;
        the export validates it in OpenVINO). None takes the machine's (precision.default_core_runtime),
        as `thfm export` does without --core-runtime.
    vae_runtime: what runs the VAE graphs on the cpu target: onnxruntime, or openvino (fp32 in f32, bf16
        in bf16; the only runtime of a bf16 VAE). None: the precision's (contract.specs.default_runtime:
        OpenVINO for bf16, onnxruntime otherwise); AUTO_RUNTIME: the machine's
        (precision.default_vae_runtime), as `thfm export` does without --vae-runtime.
    """
    t_start = time.perf_counter()
    target = parse_target(target)
    chosen_by = "--precision"
    if precision is None:
        precision, chosen_by = default_precision(target)
        logger.info("--target %s, no --precision: %s (%s)", target.value, precision.value, chosen_by)
    else:
        precision = parse_precision(precision)
    check_target_precision(target, precision)
    vae_chosen_by = "--vae-precision"
    if vae_precision is None:
        vae_precision, vae_chosen_by = default_vae_precision(target)
        logger.info("--target %s, no --vae-precision: VAE %s (%s)", target.value, vae_precision.value, vae_chosen_by)
    vae_precision = parse_vae_precision(vae_precision)
    check_target_vae_precision(target, vae_precision)
    core_runtime_chosen_by = "--core-runtime"
    if core_runtime is None:
        core_runtime, core_runtime_chosen_by = default_core_runtime(target, precision)
        logger.info("--target %s, no --core-runtime: core in %s (%s)", target.value, core_runtime.value,
                    core_runtime_chosen_by)
    core_runtime = parse_runtime(core_runtime)
    check_core_runtime(target, precision, core_runtime)
    vae_runtime_chosen_by = "--vae-runtime"
    if vae_runtime is None:
        vae_runtime, vae_runtime_chosen_by = default_runtime(VAE_DECODER, vae_precision.value), "the VAE precision"
    elif vae_runtime == AUTO_RUNTIME:
        vae_runtime, vae_runtime_chosen_by = default_vae_runtime(target, vae_precision)
        logger.info("--target %s, no --vae-runtime: VAE in %s (%s)", target.value, vae_runtime.value,
                    vae_runtime_chosen_by)
    vae_runtime = parse_runtime(vae_runtime)
    check_vae_runtime(target, vae_precision, vae_runtime)
    chosen = _choose_models(models)
    repo = Path(repo)
    if repo.name == "triton":
        # torch._dynamo imports any `triton` folder on sys.path as the OpenAI Triton compiler.
        raise ThfmError(f"model repository {repo} is named 'triton', which breaks torch when it is on sys.path; "
                        "choose another name (e.g. model_repository)")
    checkpoint = Path(checkpoint)
    cfg = _load_config(checkpoint)
    specs = build_specs(cfg, frames, height, width, precision=precision, max_batch=max_batch,
                        max_frames=max_frames, max_height=max_height, max_width=max_width, vae_precision=vae_precision,
                        core_runtime=core_runtime, vae_runtime=vae_runtime)
    # The same submodels at fp32: a quantised one starts from its fp32 graph (_fp32_graph).
    fp32_specs = build_specs(cfg, frames, height, width, precision=Precision.FP32, max_batch=max_batch,
                             max_frames=max_frames, max_height=max_height, max_width=max_width)
    frames = frames or cfg.frames
    height = height or cfg.height
    width = width or cfg.width
    calibration = [str(p) for p in calibration or []]
    if calibration and precision not in QUANTIZED and vae_precision not in QUANTIZED:
        logger.warning("--calibration is only used for int8/fp8; ignored for %s", precision.value)

    repo.mkdir(parents=True, exist_ok=True)
    ck_hash = mf.checkpoint_hash(checkpoint)
    state = _State(checkpoint)
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": ck_hash, "target": target.value,
        "precision": precision.value, "precision_chosen_by": chosen_by, "vae_precision": vae_precision.value,
        "vae_precision_chosen_by": vae_chosen_by, "core_runtime": core_runtime.value,
        "core_runtime_chosen_by": core_runtime_chosen_by, "vae_runtime": vae_runtime.value,
        "vae_runtime_chosen_by": vae_runtime_chosen_by,
        "machine": _machine(target),
        "export_shape": {"frames": frames, "height": height, "width": width},
        "versions": mf.versions(), "models": {}, "specs": {n: specs[n].to_dict() for n in chosen},
    }
    _remove_stale_staging(repo)
    staging = Path(tempfile.mkdtemp(dir=repo, prefix=STAGING_PREFIX))
    try:
        # The VAE first: the core's task drift decodes through the exported VAE (_exported_vae).
        for name in sorted(chosen, key=lambda n: n == CORE):
            spec = specs[name]
            key = _model_key(name, spec, ck_hash, precision, calibration, calibration_clips, target)
            vdir = repo / name / VERSION
            previous = mf.read_manifest(vdir)
            reason = "--force" if force else mf.stale_reason(previous, key, vdir)
            if reason is None:
                logger.info("%s: %s matches its manifest (checkpoint %s, %s); reused", name, vdir / MODEL_FILE,
                            ck_hash[:12], spec.precision)
                report["models"][name] = {**previous.get("report", {}), "status": "reused"}
                continue
            logger.info("%s: exporting (%s)", name, reason)
            t0 = time.perf_counter()
            stage = staging / name
            stage.mkdir()
            try:
                vae = _exported_vae(repo, specs, ck_hash, precision, calibration, calibration_clips, target, frames) \
                    if name == CORE else None
                # A low-precision decoder's drift runs with the encoder of that precision when the repository has it (exported
                # just before: the encoder comes first in MODELS).
                encoder = _exported_part(repo, specs, VAE_ENCODER, ck_hash, precision, calibration, calibration_clips,
                                         target) if name == VAE_DECODER and spec.precision != Precision.FP32.value else None
                fp32_graph = _fp32_graph(repo, name, spec, fp32_specs[name], ck_hash, calibration_clips, target) \
                    if _from_fp32_graph(name, spec, precision) else None
                entry = _export_one(name, spec, state, stage, precision, frames, height, width, calibration, calibration_clips,
                                     target, vae=vae, vae_encoder=encoder, fp32_graph=fp32_graph)
            except ExportError as e:
                report["models"][name] = {"status": "failed", "error": str(e)}
                _write_report(repo, report)
                raise
            entry["seconds"] = round(time.perf_counter() - t0, 1)
            files = _install(stage, vdir)
            entry["files"] = {n: v["bytes"] for n, v in files.items()}
            mf.write_json(vdir / mf.MANIFEST_NAME, {
                "format": 1, "model": name, "key": mf.normalise(key), "files": files, "spec": spec.to_dict(),
                "checkpoint": str(checkpoint.resolve()), "versions": report["versions"], "machine": report["machine"],
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "report": entry,
            })
            report["models"][name] = {**entry, "status": "exported"}
            logger.info("%s: exported and validated in %.1f s (%s)", name, entry["seconds"],
                        ", ".join(f"{n} {b / 1e6:.1f} MB" for n, b in entry["files"].items()))
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    try:
        if target == Target.GPU and CORE in chosen:
            report["engine"] = _engine_stage(repo, specs[CORE], build_engine, force, report)
    finally:
        # The Triton configs come from the specs, not from the plan: write them even when the engine
        # stage stops (no TensorRT here, a failed build), so the repository is complete but for the plan.
        report["seconds"] = round(time.perf_counter() - t_start, 1)
        _write_report(repo, report)
        if write_configs:
            _repository_hook(repo, specs, target, precision, report)
    return report


# --- stages -----------------------------------------------------------------------------------

class _State:
    """The checkpoint, loaded on first need (a fully reused repository never loads weights)."""

    def __init__(self, path: Path):
        self.path = path
        self._ck = None

    @property
    def ck(self):
        if self._ck is None:
            from thfm_serve.checkpoint import load_checkpoint

            logger.info("loading checkpoint %s", self.path)
            self._ck = load_checkpoint(self.path, text_encoder=False)
        return self._ck


def _choose_models(models: Iterable[str] | None) -> list[str]:
    if models is None:
        return list(MODELS)
    chosen = [m for m in MODELS if m in set(models)]
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not chosen:
        raise ThfmError(f"unknown model(s) {unknown or list(models)}; choose from {', '.join(MODELS)}")
    return chosen


def _load_config(checkpoint: Path) -> ThfmConfig:
    from thfm_serve.checkpoint import missing_parts

    if not checkpoint.is_dir():
        raise CheckpointError(f"checkpoint directory {checkpoint} does not exist")
    missing = missing_parts(checkpoint)
    if missing:
        raise CheckpointError(f"checkpoint {checkpoint} is missing {', '.join(missing)}")
    return ThfmConfig.load(checkpoint / "thfm" / "config.json")


STAGING_PREFIX = ".export-"


def _remove_stale_staging(repo: Path) -> None:
    """Staging folders an export killed before its cleanup left in the repository (the OOM killer
    does that). tritonserver takes every folder of a repository for a model, fails to load that one
    ("failed to load all models") and does not start, so the next export removes them. Two exports
    into one repository at once are not supported (their manifests would race as well)."""
    for stale in sorted(repo.glob(STAGING_PREFIX + "*")):
        if stale.is_dir():
            logger.warning("removing %s, left by an interrupted export", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _model_key(name: str, spec: SubmodelSpec, ck_hash: str, precision: Precision, calibration: list[str],
               clips: int | None, target: Target) -> dict[str, Any]:
    from .quantize import DEFAULT_EXCLUDE, recipe_for

    key: dict[str, Any] = {"recipe": mf.RECIPE_VERSION, "checkpoint_sha256": ck_hash, "precision": spec.precision,
                           "spec": spec.to_dict()}
    clips = _clips(name, clips)
    if name == CORE and precision in QUANTIZED:
        from .calibration import PROCEDURAL_RECIPE
        from .quantize import calibration_dtype_for

        recipe = _tensorrt_recipe(precision) if target == Target.GPU else recipe_for(target).name
        key["calibration"] = {"videos": [mf.file_hashes([Path(p)])[Path(p).name]["sha256"] for p in calibration],
                              "procedural": None if calibration else PROCEDURAL_RECIPE, "clips": clips,
                              "exclude": list(DEFAULT_EXCLUDE), "recipe": recipe}
        if target == Target.CPU:
            key["calibration"]["dtype"] = calibration_dtype_for(read_cpu())
            opt = spec.dims("opt")
            key["calibration"]["grid"] = list(calibration_grid(patch_pixels(opt["hp"]), patch_pixels(opt["wp"])))
    if name in (VAE_ENCODER, VAE_DECODER) and spec.precision == Precision.BF16.value:
        key["runtime"] = {**_openvino_runtime(spec), "drift_bounds": [b.describe() for b in VAE_DRIFT_BOUNDS]}
    elif runs_in_openvino(spec):
        key["runtime"] = _openvino_runtime(spec)
    if name in (VAE_ENCODER, VAE_DECODER) and spec.precision == Precision.INT8.value:
        from .calibration import PROCEDURAL_RECIPE
        from .quantize import vae_recipe_for

        key["calibration"] = {"videos": [mf.file_hashes([Path(p)])[Path(p).name]["sha256"] for p in calibration],
                              "procedural": None if calibration else PROCEDURAL_RECIPE, "clips": clips,
                              "recipe": vae_recipe_for().name, "drift_bounds": [b.describe() for b in VAE_DRIFT_BOUNDS]}
    return key


def _openvino_runtime(spec: SubmodelSpec) -> dict[str, str]:
    """What runs a graph in OpenVINO (its manifest keys on it: another OpenVINO, or another inference
    precision, may lower it differently)."""
    import importlib.metadata as md

    from thfm_serve.serving.sessions import openvino_inference_precision

    try:
        version = md.version("openvino")
    except md.PackageNotFoundError:
        version = "not installed"
    return {"runtime": "openvino-cpu", "openvino": version,
            "inference_precision": openvino_inference_precision(spec.precision, read_cpu())}


def _clips(name: str, clips: int | None) -> int:
    """--calibration-clips, or the model's default (calibration.default_clips)."""
    return default_clips(name) if clips is None else clips


def _machine(target: Target) -> dict[str, Any]:
    """The export report's machine: its CPU's instruction sets and class and, for a CPU target, its
    measured matmul peak per precision at the thread count the export runs on (once per machine,
    then from thfm_serve.matmul_peak's cache), against which the phase times can be read."""
    out: dict[str, Any] = read_cpu().to_dict()
    if target == Target.CPU:
        import torch

        from thfm_serve import matmul_peak

        peak = matmul_peak.cached(torch.get_num_threads())
        logger.info("matmul peak of this machine%s: %s", " (cached)" if peak["cached"] else "", matmul_peak.describe(peak))
        out["matmul_peak"] = {k: peak[k] for k in ("peak", "gflops", "probe_only", "size", "threads", "runs", "loadavg_1m", "cached")}
    return out


def _tensorrt_recipe(precision: Precision) -> str:
    """The GPU quantisation recipe's identity (manifests key on it): ModelOpt's version and mode."""
    import importlib.metadata as md

    from .tensorrt_ptq import HIGH_PRECISION_DTYPE

    try:
        version = md.version("nvidia-modelopt")
    except md.PackageNotFoundError:
        version = "not installed"
    return f"modelopt-{version}-{precision.value}-{HIGH_PRECISION_DTYPE}"


def _exported_vae(repo: Path, specs: dict[str, SubmodelSpec], ck_hash: str, precision: Precision, calibration: list[str],
                  clips: int | None, target: Target, window: int) -> OnnxVae | None:
    """The repository's exported VAE graphs when both match this export (their manifests' keys and
    files, as reuse checks them); None otherwise, and the drift falls back to the PyTorch VAE."""
    parts = []
    for name in (VAE_ENCODER, VAE_DECODER):
        part = _exported_part(repo, specs, name, ck_hash, precision, calibration, clips, target)
        if part is None:
            logger.info("core task drift: no exported %s to decode through; using the PyTorch VAE", name)
            return None
        parts.append(part)
    return OnnxVae(parts[0], parts[1], window)


def _exported_part(repo: Path, specs: dict[str, SubmodelSpec], name: str, ck_hash: str, precision: Precision,
                   calibration: list[str], clips: int | None, target: Target) -> tuple[SubmodelSpec, Path] | None:
    """(spec, model file) of the repository's `name` when its manifest matches this export, else None."""
    vdir = repo / name / VERSION
    key = _model_key(name, specs[name], ck_hash, precision, calibration, clips, target)
    reason = mf.stale_reason(mf.read_manifest(vdir), key, vdir)
    if reason is not None:
        logger.info("%s in %s does not match this export (%s)", name, repo, reason)
        return None
    return specs[name], vdir / MODEL_FILE


def _fp32_graph(repo: Path, name: str, spec: SubmodelSpec, fp32: SubmodelSpec, ck_hash: str, clips: int | None,
                target: Target) -> Path | None:
    """The repository's fp32 graph of `name` when it is the graph a quantised export would trace.

    A quantised export starts from the fp32 graph of the same module at the same spec (only the
    precision and the tolerances differ); when the repository holds that graph, current by its
    manifest, it is the quantiser's input and the module is not traced again (a trace is most of a
    tiny model's export and minutes of a 1.3B core's).
    """
    if _graph_fields(fp32) != _graph_fields(spec):
        return None
    vdir = repo / name / VERSION
    key = _model_key(name, fp32, ck_hash, Precision.FP32, [], clips, target)
    if mf.stale_reason(mf.read_manifest(vdir), key, vdir) is not None:
        return None
    return vdir / MODEL_FILE


def _from_fp32_graph(name: str, spec: SubmodelSpec, precision: Precision) -> bool:
    """Whether `name` is exported from its fp32 graph: an int8/fp8 core or an int8 VAE quantised from
    it, a bf16 VAE or an OpenVINO fp32 VAE as it is (the same graph as onnxruntime's fp32 one)."""
    if name == CORE:
        return precision in QUANTIZED
    return spec.precision != Precision.FP32.value or runs_in_openvino(spec)


def _graph_fields(spec: SubmodelSpec) -> dict[str, Any]:
    """What a traced graph depends on: the spec without its precision, validation tolerances and runtime."""
    return {k: v for k, v in spec.to_dict().items() if k not in ("precision", "tolerances", "runtime")}


def _fp32_source(module: Any, spec: SubmodelSpec, stage: Path, fp32_graph: Path | None, entry: dict[str, Any]) -> Path:
    """The fp32 graph to start from (to quantise, or to serve as it is in OpenVINO), in stage/fp32: the
    repository's current one copied, or a fresh trace."""
    path = stage / "fp32" / MODEL_FILE
    t0 = time.perf_counter()
    if fp32_graph is None:
        entry["fp32_graph"] = "traced"
        export_onnx(module, spec, path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        for f in onnx_files(fp32_graph):
            shutil.copy2(f, path.parent / f.name)
        entry["fp32_graph"] = f"the repository's fp32 {spec.name} (manifest current)"
        logger.info("%s: starting from the repository's fp32 graph (%s) instead of tracing the module again", spec.name,
                    fp32_graph)
    entry["fp32_graph_s"] = round(time.perf_counter() - t0, 1)
    return path


def _export_one(name: str, spec: SubmodelSpec, state: _State, stage: Path, precision: Precision, frames: int,
                height: int, width: int, calibration: list[str], clips: int | None, target: Target,
                vae: OnnxVae | None = None, vae_encoder: tuple[SubmodelSpec, Path] | None = None,
                fp32_graph: Path | None = None) -> dict[str, Any]:
    ck = state.ck
    t0 = time.perf_counter()
    onnx_path = stage / MODEL_FILE
    entry: dict[str, Any] = {"precision": spec.precision}
    latent_of = _ClipEncoder(ck, vae) if name == CORE else None
    if name == CORE:
        reference = lowered_core(ck.core(), Precision.FP32)
        if precision in QUANTIZED:
            fp32_path = _fp32_source(reference, spec, stage, fp32_graph, entry)
            entry["quantization"] = _quantize(fp32_path, onnx_path, ck, spec, frames, height, width, calibration,
                                                _clips(name, clips), target, reference, precision, latent_of=latent_of)
            shutil.rmtree(stage / "fp32")
            module = reference
        else:
            module = lowered_core(ck.core(), precision)
            export_onnx(module, spec, onnx_path)
        entry["parameters"] = precision_summary(module)
        _write_core_extras(ck, stage)
    else:
        module = ck.vae_encoder() if name == VAE_ENCODER else ck.vae_decoder()
        reference = module
        if spec.precision == Precision.INT8.value:
            fp32_path = _fp32_source(module, spec, stage, fp32_graph, entry)
            entry["quantization"] = _quantize_vae(name, fp32_path, onnx_path, ck, spec, frames, height, width,
                                                  calibration, _clips(name, clips))
            shutil.rmtree(stage / "fp32")
        elif spec.precision == Precision.BF16.value or runs_in_openvino(spec):
            # The fp32 graph itself: OpenVINO compiles it at the spec's inference precision, lowering
            # a bf16 VAE's to bf16 (serving.sessions).
            fp32_path = _fp32_source(module, spec, stage, fp32_graph, entry)
            for f in onnx_files(fp32_path):
                shutil.move(str(f), str(stage / f.name))
            shutil.rmtree(stage / "fp32")
        else:
            export_onnx(module, spec, onnx_path)
    if runs_in_openvino(spec):
        entry["runtime"] = _openvino_runtime(spec)

    entry["export_s"] = round(time.perf_counter() - t0, 1)
    entry["structure"] = check_structure(onnx_path, spec)
    entry["ops"] = op_counts(onnx_path)
    entry["initializer_elements"] = initializer_dtypes(onnx_path)
    num_params = sum(p.numel() for p in module.parameters())
    runner = make_runner(onnx_path, _runner_precision(name, precision, target), num_params, spec)
    ref_run = torch_runner(reference, spec)
    extra = {}
    if name == CORE and precision in (Precision.FP16, Precision.BF16):
        extra[f"torch_{precision.value}"] = torch_runner(module, spec)
    if runner is None and precision in QUANTIZED:
        # A large bf16 Q/DQ graph: nothing here runs it, and the fp32 module is no proxy for it.
        # The TensorRT plan validation compares the engine with PyTorch on the GPU host.
        entry["runner"] = "none"
        entry["validation"] = (f"deferred to the TensorRT plan validation: the bf16 Q/DQ graph is not executable on "
                               f"CPU at {num_params / 1e6:.0f}M parameters")
        entry["validate_s"] = round(time.perf_counter() - t0 - entry["export_s"], 1)
        return entry
    if runner is None:
        # Large bf16 graph: no runtime here can execute it (see validate.py). The structure was
        # checked above; the values are PyTorch bf16's (the exported module), which the report says.
        entry["runner"] = f"none (bf16 graph not executable on CPU at {num_params / 1e6:.0f}M parameters); values from torch-bf16"
        candidate = torch_runner(module, spec)
        entry["validation"] = validate_values(spec, candidate, ref_run, trace_dims(spec), stage / "polygraphy",
                                              runner_kind="torch-bf16 (proxy)")
    else:
        entry["runner"] = runner.kind
        candidate = runner
        drift_clip = procedural_clips(1, frames, height, width, seed=DRIFT_SEED)[0] if name == CORE else None
        try:
            inputs = None
            if name == CORE and precision in QUANTIZED:
                # The export-shape check runs the drift clip's first rows; where the drift runs at the
                # export grid too (core_grid), both cores answer those rows once.
                inputs = _clip_inputs(ck, latent_of, at_export=drift_clip)
                ref_run, candidate = RowMemo(ref_run), RowMemo(runner)
                entry["validation_inputs"] = (f"procedural clips through the VAE encoder (seed {DRIFT_SEED}, the drift's seed, "
                                              "at the export shape; seeds 100+ at the others; none of them a calibration "
                                              "clip), the checkpoint's task embeddings")
            if name in (VAE_ENCODER, VAE_DECODER) and spec.precision != Precision.FP32.value:
                inputs = _vae_inputs(ck, name)
                entry["validation_inputs"] = ("procedural clips (seed 100+, not the calibration clips)" +
                                              (" through the PyTorch VAE encoder and core (the latents and the core's "
                                               "dense rows)" if name == VAE_DECODER else ""))
            entry["validation"] = validate_values(spec, candidate, ref_run, trace_dims(spec), stage / "polygraphy", extra,
                                                  runner_kind=runner.kind, inputs=inputs)
            if name in (VAE_ENCODER, VAE_DECODER) and spec.precision == Precision.FP32.value:
                # The int8 graphs are the same window graphs quantised; padding is checked on the fp32 ones.
                entry["window_check"] = _window_check(name, spec, runner, reference, frames)
            if name == VAE_DECODER and spec.precision != Precision.FP32.value:
                entry.update(_vae_drift_entry(ck, spec, onnx_path, vae_encoder, frames, height, width))
            if name == CORE and precision != Precision.FP32:
                dh, dw = core_grid(target, height, width) if precision in QUANTIZED else (height, width)
                clip = drift_clip if (dh, dw) == (height, width) else \
                    procedural_clips(1, frames, dh, dw, seed=DRIFT_SEED)[0]
                entry["drift"] = task_drift(ck, ref_run, candidate, clip, dh, dw, max_batch=spec.max_batch,
                                            vae=vae, encode=latent_of.encode)
                if isinstance(candidate, RowMemo):
                    entry["drift_rows_from_validation"] = {"reference": ref_run.shared, "candidate": candidate.shared}
                entry["drift_grid"] = f"{frames}x{dh}x{dw}"
                entry["drift_region"] = describe_drift_region(dh, dw)
                entry["drift_runner"] = runner.kind
                entry["drift_vae"] = _vae_note(vae)
                logger.info("core %s task drift: %s", precision.value, _fmt_drift(entry["drift"]))
        finally:
            runner.close()
    entry["validate_s"] = round(time.perf_counter() - t0 - entry["export_s"], 1)
    if runner is None and name == CORE:
        clip = procedural_clips(1, frames, height, width, seed=DRIFT_SEED)[0]
        entry["drift"] = task_drift(ck, ref_run, torch_runner(module, spec), clip, height, width,
                                    max_batch=spec.max_batch, vae=vae)
        entry["drift_region"] = describe_drift_region(height, width)
        entry["drift_vae"] = _vae_note(vae)
        entry["drift_runner"] = "torch-bf16 (proxy: the exported module in PyTorch)"
    return entry


def _vae_note(vae: OnnxVae | None) -> str:
    if vae is None:
        return "pytorch (no exported VAE matching this export in the repository)"
    return f"{vae.kind}; rows decoded: {vae.calls['decoder']}, encoded: {vae.calls['encoder']}"


def _runner_precision(name: str, precision: Precision, target: Target) -> Precision:
    """The precision that picks a validation runner (validate.make_runner): the VAE is fp32; a GPU
    int8/fp8 core is bf16 outside its Q/DQ (tensorrt_ptq.HIGH_PRECISION_DTYPE), which only onnx's
    reference evaluator runs on CPU."""
    if name != CORE:
        return Precision.FP32
    if precision in QUANTIZED and target == Target.GPU:
        from .tensorrt_ptq import HIGH_PRECISION_DTYPE

        return Precision.BF16 if HIGH_PRECISION_DTYPE == "bf16" else Precision.FP16
    return precision


class _ClipEncoder:
    """How calibration, validation and drift clips become the core's latent input, each distinct clip
    once (the export-shape validation and the task drift encode the same clip): through the
    repository's exported VAE encoder when the drift uses it (onnxruntime, the encoder serving runs;
    at the 1.3B shape on an AMX Xeon no faster than PyTorch's, 37 s a clip either way), else through
    the checkpoint's. The exported encoder takes at most its window; a longer validation clip (the
    core's profile can reach past the VAE window) goes through PyTorch's.

    encode(x): the encoder's input [1, 3, F, H, W] in [-1, 1] (processing.fit_clip) -> latent, as the
    window loop calls it; self(clip, frames, height, width): a uint8 clip fitted to the grid first."""

    def __init__(self, ck: Any, vae: OnnxVae | None):
        self._vae = vae
        self._torch_encode = torch_vae(ck)[0]  # loads the PyTorch encoder only if a clip needs it
        self.encode = once_per_input(self._encode)

    def _encode(self, x: np.ndarray) -> np.ndarray:
        if self._vae is not None and x.shape[2] <= self._vae.window:
            return self._vae.encode(x)
        return self._torch_encode(x)

    def __call__(self, clip: np.ndarray, frames: int, height: int, width: int) -> np.ndarray:
        from thfm_serve.processing import fit_clip

        return self.encode(fit_clip(clip, frames, height, width).numpy())


def _clip_inputs(ck: Any, latent_of: _ClipEncoder, at_export: np.ndarray | None = None):
    """Core inputs from the distribution an int8 core is calibrated on, at any base dims: a procedural
    clip of the matching frames and size through the VAE encoder (repeated over the batch) and the
    task embeddings (cycled over the batch). at_export: the clip to use at its own grid (the drift
    clip at the export shape, so that validation and drift share those rows, validate.RowMemo)."""
    text = task_texts(ck)

    def make(dims: dict[str, int], seed: int) -> dict[str, np.ndarray]:
        frames, height, width = video_frames(dims["latent_frames"]), patch_pixels(dims["hp"]), patch_pixels(dims["wp"])
        clip = at_export if at_export is not None and at_export.shape[:3] == (frames, height, width) else \
            procedural_clips(1, frames, height, width, seed=seed)[0]
        latent = latent_of(clip, frames, height, width)
        batch = dims["batch"]
        return {"latent": np.repeat(latent, batch, axis=0), "text": text[np.arange(batch) % len(text)]}

    return make


def _quantize(fp32_path: Path, out_path: Path, ck: Any, spec: SubmodelSpec, frames: int, height: int, width: int,
              calibration: list[str], clips: int, target: Target, reference: Any,
              precision: Precision = Precision.INT8, latent_of: _ClipEncoder | None = None) -> dict[str, Any]:
    from .onnx_export import PROTOBUF_LIMIT, finalize_onnx
    from .quantize import calibration_dtype_for, quantize_core

    t0 = time.perf_counter()
    grid = core_grid(target, height, width)
    calib = calibration_set(calibration or None, frames, *grid, count=clips)
    text = task_texts(ck)
    latent_of = latent_of or _ClipEncoder(ck, None)
    samples = []
    for clip in calib.clips:
        latent = latent_of(clip, frames, *grid)
        # One row per task, as served: the calibration ranges cover every task's prompt.
        samples.append({"latent": np.repeat(latent, len(text), axis=0), "text": text})
    inputs_s = round(time.perf_counter() - t0, 1)
    logger.info("int8: %d calibration clips encoded in %.1f s", len(samples), inputs_s)
    size = sum(p.stat().st_size for p in onnx_files(fp32_path))
    if target == Target.GPU:
        from .quantize import DEFAULT_EXCLUDE
        from .tensorrt_ptq import quantize_for_tensorrt

        info = quantize_for_tensorrt(fp32_path, out_path, samples, precision.value, DEFAULT_EXCLUDE,
                                     external_data=size > PROTOBUF_LIMIT * 0.9)
    else:
        cpu = read_cpu()
        dtype = calibration_dtype_for(cpu)
        logger.info("int8: calibration forwards in %s (%s)", dtype, cpu.machine_class)
        info = quantize_core(fp32_path, out_path, samples, target, external_data=size > PROTOBUF_LIMIT * 0.9,
                             module=reference, calibration_dtype=dtype)
    finalize_onnx(out_path, spec)
    info.update({"calibration_source": calib.source, "calibration_files": calib.files, "calibration_clips": len(calib.clips),
                 "calibration_grid": f"{frames}x{grid[0]}x{grid[1]}", "calibration_inputs_s": inputs_s})
    logger.info("int8: %d of %d MatMuls quantized (%d QuantizeLinear, %d DequantizeLinear)", info["quantized_matmuls"],
                info["matmuls"], info["quantize_linear"], info["dequantize_linear"])
    return info


def core_grid(target: Target, height: int, width: int) -> tuple[int, int]:
    """(height, width) at which a quantised core is calibrated and its task drift measured.

    The CPU recipe quantises only the linears, per token: its MinMax ranges do not need the export
    grid's token count (calibration_grid), and neither does its error, which the drift measures (the
    1.3B-shaped core's drift at 17x128x128 within -8/+7 % of its drift at 17x256x256, per task); at
    that shape the drift's core rows at the export grid were half of the export's validation
    (export/RESULTS.md). The export-shape value check still runs at the export grid. The GPU recipe
    also quantises attention products, whose ranges and errors were not measured that way: the
    export grid."""
    return calibration_grid(height, width) if target == Target.CPU else (height, width)


VAE_DRIFT_CLIPS = 2  # held-out clips (seeds DRIFT_SEED, DRIFT_SEED + 1) for the int8 VAE's task drift


def vae_feeds(ck: Any, name: str, clips: list[np.ndarray], frames: int, height: int, width: int,
               rows: int | None = None) -> list[dict[str, np.ndarray]]:
    """Input feeds of the VAE graph `name` from the distribution it serves, one per clip.

    Encoder: the clip's frames, fitted to the grid as served. Decoder: what serving decodes: the
    clip's latent and the fp32 core's dense-task rows for it. With a trained checkpoint those rows are
    the latents the clip's task maps encode to (the core's training target for a dense row is
    VAE-encode(task map)); calibration videos come without task maps, and with random weights only
    the core's own rows have the ranges the decoder then sees. rows: cut (cycling) to this batch."""
    import torch

    from thfm_serve.config import DENSE_TASKS
    from thfm_serve.processing import fit_clip


    if name == VAE_ENCODER:
        feeds = [fit_clip(c, frames, height, width).numpy() for c in clips]
    else:
        encoder, core = ck.vae_encoder(), ck.core()
        dense = [t for t in ck.tasks if t in DENSE_TASKS]
        text = torch.from_numpy(task_texts(ck, dense))
        feeds = []
        for clip in clips:
            latent = clip_latent(encoder, clip, frames, height, width)  # [1, 16, T', h, w]
            with torch.no_grad():
                pred = core(torch.from_numpy(np.repeat(latent, len(dense), axis=0)), text)[0].numpy()
            feeds.append(np.concatenate([latent, pred], axis=0))  # [1 + dense tasks, 16, T', h, w]
    if rows is not None:
        feeds = [f[np.arange(rows) % len(f)] for f in feeds]
    key = ENCODER_IN if name == VAE_ENCODER else DECODER_IN
    return [{key: np.ascontiguousarray(f, dtype=np.float32)} for f in feeds]


def _quantize_vae(name: str, fp32_path: Path, out_path: Path, ck: Any, spec: SubmodelSpec, frames: int, height: int,
                  width: int, calibration: list[str], clips: int) -> dict[str, Any]:
    from .onnx_export import finalize_onnx
    from .quantize import quantize_vae

    calib = calibration_set(calibration or None, frames, height, width, count=clips)
    info = quantize_vae(fp32_path, out_path, vae_feeds(ck, name, calib.clips, frames, height, width))
    finalize_onnx(out_path, spec)
    info.update({"calibration_source": calib.source, "calibration_files": calib.files,
                 "calibration_clips": len(calib.clips)})
    logger.info("%s int8: %d Convs quantised; onnxruntime runs %s", name, info["quantized_convs"],
                info["onnxruntime_optimised"])
    return info


def _vae_inputs(ck: Any, name: str):
    """validate_values' inputs for a low-precision VAE graph at any base dims: held-out procedural clips of the
    matching size (one per batch row for the encoder; the decoder's rows from one clip, vae_feeds)."""

    def make(dims: dict[str, int], seed: int) -> dict[str, np.ndarray]:
        frames, height, width = video_frames(dims["latent_frames"]), patch_pixels(dims["hp"]), patch_pixels(dims["wp"])
        batch = dims["batch"]
        if name == VAE_ENCODER:
            feeds = vae_feeds(ck, name, procedural_clips(batch, frames, height, width, seed=seed), frames, height, width)
            return {ENCODER_IN: np.concatenate([f[ENCODER_IN] for f in feeds], axis=0)}
        clip = procedural_clips(1, frames, height, width, seed=seed)
        return vae_feeds(ck, name, clip, frames, height, width, rows=batch)[0]

    return make


def _vae_drift_entry(ck: Any, spec: SubmodelSpec, decoder_path: Path, encoder: tuple[SubmodelSpec, Path] | None,
                     frames: int, height: int, width: int) -> dict[str, Any]:
    """A low-precision (int8 or bf16) VAE's task drift against the fp32 PyTorch VAE on held-out clips;
    fatal past contract.specs.VAE_DRIFT_BOUNDS. The candidate decodes with the decoder being exported
    and encodes with the repository's encoder of the same precision (or PyTorch's fp32 one where there
    is none)."""
    ref_encode, ref_decode = torch_vae(ck)
    p, runtime = spec.precision, "OpenVINO" if runs_in_openvino(spec) else "onnxruntime"
    if encoder is not None:
        onnx_vae = OnnxVae(encoder, (spec, decoder_path), frames)
        candidate, note = (onnx_vae.encode, onnx_vae.decode), f"{p} encoder and {p} decoder ({runtime})"
    else:
        onnx_vae = OnnxVae((spec, decoder_path), (spec, decoder_path), frames)  # encoder part unused
        candidate, note = (ref_encode, onnx_vae.decode), (f"fp32 PyTorch encoder (no {p} vae_encoder matching this "
                                                          f"export in the repository) and {p} decoder ({runtime})")
    clips = procedural_clips(VAE_DRIFT_CLIPS, frames, height, width, seed=DRIFT_SEED)
    t0 = time.perf_counter()
    drift = vae_drift(ck, (ref_encode, ref_decode), candidate, clips, height, width)
    logger.info("%s VAE task drift against the fp32 VAE (%d clips, %s): %s", p, len(clips), note, _fmt_drift(drift))
    bounds = check_vae_drift(drift, VAE_DRIFT_BOUNDS)
    return {"vae_drift": drift, "vae_drift_bounds": bounds, "vae_drift_candidate": note,
            "vae_drift_region": describe_drift_region(height, width),
            "vae_drift_clips": f"{len(clips)} procedural clips, seeds {DRIFT_SEED}+ (not the calibration clips)",
            "vae_drift_s": round(time.perf_counter() - t0, 1)}


def _window_check(name: str, spec: SubmodelSpec, runner: Any, module: Any, window: int) -> dict[str, Any]:
    """The fixed-window VAE graph on a shorter clip (padded, cropped) equals PyTorch on the short clip."""
    import torch

    short = 1 if window > 1 else None
    if short is None:
        return {"skipped": "the window is 1 frame"}
    dims = spec.dims("opt")
    run = lambda x: runner({spec.input_names[0]: x})[spec.output_names[0]]  # noqa: E731
    rng = np.random.default_rng(7)
    if name == VAE_ENCODER:
        x = rng.uniform(-1, 1, size=(1, 3, short, patch_pixels(dims["hp"]), patch_pixels(dims["wp"]))).astype(np.float32)
        got = encode_in_window(run, x, window)
    else:
        h, w = (latent_size(patch_pixels(dims[k])) for k in ("hp", "wp"))
        x = rng.standard_normal(size=(1, spec.tensor(DECODER_IN).shape[1], short, h, w)).astype(np.float32)
        got = decode_in_window(run, x, window)
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    out_name = spec.output_names[0]
    tol = spec.tolerances[out_name]
    ok, max_abs, max_rel = tol.check(got, ref) if got.shape == ref.shape else (False, float("inf"), float("inf"))
    if not ok:
        raise ExportError(f"{name}: padding a {short}-frame clip to the {window}-frame window does not match PyTorch on "
                          f"the short clip: shapes {list(got.shape)} vs {list(ref.shape)}, max abs diff {max_abs:.3g}")
    return {"short_frames": short, "window": window, "max_abs": max_abs, "max_rel": max_rel, "ok": ok}


def _write_core_extras(ck: Any, stage: Path) -> None:
    """What serving needs from the checkpoint besides the graph: task embeddings and the THFM config."""
    np.savez(stage / EMBEDDINGS_FILE, **{t: ck.task_embedding(t).numpy().astype(np.float32) for t in ck.tasks})
    (stage / CONFIG_FILE).write_text(ck.config.to_json())


def _install(stage: Path, vdir: Path) -> dict[str, dict[str, Any]]:
    """Move the staged files into the version folder, replacing the previous export's files."""
    vdir.mkdir(parents=True, exist_ok=True)
    # The old plan goes too: it was built from the graph being replaced, and Triton must not serve it
    # if the engine stage then fails. Timing caches stay (they depend on TensorRT and the GPU only).
    for old in [MODEL_FILE, MODEL_FILE + ".data", EMBEDDINGS_FILE, CONFIG_FILE, mf.MANIFEST_NAME, "model.plan"]:
        if (vdir / old).exists():
            (vdir / old).unlink()
    if (vdir / "polygraphy").exists():
        shutil.rmtree(vdir / "polygraphy")
    files = []
    for item in sorted(stage.iterdir()):
        dest = vdir / item.name
        os.replace(item, dest)
        if dest.is_file():
            files.append(dest)
    return mf.file_hashes(files)


def _engine_stage(repo: Path, spec: SubmodelSpec, build: bool, force: bool, report: dict[str, Any]) -> dict[str, Any]:
    from .engine import build_engine

    vdir = repo / CORE / VERSION
    if not build:
        logger.info("core: --no-engine: TensorRT engine not built (ONNX ready for a TensorRT host)")
        return {"status": "skipped (--no-engine)"}
    manifest = mf.read_manifest(vdir) or {}
    try:
        engine = build_engine(vdir / MODEL_FILE, spec, vdir, previous=manifest.get("engine"), force=force)
    except ExportError as e:
        report["engine"] = {"status": "failed", "error": str(e)}
        _write_report(repo, report)
        raise
    manifest["engine"] = engine
    mf.write_json(vdir / mf.MANIFEST_NAME, manifest)
    return {"status": "built", **engine}


def _write_report(repo: Path, report: dict[str, Any]) -> None:
    mf.write_json(repo / REPORT_FILE, report)


def _repository_hook(repo: Path, specs: dict[str, SubmodelSpec], target: Target, precision: Precision,
                     report: dict[str, Any]) -> None:
    """Let thfm_serve.repository write the Triton configs, when that module exists."""
    try:
        from thfm_serve import repository  # type: ignore[attr-defined]
    except ImportError:
        logger.info("thfm_serve.repository not available: Triton configs not written")
        return
    write = getattr(repository, "write_repository", None)
    if write is None:
        return
    if not (repo / CORE / VERSION / CONFIG_FILE).exists():
        # The configs need the core's THFM config (tasks, joints, clip). Exporting the VAE pair first
        # into a new repository is a normal order (the core's drift decodes through it): the export
        # that adds the core writes them.
        report["configs"] = f"not written: no exported core in {repo} yet; the export that adds it writes them"
        logger.info("Triton configs %s", report["configs"])
        _write_report(repo, report)
        return
    write(repo, specs, target.value, precision.value, report=report)


def _fmt_drift(drift: dict[str, dict[str, float]]) -> str:
    return "; ".join(f"{t} " + ", ".join(f"{k}={v:.3g}" for k, v in m.items()) for t, m in drift.items())
