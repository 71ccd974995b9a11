"""Everything the THFM Triton models do, as plain functions (model.py files only forward to these).

Models of a THFM repository (thfm_serve.protocol names them; repository.py writes their configs):

    preprocess          video BYTES [1] | frames UINT8 [F,H,W,3] -> clip [W,3,T,H,W] (one full window
                        per batch row), geometry INT64 [3], text_<task> [W,L,D] per task
    vae_encoder         clip -> latent                      (ONNX; python+onnxruntime on CPU)
    core                latent, text -> pred_latent, kp2d, kp3d (ONNX / TensorRT; dynamic batching)
    vae_decoder         latent -> maps                      (ONNX; python+onnxruntime on CPU)
    postprocess_dense   geometry, maps_<task> -> one output per dense task (input frames and size)
    postprocess_sparse  geometry, kp2d, kp3d -> keypoints2d, keypoints3d, joint_names
    thfm_dense          ensemble: preprocess -> vae_encoder -> core x4 -> vae_decoder x4 -> postprocess
    thfm_sparse         ensemble: preprocess -> vae_encoder -> core x2 -> postprocess_sparse
    thfm                entry (BLS): any set of tasks in one request, the in-process pipeline's path

Two paths, on purpose:
- The entry model mirrors ThfmPipeline.run exactly: per window it encodes the clip once, runs the
  core once with one batch row per requested task, decodes the dense rows in one decoder call, and
  pads/crops around the fixed-window VAE graphs (export.vae_window: exact, the Wan VAE is causal).
- The ensembles are fixed DAGs that compute every task of their path. An ensemble cannot crop or
  repeat a tensor between steps, so their batch axis is the clip's windows (each a full window, the
  one frame count the VAE graphs take) and each task is its own core step; the core's dynamic
  batcher then merges those steps back into one batch. For clips of whole windows (a window, or any
  clip longer than one) the ensembles equal the pipeline; a clip shorter than a window is padded
  to the full window by repeating its last frame, where the pipeline pads only to the next 4n+1.

Everything a user can get wrong raises ThfmError with a message naming the problem; `guarded` turns
it into that request's TritonError (INVALID_ARG) and the server keeps serving.

Imports of torch (processing) and PyAV (video) are deferred to the functions that need them: the
three onnxruntime models never touch either, and each python model is its own process, so loading
torch there would only slow every server start by about a second per model.
"""

from __future__ import annotations

import json
import logging
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from . import budget, protocol
from .config import DENSE_TASKS, SPARSE_TASKS, TASKS, ThfmConfig, check_resolution, latent_frames
from .errors import CheckpointError, ShapeError, TaskError, ThfmError
from .export.specs import SubmodelSpec
from .export.vae_window import decode_in_window, encode_in_window

logger = logging.getLogger(__name__)

# --- repository files ---------------------------------------------------------------------------

# At the repository root (tritonserver loads only sub-directories as models; a root file is ignored).
REPOSITORY_MANIFEST = "thfm_repository.json"
MANIFEST_FORMAT = "thfm-model-repository"
MANIFEST_VERSION = 1
# In <repo>/core/1/, written by the exporter: the cached UMT5 prompt embedding of every task
# ([text_len, text_dim] float32) and the checkpoint's thfm/config.json (tasks, joints, depth scale).
TASK_EMBEDDINGS = "task_embeddings.npz"
THFM_CONFIG = "thfm_config.json"

# --- tensor names between the models (the ensembles' wiring; the entry model's are in protocol) ---

CLIP = "clip"  # FP32 [W, 3, T, H, W]: W full windows in [-1, 1]
GEOMETRY = "geometry"  # INT64 [3]: input frames, height, width (what outputs are mapped back to)
TEXT_PREFIX = "text_"  # text_<task>: FP32 [W, L, D], the task's embedding once per window
MAPS_PREFIX = "maps_"  # maps_<task>: FP32 [W, 3, T, H, W], the decoder's output for that task
KP2D = "kp2d"  # FP32 [W, T, K, 2], the core's 2D keypoints (the keypoints2d row)
KP3D = "kp3d"  # FP32 [W, T, K, 3], the core's 3D keypoints (the keypoints3d row)
# Spec tensor names of the exported submodels (export/specs.py builds them with these names).
ENCODER_IN, ENCODER_OUT = "video", "latent"
CORE_IN = ("latent", "text")
CORE_OUT = ("pred_latent", "kp2d", "kp3d")
DECODER_IN, DECODER_OUT = "latent", "maps"

# Config parameter of the onnxruntime models: intra-op threads (0 = onnxruntime's default, one per core).
PARAM_THREADS = "intra_op_threads"
# Config parameter of preprocess: the most windows one ensemble request may take (the VAE's max batch).
PARAM_MAX_WINDOWS = "max_windows"


# --- settings -------------------------------------------------------------------------------------

# Default request limits. 600 frames is 20 s at 30 fps; 1920x1080 covers 1080p either way round;
# 256 MiB bounds one request's payload (a 1080p uint8 frame is 6 MB, so raw frames hit this first:
# send encoded video for long clips). All three are written into the entry model's config and can
# be changed there (or with write_repository's `limits`) without touching code.
DEFAULT_MAX_FRAMES = 600
DEFAULT_MAX_PIXELS = 1920 * 1080
DEFAULT_MAX_REQUEST_BYTES = 256 << 20
# Requests a front model (the entry model `thfm`, and `preprocess` for the ensembles) holds waiting
# for its instance, on top of the one it is running. Each waiting request holds its payload (up to
# max_request_bytes) in server memory, so this bounds what a flood of clients can pin: 8 x 256 MiB.
# It also covers a client at concurrency 8 (perf_analyzer's usual sweep) without a rejection.
DEFAULT_MAX_IN_FLIGHT = 8

# Task list bounds: six tasks exist, so a longer list is a mistake or an attack. Unbounded, a 1 MB
# task name came back inside the error message and broke the client's gRPC metadata limit (16 KiB).
MAX_TASK_NAMES = 64
MAX_TASK_NAME_BYTES = 64
# The longest error message a model puts into a response (gRPC carries it as metadata).
MAX_ERROR_CHARS = 2000


@dataclass(frozen=True)
class Limits:
    """Per-request limits, checked before decoding (bytes) and while decoding (frames, pixels).

    max_in_flight is not checked by the models: write_repository turns it into the entry model's
    (and preprocess's) Triton queue policy (`dynamic_batching { default_queue_policy { max_queue_size
    } }`), so tritonserver itself rejects a request that finds that many already waiting, with
    UNAVAILABLE "Exceeds maximum queue size", before a model spends any work on it.
    """

    max_frames: int = DEFAULT_MAX_FRAMES
    max_pixels: int = DEFAULT_MAX_PIXELS  # per frame
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT  # requests waiting per front model (see above)
    # The size of one response (frames x output pixels x channels x 4 bytes per task), checked by
    # thfm_serve.budget before any model work; at most gRPC's message ceiling.
    max_response_bytes: int = budget.DEFAULT_MAX_RESPONSE_BYTES

    def validate(self) -> "Limits":
        for name, value in asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ThfmError(f"limit {name} must be a positive integer, got {value!r}")
        if self.max_response_bytes > budget.MAX_RESPONSE_CEILING:
            raise ThfmError(f"limit max_response_bytes={self.max_response_bytes} is above what one gRPC message "
                            f"can carry ({budget.MAX_RESPONSE_CEILING} bytes: 2 GiB less framing)")
        return self

    def to_params(self) -> dict[str, str]:
        return {protocol.PARAM_MAX_FRAMES: str(self.max_frames), protocol.PARAM_MAX_PIXELS: str(self.max_pixels),
                protocol.PARAM_MAX_REQUEST_BYTES: str(self.max_request_bytes),
                protocol.PARAM_MAX_RESPONSE_BYTES: str(self.max_response_bytes)}


@dataclass(frozen=True)
class Grid:
    """The model grid a clip is fitted to: frames per window (4n+1) and resolution (multiples of 16)."""

    window: int
    height: int
    width: int

    def validate(self) -> "Grid":
        latent_frames(self.window)
        check_resolution(self.height, self.width)
        return self

    def to_params(self) -> dict[str, str]:
        return {protocol.PARAM_WINDOW_FRAMES: str(self.window), protocol.PARAM_HEIGHT: str(self.height),
                protocol.PARAM_WIDTH: str(self.width)}


def model_parameters(model_config: Mapping[str, Any]) -> dict[str, str]:
    """config.pbtxt `parameters` (as the python backend hands them over in JSON) -> {key: string}."""
    params = model_config.get("parameters") or {}
    return {k: str((v or {}).get("string_value", "")) for k, v in params.items()}


def _int_param(params: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = params.get(name, "").strip()
    if not raw:
        if default is None:
            raise ThfmError(f"model config has no {name!r} parameter")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ThfmError(f"model config parameter {name!r} is {raw!r}, not an integer") from None


def grid_from_params(params: Mapping[str, str]) -> Grid:
    return Grid(_int_param(params, protocol.PARAM_WINDOW_FRAMES), _int_param(params, protocol.PARAM_HEIGHT),
                _int_param(params, protocol.PARAM_WIDTH)).validate()


def limits_from_params(params: Mapping[str, str]) -> Limits:
    return Limits(_int_param(params, protocol.PARAM_MAX_FRAMES, DEFAULT_MAX_FRAMES),
                  _int_param(params, protocol.PARAM_MAX_PIXELS, DEFAULT_MAX_PIXELS),
                  _int_param(params, protocol.PARAM_MAX_REQUEST_BYTES, DEFAULT_MAX_REQUEST_BYTES),
                  max_response_bytes=_int_param(params, protocol.PARAM_MAX_RESPONSE_BYTES,
                                                budget.DEFAULT_MAX_RESPONSE_BYTES)).validate()


# --- repository assets ----------------------------------------------------------------------------

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
        return load_task_embeddings(self.root / protocol.CORE / "1" / TASK_EMBEDDINGS, self.config)


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
    cfg = ThfmConfig.load(root / protocol.CORE / "1" / THFM_CONFIG)
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


# --- request inputs -------------------------------------------------------------------------------

def read_clip(video: np.ndarray | None, frames: np.ndarray | None, limits: Limits) -> np.ndarray:
    """The request's clip as uint8 [F, H, W, 3]: decoded from `video` (BYTES [1]) or taken from `frames`.

    Exactly one of the two; the payload is checked against max_request_bytes before decoding, the
    frame count and frame size against max_frames/max_pixels (while decoding, for video: a long
    video stops decoding as soon as it passes the limit).
    """
    if (video is None) == (frames is None):
        which = "both" if video is not None else "neither"
        raise ShapeError(f"send exactly one of {protocol.INPUT_VIDEO!r} (an encoded video, BYTES [1]) or "
                         f"{protocol.INPUT_FRAMES!r} (UINT8 [F, H, W, 3]); got {which}")
    if video is not None:
        return _decode_video(video, limits)
    return _check_frames(frames, limits)


def _decode_video(video: np.ndarray, limits: Limits) -> np.ndarray:
    from .video import decode_video_bytes

    arr = np.asarray(video)
    if arr.dtype != np.object_ or arr.size != 1:
        raise ShapeError(f"{protocol.INPUT_VIDEO!r} must be one BYTES element (the encoded file), got "
                         f"{arr.dtype} {list(arr.shape)}")
    data = arr.reshape(-1)[0]
    if isinstance(data, str):
        data = data.encode("latin-1")
    if not isinstance(data, (bytes, bytearray)):
        raise ShapeError(f"{protocol.INPUT_VIDEO!r} must hold bytes, got {type(data).__name__}")
    if len(data) > limits.max_request_bytes:
        raise ShapeError(f"{protocol.INPUT_VIDEO!r} is {len(data)} bytes, above the limit "
                         f"{protocol.PARAM_MAX_REQUEST_BYTES}={limits.max_request_bytes}")
    if not data:
        raise ShapeError(f"{protocol.INPUT_VIDEO!r} is empty")
    return decode_video_bytes(bytes(data), max_frames=limits.max_frames, max_pixels=limits.max_pixels).frames


def _check_frames(frames: np.ndarray, limits: Limits) -> np.ndarray:
    from .processing import validate_frames

    frames = validate_frames(np.asarray(frames))
    if frames.nbytes > limits.max_request_bytes:
        raise ShapeError(f"{protocol.INPUT_FRAMES!r} is {frames.nbytes} bytes, above the limit "
                         f"{protocol.PARAM_MAX_REQUEST_BYTES}={limits.max_request_bytes}; send encoded video instead")
    n, h, w = frames.shape[:3]
    if n > limits.max_frames:
        raise ShapeError(f"{protocol.INPUT_FRAMES!r} has {n} frames, above the limit "
                         f"{protocol.PARAM_MAX_FRAMES}={limits.max_frames}")
    if h * w > limits.max_pixels:
        raise ShapeError(f"{protocol.INPUT_FRAMES!r} frame size {w}x{h} = {h * w} pixels is above the limit "
                         f"{protocol.PARAM_MAX_PIXELS}={limits.max_pixels}")
    return frames


def read_tasks(tasks: np.ndarray | None, available: Sequence[str]) -> list[str]:
    """BYTES [N] task names -> ordered, de-duplicated task list (TaskError on an unknown one).

    At most MAX_TASK_NAMES names of at most MAX_TASK_NAME_BYTES bytes each: error messages quote a
    bad name, and they travel back as gRPC metadata, which clients cap at 16 KiB.
    """
    from .config import parse_tasks

    if tasks is None:
        raise TaskError(f"missing input {protocol.INPUT_TASKS!r}: name the tasks, from {', '.join(available)}")
    items = np.asarray(tasks, dtype=np.object_).reshape(-1)
    if items.size > MAX_TASK_NAMES:
        raise TaskError(f"{protocol.INPUT_TASKS!r} has {items.size} task names, above the limit of "
                        f"{MAX_TASK_NAMES}; choose from {', '.join(available)} (or 'all')")
    names = []
    for item in items:
        raw = bytes(item) if isinstance(item, (bytes, bytearray)) else str(item).encode("utf-8", "replace")
        if len(raw) > MAX_TASK_NAME_BYTES:
            raise TaskError(f"task name of {len(raw)} bytes ({raw[:24]!r}...) is longer than "
                            f"{MAX_TASK_NAME_BYTES} bytes; choose from {', '.join(available)}")
        try:
            names.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise TaskError(f"task name {raw[:40]!r} is not UTF-8") from None
    return parse_tasks(names, list(available))


# --- preprocess (the ensembles' first step) -------------------------------------------------------

def fit_full_windows(frames: np.ndarray, grid: Grid, max_windows: int) -> np.ndarray:
    """uint8 [F, H, W, 3] -> float32 [num_windows, 3, window, height, width] in [-1, 1].

    Windows follow processing.plan_windows, but every one is fitted to the full window (the one
    frame count the exported VAE graphs take; see the module docstring for what that means for clips
    shorter than a window).
    """
    from .processing import fit_clip, plan_windows

    windows = plan_windows(frames.shape[0], grid.window)
    if len(windows) > max_windows:
        raise ShapeError(
            f"{frames.shape[0]} frames need {len(windows)} windows of {grid.window}; the ensembles take at most "
            f"{max_windows} ({max_windows * grid.window} frames) per request: send longer clips to the "
            f"{protocol.ENTRY_MODEL!r} model")
    clips = [fit_clip(frames[w.start : w.stop], grid.window, grid.height, grid.width) for w in windows]
    return np.concatenate([c.numpy() for c in clips], axis=0)


def preprocess(frames: np.ndarray, grid: Grid, embeddings: Mapping[str, np.ndarray], max_windows: int,
               wanted: Iterable[str]) -> dict[str, np.ndarray]:
    """The preprocess model's outputs that were asked for (`wanted` output names)."""
    wanted = set(wanted)
    clip = fit_full_windows(frames, grid, max_windows)  # [W, 3, T, H, W]
    out: dict[str, np.ndarray] = {CLIP: clip, GEOMETRY: np.asarray(frames.shape[:3], dtype=np.int64)}
    for task, emb in embeddings.items():
        name = TEXT_PREFIX + task
        if name in wanted:
            # The core takes one text row per batch row, and the ensemble's batch rows are windows.
            out[name] = np.ascontiguousarray(np.broadcast_to(emb, (clip.shape[0], *emb.shape)))
    return {k: v for k, v in out.items() if k in wanted}


# --- onnxruntime models ---------------------------------------------------------------------------

def create_session(path: str | Path, threads: int = 0):
    """An onnxruntime CPU session for one exported graph."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: export the model first (`thfm export`)")
    opts = ort.SessionOptions()
    # 0 lets onnxruntime use one thread per core; a value caps it where several models share cores.
    opts.intra_op_num_threads = int(threads)
    # Each python model is its own process and the models of a request run one after another on the
    # same cores: a thread pool spinning after its run would steal CPU from the next model.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class OnnxModel:
    """One exported submodel run by onnxruntime on behalf of a python-backend model.

    With dynamic batching Triton hands over several requests at once; requests whose non-batch
    shapes agree are concatenated along the batch axis and run in one call (up to the spec's max
    batch), which is where batching pays: one pass over the weights for all rows.
    """

    def __init__(self, spec: SubmodelSpec, session):
        self.spec = spec
        self.session = session
        got_in = [i.name for i in session.get_inputs()]
        got_out = [o.name for o in session.get_outputs()]
        if got_in != spec.input_names or got_out != spec.output_names:
            raise CheckpointError(f"{spec.name}: the ONNX graph has inputs {got_in} / outputs {got_out}, the "
                                  f"repository manifest says {spec.input_names} / {spec.output_names}")

    @classmethod
    def load(cls, model_dir: str | Path, version: str | int, name: str,
             params: Mapping[str, str] | None = None) -> "OnnxModel":
        """From a python model's directory (args["model_repository"]): <dir>/<version>/model.onnx, and
        its spec from the repository manifest."""
        assets = load_assets(repository_root(model_dir))
        if name not in assets.specs:
            raise CheckpointError(f"the repository manifest has no spec for {name!r}")
        threads = _int_param(params or {}, PARAM_THREADS, 0)
        return cls(assets.specs[name], create_session(Path(model_dir) / str(version) / "model.onnx", threads))

    def check(self, inputs: Mapping[str, np.ndarray]) -> None:
        for t in self.spec.inputs:
            if t.name in inputs and np.asarray(inputs[t.name]).dtype != np.dtype(t.dtype):
                raise ShapeError(f"{self.spec.name}: input {t.name!r} must be {t.dtype}, got {inputs[t.name].dtype}")
        self.spec.check_inputs(inputs)
        for t in self.spec.inputs:
            check_finite(self.spec.name, t.name, inputs.get(t.name))

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check(inputs)
        outs = self.session.run(self.spec.output_names, {n: np.ascontiguousarray(inputs[n]) for n in self.spec.input_names})
        return dict(zip(self.spec.output_names, outs))

    def run_many(self, batch: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray] | ThfmError]:
        """One result (or the request's error) per request, in order."""
        results: list[dict[str, np.ndarray] | ThfmError | None] = [None] * len(batch)
        groups: dict[tuple, list[int]] = {}
        for i, inputs in enumerate(batch):
            try:
                self.check(inputs)
            except ThfmError as e:
                results[i] = e
                continue
            key = tuple((n, tuple(inputs[n].shape[1:])) for n in self.spec.input_names)
            groups.setdefault(key, []).append(i)
        for members in groups.values():
            for chunk in _chunks(members, [batch[i][self.spec.input_names[0]].shape[0] for i in members],
                                 self.spec.max_batch):
                joined = {n: np.concatenate([batch[i][n] for i in chunk], axis=0) for n in self.spec.input_names}
                outs = self.run(joined)
                start = 0
                for i in chunk:
                    rows = batch[i][self.spec.input_names[0]].shape[0]
                    results[i] = {k: v[start : start + rows] for k, v in outs.items()}
                    start += rows
        return results  # type: ignore[return-value]


def check_finite(model: str, name: str, x: np.ndarray | None) -> None:
    """ShapeError when a float input holds NaN or Inf (it would come back as NaN maps and keypoints,
    or as garbage from a TensorRT engine, with no error).

    One float64 sum decides: the sum of finite float32/float16 values cannot overflow float64, and
    any NaN or Inf makes it non-finite. That is one pass without a boolean temporary, a few ms for a
    Wan2.1 latent; the exact count is computed only for the error message.
    """
    if x is None:
        return
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating) or np.isfinite(x.sum(dtype=np.float64)):
        return
    nan = int(np.count_nonzero(np.isnan(x)))
    inf = int(np.count_nonzero(np.isinf(x)))
    raise ShapeError(f"{model}: input {name!r} has {nan} NaN and {inf} Inf values of {x.size}; "
                     "inputs must be finite")


def _chunks(members: list[int], rows: list[int], limit: int) -> list[list[int]]:
    """Split requests into consecutive groups of at most `limit` rows (each request stays whole)."""
    out, cur, n = [], [], 0
    for m, r in zip(members, rows):
        if cur and n + r > limit:
            out.append(cur)
            cur, n = [], 0
        cur.append(m)
        n += r
    if cur:
        out.append(cur)
    return out


# --- postprocess ----------------------------------------------------------------------------------

def _geometry(geometry: np.ndarray) -> tuple[int, int, int]:
    g = np.asarray(geometry).reshape(-1)
    if g.size != 3 or (g < 1).any():
        raise ShapeError(f"{GEOMETRY!r} must be [frames, height, width], positive, got {g.tolist()}")
    return int(g[0]), int(g[1]), int(g[2])


def _kept(windows_array: np.ndarray, num_frames: int, window: int) -> list[np.ndarray]:
    """Per window of plan_windows(num_frames, window), the kept frames of that window's row
    ([W, T, ...] with time on axis 1) in input order."""
    from .processing import plan_windows

    windows = plan_windows(num_frames, window)
    if windows_array.shape[0] != len(windows):
        raise ShapeError(f"{len(windows)} windows expected for {num_frames} frames, got {windows_array.shape[0]}")
    return [windows_array[i, w.keep_from - w.start : w.stop - w.start] for i, w in enumerate(windows)]


def postprocess_dense(geometry: np.ndarray, maps: Mapping[str, np.ndarray], window: int,
                      depth_log_scale: float) -> dict[str, np.ndarray]:
    """maps_<task> [W, 3, T, h, w] (full windows) -> {task output name: array at the input's frames and size}."""
    from .processing import dense_output

    num_frames, in_h, in_w = _geometry(geometry)
    out = {}
    for task, m in maps.items():
        m = np.asarray(m, dtype=np.float32)
        if m.ndim != 5 or m.shape[1] != 3:
            raise ShapeError(f"{MAPS_PREFIX}{task} must be [windows, 3, frames, height, width], got {list(m.shape)}")
        parts = _kept(m.transpose(0, 2, 1, 3, 4), num_frames, window)  # each [f, 3, h, w]
        out[protocol.OUTPUT_FOR_TASK[task]] = np.concatenate(
            [dense_output(task, p, in_h, in_w, depth_log_scale) for p in parts], axis=0)
    return out


def postprocess_sparse(geometry: np.ndarray, keypoints: Mapping[str, np.ndarray], window: int,
                       joint_names: Sequence[str]) -> dict[str, np.ndarray]:
    """{task: core keypoints [W, T, K, C]} -> {task output name: [F, K, C]} plus joint_names."""
    from .processing import sparse_output

    num_frames, in_h, in_w = _geometry(geometry)
    out = {}
    for task, kp in keypoints.items():
        kp = np.asarray(kp, dtype=np.float32)
        parts = _kept(kp, num_frames, window)
        out[protocol.OUTPUT_FOR_TASK[task]] = np.concatenate([sparse_output(task, p, in_h, in_w) for p in parts], axis=0)
    out[protocol.OUTPUT_JOINT_NAMES] = names_tensor(joint_names)
    return out


def names_tensor(names: Sequence[str]) -> np.ndarray:
    """A BYTES tensor (numpy object array of UTF-8 bytes)."""
    return np.array([n.encode("utf-8") for n in names], dtype=np.object_)


# --- the entry model ------------------------------------------------------------------------------

# call(model name, {input name: array}, [output names]) -> {output name: array}; raises
# ModelCallError when the called model answers with an error.
ModelCall = Callable[[str, Mapping[str, np.ndarray], Sequence[str]], dict[str, np.ndarray]]


class ModelCallError(RuntimeError):
    """A model called by the entry model answered with an error.

    Not a ThfmError: the entry model fits every request to the grid the graphs were exported for
    before calling them, so a failure there is the server's fault (reported as an internal error,
    with the called model's message), not the request's.
    """


def run_entry(frames: np.ndarray, tasks: Sequence[str], grid: Grid, cfg: ThfmConfig,
              embeddings: Mapping[str, np.ndarray], call: ModelCall,
              output_hw: tuple[int, int] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """What ThfmPipeline.run does, with the exported models behind `call`: {task: {key: array}}.

    Per window: the clip is encoded once (padded to the window and cropped back: the VAE graphs
    take one frame count), the core runs once with one batch row per task, and the dense rows are
    decoded in one call. Dense maps come out at output_hw (default: the input's size); keypoints
    are in input pixels either way.
    """
    from .processing import dense_output, fit_clip, plan_windows, sparse_output, task_result

    num_frames, in_h, in_w = frames.shape[:3]
    out_h, out_w = output_hw or (in_h, in_w)
    text = np.stack([embeddings[t] for t in tasks])  # [N, L, D]
    dense_idx = [j for j, t in enumerate(tasks) if t in DENSE_TASKS]
    parts: dict[str, list[np.ndarray]] = {t: [] for t in tasks}

    def encode(x):
        return call(protocol.VAE_ENCODER, {ENCODER_IN: x}, [ENCODER_OUT])[ENCODER_OUT]

    def decode(x):
        return call(protocol.VAE_DECODER, {DECODER_IN: x}, [DECODER_OUT])[DECODER_OUT]

    windows = plan_windows(num_frames, grid.window)
    for i, win in enumerate(windows):
        logger.debug("window %d/%d: frames %d-%d", i + 1, len(windows), win.start, win.stop - 1)
        clip = fit_clip(frames[win.start : win.stop], win.length, grid.height, grid.width).numpy()  # [1,3,T,H,W]
        latent = encode_in_window(encode, clip, grid.window)  # [1, 16, T', h, w]
        core = call(protocol.CORE, {CORE_IN[0]: np.repeat(latent, len(tasks), axis=0), CORE_IN[1]: text}, list(CORE_OUT))
        keep = slice(win.keep_from - win.start, win.stop - win.start)
        if dense_idx:
            maps = decode_in_window(decode, np.ascontiguousarray(core[CORE_OUT[0]][dense_idx]), grid.window)
        for j, t in enumerate(tasks):
            if t in DENSE_TASKS:
                m = maps[dense_idx.index(j)].transpose(1, 0, 2, 3)[keep]  # [f, 3, h, w]
                parts[t].append(dense_output(t, m, out_h, out_w, cfg.depth_log_scale))
            else:
                kp = core[CORE_OUT[1] if t == "keypoints2d" else CORE_OUT[2]][j][keep]
                parts[t].append(sparse_output(t, kp, in_h, in_w))
    joints = list(cfg.joint_names)
    return {t: task_result(t, np.concatenate(parts[t], axis=0), joints if t in SPARSE_TASKS else None) for t in tasks}


def entry_outputs(results: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """{task: {key: array}} -> the entry model's output tensors (protocol names)."""
    from .processing import OUTPUT_KEYS

    out = {}
    for task, arrays in results.items():
        out[protocol.OUTPUT_FOR_TASK[task]] = np.ascontiguousarray(arrays[OUTPUT_KEYS[task]], dtype=np.float32)
        if "joint_names" in arrays:
            out[protocol.OUTPUT_JOINT_NAMES] = names_tensor([str(n) for n in arrays["joint_names"]])
    return out


def local_call(models: Mapping[str, OnnxModel]) -> ModelCall:
    """A ModelCall over in-process onnxruntime models (tests, and running a repository without a server)."""

    def call(name: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        if name not in models:
            raise ModelCallError(f"no model {name!r}")
        result = models[name].run_many([inputs])[0]
        if isinstance(result, ThfmError):
            raise ModelCallError(f"model {name!r} failed: {result}")
        return {k: result[k] for k in outputs}

    return call


# --- Triton glue (pb_utils is passed in: this module never imports the backend's utilities) -------

def request_inputs(request, names: Iterable[str], pb_utils) -> dict[str, np.ndarray | None]:
    """{name: numpy array, or None when the optional input is absent}."""
    out = {}
    for name in names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        out[name] = None if tensor is None else tensor.as_numpy()
    return out


def clip_message(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    """An error message short enough to travel as gRPC metadata (clients cap it at 16 KiB)."""
    message = str(message)
    return message if len(message) <= limit else message[: limit - 30] + f"... ({len(message)} chars)"


def _prefixed(model: str, message: str) -> str:
    # Spec and onnx errors already start with the model's name; say it once.
    message = str(message)
    return message if message.startswith(f"{model}: ") else f"{model}: {message}"


def error_response(pb_utils, message: str):
    message = clip_message(message)
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    err = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(error=err)


def make_response(pb_utils, outputs: Mapping[str, np.ndarray]):
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])


def guarded(model: str, pb_utils, fn: Callable[[], Mapping[str, np.ndarray]]):
    """fn's outputs as a response; a ThfmError becomes the request's error (its message as is), any
    other exception an 'internal error' naming the model (traceback logged): one bad request never
    takes the model down."""
    try:
        return make_response(pb_utils, fn())
    except ThfmError as e:
        logger.info("%s: rejected request: %s", model, clip_message(e, 300))
        return error_response(pb_utils, _prefixed(model, e))
    except Exception as e:  # a bug: report it in the response and keep serving
        logger.error("%s: internal error\n%s", model, traceback.format_exc())
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(
            clip_message(f"{model}: internal error: {type(e).__name__}: {e}")))


def execute_each(requests, model: str, pb_utils, handle: Callable[[Any], Mapping[str, np.ndarray]]) -> list:
    """One response per request, in order: handle(request) -> outputs."""
    return [guarded(model, pb_utils, lambda r=r: handle(r)) for r in requests]


def execute_onnx(requests, onnx: OnnxModel, pb_utils) -> list:
    """The onnxruntime models' execute: all requests of a dynamic batch in as few runs as possible."""
    inputs = [request_inputs(r, onnx.spec.input_names, pb_utils) for r in requests]
    try:
        results = onnx.run_many(inputs)
    except Exception as e:  # a failure of the joined run: every request in it gets the message
        logger.error("%s: internal error\n%s", onnx.spec.name, traceback.format_exc())
        msg = clip_message(f"{onnx.spec.name}: internal error: {type(e).__name__}: {e}")
        return [pb_utils.InferenceResponse(error=pb_utils.TritonError(msg)) for _ in requests]
    responses = []
    for r, res in zip(requests, results):
        if isinstance(res, ThfmError):
            responses.append(error_response(pb_utils, _prefixed(onnx.spec.name, res)))
        else:
            wanted = set(r.requested_output_names())
            responses.append(make_response(pb_utils, {k: v for k, v in res.items() if k in wanted}))
    return responses


def bls_call(pb_utils) -> ModelCall:
    """A ModelCall through Triton's BLS (the entry model calling the other models of the repository)."""

    def call(name: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        request = pb_utils.InferenceRequest(
            model_name=name, requested_output_names=list(outputs),
            inputs=[pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in inputs.items()])
        response = request.exec()
        if response.has_error():
            raise ModelCallError(f"model {name!r} failed: {response.error().message()}")
        return {n: pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in outputs}

    return call


# --- per-model handlers (what each model.py's execute runs for one request) -----------------------

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
        results = run_entry(frames, tasks, self.grid, self.assets.config, self.embeddings, self.call, output_hw)
        return entry_outputs(results)


def check_requested_outputs(wanted: Iterable[str] | None, tasks: Sequence[str], all_outputs: Iterable[str]) -> None:
    """TaskError when a request names outputs its tasks do not produce.

    Triton hands a model every output when the client names none, so "all of them" means no choice
    was made; an explicit list must be covered by the tasks (Triton itself rejects unknown names).
    """
    if wanted is None:
        return
    wanted, all_outputs = set(wanted), set(all_outputs)
    if not wanted or (all_outputs and wanted >= all_outputs):
        return
    produced = {protocol.OUTPUT_FOR_TASK[t] for t in tasks}
    if any(t in SPARSE_TASKS for t in tasks):
        produced.add(protocol.OUTPUT_JOINT_NAMES)
    missing = sorted(wanted - produced)
    if missing:
        raise TaskError(f"outputs {missing} were requested but the request's tasks ({', '.join(tasks)}) do not "
                        f"produce them: add their tasks to {protocol.INPUT_TASKS!r}")


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
        tasks = [t for t in self.embeddings if TEXT_PREFIX + t in wanted]
        budget.check_response(tasks, frames.shape[0], frames.shape[1:3], self.joints, self.limits.max_response_bytes,
                              fixed_tasks=protocol.ENTRY_MODEL)
        return preprocess(frames, self.grid, self.embeddings, self.max_windows, wanted)


class PostprocessModel:
    """postprocess_dense / postprocess_sparse: dense serves the tasks whose maps_<task> inputs its
    config has; sparse the keypoint tasks of the checkpoint."""

    def __init__(self, model_config: Mapping[str, Any], model_dir: str | Path, dense: bool):
        params = model_parameters(model_config)
        self.window = grid_from_params(params).window
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
            return postprocess_dense(inputs[GEOMETRY], maps, self.window, self.cfg.depth_log_scale)
        kps = {t: inputs[k] for t, k in (("keypoints2d", KP2D), ("keypoints3d", KP3D))
               if t in self.tasks and inputs.get(k) is not None}
        if not kps:
            raise ShapeError(f"send at least one of {KP2D!r}, {KP3D!r}")
        return postprocess_sparse(inputs[GEOMETRY], kps, self.window, self.cfg.joint_names)
