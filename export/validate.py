"""Fatal validation of an exported graph against the PyTorch modules, and task-level drift.

Order (optimum's `_run_validation` structure): output names, symbolic axes and static sizes
(onnx_export.check_structure), then at two or more shapes, one of them never used by the export
(neither the opt shape nor the trace shape): output shapes, then values within the spec's
per-output tolerance. Any failure raises ExportError with the numbers that failed.

Runners: onnxruntime CPU through polygraphy's OnnxrtRunner. bfloat16 graphs have no onnxruntime CPU
kernels (measured; precision.py), so they run in ``onnx.reference.ReferenceEvaluator`` (numpy with
ml_dtypes bfloat16: the graph itself, op by op, slowly) when small enough; above that size only the
structure is checked and the values come from PyTorch bf16 (the module that was exported), and the
report says so.

The PyTorch inputs/outputs of the export-shape check are saved as polygraphy JSON next to the
model (``polygraphy/inputs.json``, ``polygraphy/pytorch_outputs.json``) so the comparison can be
repeated with the polygraphy CLI on any runner, e.g. TensorRT on a GPU host:
``polygraphy run model.onnx --trt --onnxrt --load-inputs inputs.json --load-outputs pytorch_outputs.json``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from thfm_serve.contract.geometry import VAE_SPATIAL, latent_size
from thfm_serve.contract.protocol import CORE_IN
from thfm_serve.contract.specs import Precision, SubmodelSpec, Tolerance
from thfm_serve.errors import ExportError

logger = logging.getLogger(__name__)

# ReferenceEvaluator runs numpy op by op (bfloat16 matmuls without BLAS): fine for small models only.
REFERENCE_EVALUATOR_MAX_PARAMS = 50_000_000

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


# --- runners ----------------------------------------------------------------------------------

def _quiet_polygraphy() -> None:
    # polygraphy prints every session creation and file save at INFO to stdout.
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING


class OrtRunner:
    """onnxruntime CPU session via polygraphy (one session, many feeds)."""

    kind = "onnxruntime-cpu"

    def __init__(self, path: Path):
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

        _quiet_polygraphy()
        try:
            self._runner = OnnxrtRunner(SessionFromOnnx(str(path), providers=["CPUExecutionProvider"]), name="onnxrt")
            self._runner.activate()
        except Exception as e:  # polygraphy wraps onnxruntime's load errors in its own exception
            raise ExportError(f"onnxruntime cannot load {Path(path).name}: {str(e).strip().splitlines()[-1][:400]}") from e

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in self._runner.infer(feed).items()}

    def close(self) -> None:
        self._runner.deactivate()


class ReferenceRunner:
    """onnx.reference.ReferenceEvaluator: executes any ONNX type, bfloat16 included."""

    kind = "onnx-reference-evaluator"

    def __init__(self, path: Path):
        import onnx
        from onnx.reference import ReferenceEvaluator

        self._ev = ReferenceEvaluator(onnx.load(str(path)))
        self._names = [o.name for o in self._ev.proto_.graph.output]

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {n: np.asarray(v, dtype=np.float32) for n, v in zip(self._names, self._ev.run(None, feed))}

    def close(self) -> None:
        pass


class ServingRunner:
    """The graph in the session serving creates for it (serving.sessions.create_session): for a bf16
    VAE, OpenVINO's CPU plugin in bf16, so validation checks what the server runs."""

    def __init__(self, path: Path, spec: SubmodelSpec):
        from thfm_serve.serving.sessions import create_session

        self._session = create_session(path, 0, spec)
        self._names = spec.output_names
        hint = getattr(self._session, "inference_precision", None)
        self.kind = (f"openvino-cpu ({spec.precision} graph, {hint} inference precision)" if hint
                     else "onnxruntime-cpu (serving's session)")

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._names, self._session.run(self._names, feed)))

    def close(self) -> None:
        pass


def make_runner(path: Path, precision: Precision, num_params: int,
                spec: SubmodelSpec | None = None) -> OrtRunner | ReferenceRunner | ServingRunner | None:
    """The runtime that validates an exported graph: the one serving uses where that is not
    onnxruntime (OpenVINO: a bf16 VAE, --vae-runtime or --core-runtime openvino), else onnxruntime,
    or onnx's reference evaluator for a small bf16 graph (None for a large one: nothing here runs it)."""
    from thfm_serve.serving.sessions import runs_in_openvino

    if spec is not None and runs_in_openvino(spec):
        return ServingRunner(path, spec)
    if precision != Precision.BF16:
        return OrtRunner(path)
    if num_params <= REFERENCE_EVALUATOR_MAX_PARAMS:
        return ReferenceRunner(path)
    return None


def torch_runner(module: Any, spec: SubmodelSpec) -> Runner:
    """PyTorch module (float32 interface) as a numpy runner."""
    import torch

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = module(*[torch.from_numpy(np.ascontiguousarray(feed[n])) for n in spec.input_names])
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.detach().float().numpy() for n, o in zip(spec.output_names, out)}

    return run


class RowMemo:
    """A core runner that runs each distinct (latent row, text row) once and answers repeats from memory.

    The export-shape validation of a calibrated core and its task drift feed the same clip's rows
    (build._clip_inputs): at the 1.3B shape each fp32 PyTorch row is half a minute. A row's outputs do
    not depend on the other rows of its batch (no op mixes rows), so answering a row from an earlier
    batch gives what the graph would; `shared` counts the rows answered that way."""

    def __init__(self, run: Runner):
        self._run = run
        self._done: dict[bytes, dict[str, np.ndarray]] = {}
        self.shared = 0

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(feed[CORE_IN[0]])
        keys = [hashlib.sha256(b"".join(np.ascontiguousarray(feed[n][i]).tobytes() for n in CORE_IN)).digest()
                for i in range(rows)]
        todo = [i for i, k in enumerate(keys) if k not in self._done and k not in keys[:i]]
        self.shared += sum(1 for k in dict.fromkeys(keys) if k in self._done)
        if todo:
            out = self._run({n: np.ascontiguousarray(feed[n][todo]) for n in CORE_IN})
            for j, i in enumerate(todo):
                self._done[keys[i]] = {name: np.array(v[j]) for name, v in out.items()}
        names = list(self._done[keys[0]])
        return {name: np.stack([self._done[k][name] for k in keys]) for name in names}


# --- shapes -----------------------------------------------------------------------------------

def validation_dims(spec: SubmodelSpec, trace: Mapping[str, int]) -> list[tuple[str, dict[str, int]]]:
    """[(label, base dims)]: the export (opt) shape, a shape the export never used, and the profile min.

    "unseen" changes every dynamic dim to a value that is neither the opt nor the trace value where
    the profile allows (preferring small values: validation runs full models on CPU).
    """
    opt = spec.dims("opt")
    unseen = dict(opt)
    for d in spec.dynamic_dims:
        lo, _, hi = spec.profiles[d]
        used = {opt[d], trace.get(d, opt[d])}
        # Small values first (validation runs full models on CPU), but above the profile minimum,
        # which the "min" shape below covers anyway.
        candidates = sorted((v for v in range(lo, hi + 1) if v not in used), key=lambda v: (v == lo, v))
        if d == "batch":  # prefer batch 3 (> trace 2) so batching itself is exercised
            candidates.sort(key=lambda v: (v < 3, v))
        if candidates:
            unseen[d] = candidates[0]
    out = [("export", opt)]
    if unseen != opt:
        out.append(("unseen", unseen))
    mins = spec.dims("min")
    if mins not in (opt, unseen):
        out.append(("min", mins))
    return out


# --- comparison -------------------------------------------------------------------------------

def compare_outputs(spec: SubmodelSpec, ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray],
                    dims: Mapping[str, int], tolerances: Mapping[str, Tolerance] | None = None) -> tuple[dict, list[str]]:
    tolerances = tolerances or spec.tolerances
    rows: dict[str, Any] = {}
    failures: list[str] = []
    expected = {t.name: spec.shape(t.name, dims) for t in spec.outputs}
    for name in spec.output_names:
        if name not in got:
            failures.append(f"{name}: missing from the ONNX outputs")
            continue
        if tuple(got[name].shape) != expected[name]:
            failures.append(f"{name}: shape {list(got[name].shape)}, expected {list(expected[name])}")
            continue
        tol = tolerances[name]
        ok, max_abs, max_rel = tol.check(got[name], ref[name])
        mean_abs = float(np.mean(np.abs(got[name].astype(np.float64) - ref[name])))
        rows[name] = {"max_abs": max_abs, "max_rel": max_rel, "mean_abs": mean_abs, "ref_max_abs": float(np.abs(ref[name]).max()),
                      "atol": tol.atol, "rtol": tol.rtol, "ok": ok}
        if not ok:
            failures.append(f"{name}: max abs diff {max_abs:.3g} / max rel diff {max_rel:.3g} beyond atol {tol.atol:g} + "
                            f"rtol {tol.rtol:g} (|ref| up to {rows[name]['ref_max_abs']:.3g})")
    return rows, failures


def validate_values(spec: SubmodelSpec, runner: Runner, reference: Runner, trace: Mapping[str, int],
                    polygraphy_dir: Path | None = None, extra_references: Mapping[str, Runner] | None = None,
                    runner_kind: str = "onnxruntime-cpu",
                    inputs: Callable[[Mapping[str, int], int], dict[str, np.ndarray]] | None = None) -> list[dict[str, Any]]:
    """Run graph and PyTorch at every validation shape; ExportError on any failure.

    inputs(dims, seed) makes the feed; default the spec's random inputs. A calibrated (int8) graph is
    validated on inputs from the distribution it was calibrated on instead: random inputs fall
    outside its activation ranges, which measures clipping, not the export."""
    make = inputs or (lambda dims, seed: spec.dummy_inputs(dims, seed=seed))
    results = []
    failures: list[str] = []
    for i, (label, dims) in enumerate(validation_dims(spec, trace)):
        feed = make(dims, 100 + i)
        t0 = time.perf_counter()
        ref = reference(feed)
        t1 = time.perf_counter()
        got = runner(feed)
        t2 = time.perf_counter()
        rows, fails = compare_outputs(spec, ref, got, dims)
        entry: dict[str, Any] = {"label": label, "dims": dims, "input_shapes": {k: list(v.shape) for k, v in feed.items()},
                                 "runner": runner_kind, "outputs": rows, "torch_s": round(t1 - t0, 3), "runner_s": round(t2 - t1, 3)}
        for name, other in (extra_references or {}).items():
            o = other(feed)
            entry[f"vs_{name}"] = {k: float(np.abs(got[k].astype(np.float64) - o[k]).max()) for k in spec.output_names if k in got}
        results.append(entry)
        failures += [f"[{label} {_dims_str(dims)}] {f}" for f in fails]
        logger.info("%s %s %s: %s", spec.name, label, _dims_str(dims),
                    ", ".join(f"{k} max|d|={v['max_abs']:.2g}" for k, v in rows.items()) or "no outputs")
        if polygraphy_dir is not None and i == 0:
            save_polygraphy(polygraphy_dir, feed, ref, got, runner_kind)
    if failures:
        raise ExportError(f"{spec.name} ({spec.precision}) failed validation against PyTorch: " + "; ".join(failures))
    return results


def save_polygraphy(directory: Path, feed: dict, ref: dict, got: dict, runner_kind: str) -> None:
    """Inputs and outputs as polygraphy JSON (data loader input list, RunResults)."""
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.json import save_json

    _quiet_polygraphy()
    directory.mkdir(parents=True, exist_ok=True)
    save_json([feed], str(directory / "inputs.json"), description="validation inputs")
    pt = RunResults()
    pt.append(("pytorch", [IterationResult(dict(ref), runner_name="pytorch")]))
    pt.save(str(directory / "pytorch_outputs.json"))
    both = RunResults()
    both.append(("pytorch", [IterationResult(dict(ref), runner_name="pytorch")]))
    both.append((runner_kind, [IterationResult(dict(got), runner_name=runner_kind)]))
    both.save(str(directory / "outputs.json"))


def _dims_str(dims: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in dims.items())


# --- task-level drift -------------------------------------------------------------------------

class OnnxVae:
    """The exported VAE graphs as the window loop's encode/decode, in onnxruntime with the session
    options the server uses (serving.sessions), one row per call: the drift then
    measures the core on the path users get, and costs what serving costs, not PyTorch's VAE (the
    export's slowest step at 1.3B). Each session is created on first use, so a report without dense
    tasks never loads the decoder."""

    def __init__(self, encoder: tuple[SubmodelSpec, Path], decoder: tuple[SubmodelSpec, Path], window: int):
        from thfm_serve.serving.sessions import runs_in_openvino

        self._parts = {"encoder": encoder, "decoder": decoder}
        self._models: dict[str, Any] = {}
        self.window = window
        self.calls = {"encoder": 0, "decoder": 0}  # rows run, for the report
        runtime = f"openvino-cpu, {decoder[0].precision}" if runs_in_openvino(decoder[0]) else "onnxruntime-cpu"
        self.kind = f"{runtime} (the exported vae_encoder/vae_decoder, serving's sessions)"

    def _model(self, part: str):
        if part not in self._models:
            from thfm_serve.serving.sessions import OnnxModel, create_session

            spec, path = self._parts[part]
            # The export holds the PyTorch checkpoint and the candidate core beside these sessions. At
            # the 1.3B shape (17x256x256) an arena sized by a 4-row decoder call took the export past
            # 24 GB (killed by the OOM killer); serving's options have no arena, so each call's
            # activations are freed when it returns, and one row per call (_run) caps them at one row's.
            self._models[part] = OnnxModel(spec, create_session(path, 0, spec))
        return self._models[part]

    def _run(self, part: str, x: np.ndarray) -> np.ndarray:
        model = self._model(part)
        step = 1  # the same arithmetic per row as the served batches, a quarter of a 4-row call's memory
        self.calls[part] += len(x)
        name_in, name_out = model.spec.input_names[0], model.spec.output_names[0]
        return np.concatenate([model.run({name_in: x[i : i + step]})[name_out] for i in range(0, len(x), step)], axis=0)

    def encode(self, clip: np.ndarray) -> np.ndarray:
        from thfm_serve.contract.vae_window import encode_in_window

        return encode_in_window(lambda x: self._run("encoder", x), clip, self.window)

    def decode(self, latent: np.ndarray) -> np.ndarray:
        from thfm_serve.contract.vae_window import decode_in_window

        return decode_in_window(lambda x: self._run("decoder", x), latent, self.window)


def torch_vae(ck: Any) -> tuple[Runner, Runner]:
    """(encode, decode) through the checkpoint's PyTorch VAE: the fallback where no exported VAE
    matching the checkpoint is in the repository (e.g. `--only core` into a new one). Each half is
    loaded on its first call: a caller that encodes elsewhere never holds a second encoder."""
    import torch

    modules: dict[str, Any] = {}

    def runner(part: str, load: Callable[[], Any]) -> Runner:
        def run(x: np.ndarray) -> np.ndarray:
            if part not in modules:
                modules[part] = load()
            with torch.no_grad():
                return modules[part](torch.from_numpy(x)).numpy()

        return run

    return runner("encoder", ck.vae_encoder), runner("decoder", ck.vae_decoder)


# The dense drift decodes at most this many latent cells per side of each frame (the central ones):
# 128x128 pixels. At the 1.3B shape (17x256x256) decoding the four dense rows of both cores in full
# was most of an int8 export (eight 17-frame decoder rows, about 9 of its 25 minutes); the core still
# runs at the export shape, and both cores' latents are cropped alike and decoded by the same decoder.
DRIFT_DECODE_SIDE = 16


def drift_region(height: int, width: int, side: int | None = DRIFT_DECODE_SIDE) -> tuple[slice, slice]:
    """(rows, cols) of the latent grid the dense drift decodes: the central side x side cells (all of a
    smaller grid)."""
    h, w = latent_size(height), latent_size(width)

    def central(n: int) -> slice:
        k = n if side is None else min(n, side)
        return slice((n - k) // 2, (n - k) // 2 + k)

    return central(h), central(w)


def _region_pixels(rows: slice, cols: slice) -> tuple[int, int]:
    return (rows.stop - rows.start) * VAE_SPATIAL, (cols.stop - cols.start) * VAE_SPATIAL


def region_decoder(decode: Callable[[np.ndarray], np.ndarray], height: int, width: int,
                   side: int | None = DRIFT_DECODE_SIDE) -> tuple[Callable[[np.ndarray], np.ndarray], tuple[int, int]]:
    """decode restricted to drift_region's latent cells, and the (height, width) of the maps it gives."""
    rows, cols = drift_region(height, width, side)
    return (lambda latent: decode(np.ascontiguousarray(latent[..., rows, cols]))), _region_pixels(rows, cols)


def describe_drift_region(height: int, width: int, side: int | None = DRIFT_DECODE_SIDE) -> str:
    rows, cols = drift_region(height, width, side)
    h, w = _region_pixels(rows, cols)
    if (h, w) == (height, width):
        return f"dense tasks over every pixel ({width}x{height})"
    return (f"dense tasks over the central {w}x{h} pixels of {width}x{height} "
            f"(latent rows {rows.start}:{rows.stop}, columns {cols.start}:{cols.stop})")


def task_drift(ck: Any, reference: Runner, candidate: Runner, clip: np.ndarray, height: int, width: int,
               tasks: list[str] | None = None, max_batch: int = 6,
               vae: OnnxVae | None = None, decode_side: int | None = DRIFT_DECODE_SIDE,
               encode: Runner | None = None) -> dict[str, dict[str, float]]:
    """Per-task error of the candidate core against the fp32 PyTorch core on one clip.

    Both cores run inside the engine's one window loop (processing.run_clip, the clip as one window):
    the clip is encoded once, every task runs as one batch row, dense latents of both cores are
    decoded by the same VAE decoder and mapped to the users' units, so the numbers are what users
    see: depth abs-rel, normals angle (deg), alpha MSE, IUV mean abs error, 2D keypoints in pixels,
    3D keypoints in mm. vae: the exported VAE (OnnxVae); None: the checkpoint's PyTorch VAE. Only
    the dense tasks' rows are decoded (run_clip), the sparse ones need no VAE decoder, and of each
    only the central decode_side x decode_side latent cells (drift_region; None: all), whose pixels
    the dense metrics are then over. encode: the VAE encoder to use instead of vae's (or PyTorch's),
    e.g. one whose results the export's validation already holds.
    """
    from thfm_serve.config import DENSE_TASKS
    from thfm_serve.contract.protocol import CORE_OUT
    from thfm_serve.contract.tasks import OUTPUT_KEYS
    from thfm_serve.processing import run_clip

    from .calibration import task_texts

    cfg = ck.config
    tasks = tasks or ck.tasks
    text = task_texts(ck, tasks)
    vae_encode, decode = (vae.encode, vae.decode) if vae is not None else torch_vae(ck)
    encode = once_per_input(encode or vae_encode)  # the same clip for both cores: encode it once

    def core(run: Runner):
        def call(latent: np.ndarray, txt: np.ndarray):
            out = _batched(run, latent[:1], txt, max_batch)
            return tuple(out[n] for n in CORE_OUT)

        return call

    # The clip is at the export grid, so the region's maps are already at output size.
    decode_region, region_hw = region_decoder(decode, height, width, decode_side)
    window = clip.shape[0]  # the export window: one window, no stitching
    ref, got = (run_clip(clip, tasks, text, height, width, window, 0, cfg.depth_code, cfg.joint_names,
                         encode, core(run), decode_region, output_hw=region_hw) for run in (reference, candidate))
    out: dict[str, dict[str, float]] = {}
    for task in tasks:
        a, b = ref[task][OUTPUT_KEYS[task]], got[task][OUTPUT_KEYS[task]]
        if task in DENSE_TASKS:
            out[task] = _dense_metric(task, a, b)
        else:
            err = np.linalg.norm(b.astype(np.float64) - a, axis=-1)
            scale, unit = (1.0, "px") if task == "keypoints2d" else (1000.0, "mm")
            out[task] = {f"mean_{unit}": float(err.mean() * scale), f"max_{unit}": float(err.max() * scale)}
    return out


def once_per_input(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn(x, *rest) computed once per distinct array x (by its shape, dtype and bytes): a drift's
    reference and candidate paths, and the export's calibration, validation and drift, share the work
    they have in common. Keyed by a digest: a 1.3B window's encoder input is 13 MB."""
    done: dict[bytes, Any] = {}

    def call(x: np.ndarray, *rest: Any) -> Any:
        x = np.ascontiguousarray(x)
        key = hashlib.sha256(f"{x.shape}{x.dtype}".encode() + x.tobytes()).digest()
        if key not in done:
            done[key] = fn(x, *rest)
        return done[key]

    return call


def _batched(run: Runner, latent: np.ndarray, text: np.ndarray, max_batch: int) -> dict[str, np.ndarray]:
    """One row per task, in chunks of at most max_batch rows (the profile's limit)."""
    parts = []
    for i in range(0, len(text), max_batch):
        chunk = text[i : i + max_batch]
        parts.append(run({CORE_IN[0]: np.repeat(latent, len(chunk), axis=0), CORE_IN[1]: chunk}))
    return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}


def _dense_metric(task: str, ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    if task == "depth":
        # Benchmarks ignore invalid (zero) depth; random-weight maps reach 0, where abs-rel is undefined.
        valid = ref64 > 1e-3
        absrel = np.abs(got64 - ref64)[valid] / ref64[valid]
        return {"abs_rel": float(absrel.mean()) if absrel.size else 0.0, "valid_fraction": float(valid.mean())}
    if task == "normals":
        cos = np.clip((ref64 * got64).sum(-1), -1.0, 1.0)
        ang = np.degrees(np.arccos(cos))
        return {"mean_angle_deg": float(ang.mean()), "max_angle_deg": float(ang.max())}
    if task == "segmentation":
        return {"alpha_mse": float(np.mean((got64 - ref64) ** 2))}
    return {"iuv_mae": float(np.mean(np.abs(got64 - ref64)))}


# --- the int8 VAE's drift in task units -------------------------------------------------------

Encode = Callable[[np.ndarray], np.ndarray]


def vae_drift(ck: Any, reference: tuple[Encode, Encode], candidate: tuple[Encode, Encode], clips: list[np.ndarray],
              height: int, width: int, decode_side: int | None = DRIFT_DECODE_SIDE) -> dict[str, dict[str, float]]:
    """The dense tasks' maps through the candidate VAE (encode, decode) against the reference VAE, in
    task units, averaged over `clips` (uint8 [F, H, W, 3], each one window).

    Both paths run the engine's window loop (processing.run_clip) with the same fp32 PyTorch core, so
    the only difference is the VAE (encoder and decoder), and the maps are what users get. Metrics are
    thfm_serve.evaluation's, with the reference maps as the ground truth: depth abs-rel (unaligned:
    both are the same relative depth) on valid depth, normals mean angle, matte IoU at 0.5 and
    densepose part accuracy (with their companions: RMSE, delta1, median angle, MSE/MAD, UV error).
    As in task_drift, both decoders decode only the central decode_side x decode_side latent cells
    (drift_region; None: all), so the metrics are over those pixels; the encoders and the core run on
    the whole window, and the core runs once per distinct latent (an fp32 candidate encoder shares the
    reference's)."""
    import torch

    from thfm_serve.config import DENSE_TASKS
    from thfm_serve.contract.tasks import OUTPUT_KEYS
    from thfm_serve.processing import run_clip

    from .calibration import task_texts

    cfg = ck.config
    tasks = [t for t in ck.tasks if t in DENSE_TASKS]
    if not tasks:
        return {}
    text = task_texts(ck, tasks)
    module = ck.core()

    def run_core(latent: np.ndarray, txt: np.ndarray):
        with torch.no_grad():
            return tuple(o.numpy() for o in module(torch.from_numpy(latent), torch.from_numpy(txt)))

    paths = [(enc, *region_decoder(dec, height, width, decode_side)) for enc, dec in (reference, candidate)]
    per_clip: dict[str, list[dict[str, float]]] = {t: [] for t in tasks}
    for clip in clips:
        window = clip.shape[0]
        core = once_per_input(run_core)  # the text rows are the same for every call
        ref, got = (run_clip(clip, tasks, text, height, width, window, 0, cfg.depth_code, cfg.joint_names,
                             enc, core, dec, output_hw=hw) for enc, dec, hw in paths)
        for task in tasks:
            per_clip[task].append(output_drift(task, ref[task][OUTPUT_KEYS[task]], got[task][OUTPUT_KEYS[task]]))
    # A metric undefined on every clip (no body pixel, no valid depth) is left out; its bound then fails.
    return {t: {k: float(np.mean([r[k] for r in rows if k in r])) for k in sorted({k for r in rows for k in r})}
            for t, rows in per_clip.items()}


def output_drift(task: str, ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """One task's output (the user-facing array, thfm_serve.contract.tasks.OUTPUT_KEYS) against a
    reference output of the same input, in task units, with the reference standing in for ground truth.

    Dense tasks use thfm_serve.evaluation's metrics: depth abs-rel (unaligned: both are the same
    relative depth) on valid depth, RMSE, delta1; normals angle over every pixel; matte IoU at 0.5,
    MSE, MAD; densepose part accuracy and UV error. Keypoints: mean and max distance, 2D in pixels,
    3D in mm. The names match contract.specs.VAE_DRIFT_BOUNDS' metrics."""
    from thfm_serve import evaluation as ev

    if task == "depth":
        rows = [ev.depth_metrics(g, r, r > 1e-3, align=None) for g, r in zip(got, ref)]
        return {k: float(np.mean([row[k] for row in rows if row])) for k in ("abs_rel", "rmse", "delta1")} \
            if any(rows) else {}
    if task == "normals":
        return ev.normals_metrics(got, ref, np.ones(ref.shape[:-1], bool))
    if task == "segmentation":
        return ev.matte_metrics(got, ref)
    if task == "densepose":
        return ev.densepose_metrics(got, ref)
    if task in ("keypoints2d", "keypoints3d"):
        err = np.linalg.norm(got.astype(np.float64) - ref.astype(np.float64), axis=-1)
        scale, unit = (1.0, "px") if task == "keypoints2d" else (1000.0, "mm")
        return {f"mean_{unit}": float(err.mean() * scale), f"max_{unit}": float(err.max() * scale)}
    raise ValueError(f"no drift metric for task {task!r}")


def check_vae_drift(drift: Mapping[str, Mapping[str, float]], bounds: Any) -> list[dict[str, Any]]:
    """Each bound (contract.specs.VAE_DRIFT_BOUNDS) against the drift; ExportError naming every bound
    exceeded. A bound on a task the checkpoint has whose metric is missing fails too: a metric that
    could not be measured is not a pass."""
    rows, failures = [], []
    for b in bounds:
        if b.task not in drift:
            continue
        value = drift[b.task].get(b.metric)
        ok = value is not None and b.ok(value)
        rows.append({"task": b.task, "metric": b.metric, "value": value, "limit": b.limit,
                     "higher_is_better": b.higher_is_better, "ok": ok})
        if not ok:
            failures.append(f"{b.task} {b.metric} = {value if value is None else format(value, '.4g')} "
                            f"(bound: {b.describe()})")
    if failures:
        raise ExportError("int8 VAE: task drift against the fp32 VAE beyond the bounds: " + "; ".join(failures))
    return rows
