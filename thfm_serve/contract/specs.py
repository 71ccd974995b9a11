"""One spec per exported submodel: the single source of every shape-related fact.

The ONNX export (torch.export dynamic shapes), the ONNX validation, the TensorRT optimisation
profiles, the Triton config.pbtxt dims and the perf_analyzer ``--shape`` strings are all derived
from the ``SubmodelSpec`` objects built here, never written twice.

Axes. Every tensor axis is either a fixed int or an affine function of one of four base dims:

    batch           rows per request (one row per task: at most 6 tasks, so max batch 6)
    latent_frames   T' latent frames; input frames are T = 4*(T'-1)+1 (Wan VAE: 4x in time)
    hp, wp          the transformer's patch grid; latent H' = 2*hp (1x2x2 patch), pixels H = 16*hp
                    (VAE 8x in space times the 2x patch)

A tensor's shape holds ints and axis symbols such as ``"batch"``, ``"2*hp"``, ``"16*wp"`` or
``"4*latent_frames-3"``; ``parse_axis`` turns a symbol into an ``Axis`` (base, mul, add), so a shape
for any base-dim assignment follows by arithmetic, and torch.export Dims (``2*Dim("hp")``) too.

Profiles (per base dim, min/opt/max): min is the smallest legal clip (1 frame, 16 px, batch 1),
opt is the export shape, max comes from the checkpoint config's default clip and a batch of 6.

Interface dtypes are float32 at every precision: the low-precision graphs cast inside, so a Triton
config, a client and numpy (which has no bfloat16) never see the compute dtype.
"""

from __future__ import annotations

import enum
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

from typing import Protocol, Sequence

import numpy as np

from ..errors import ShapeError, ThfmError
from .geometry import (
    LATENT_CHANNELS,
    PATCH_SPATIAL,
    VAE_SPATIAL,
    VAE_TEMPORAL,
    PIXEL_MULTIPLE,
    check_resolution,
    latent_frames,
    patch_pixels,
    patches,
    video_frames,
)
from .protocol import CORE, CORE_IN, CORE_OUT, DECODER_IN, DECODER_OUT, ENCODER_IN, ENCODER_OUT, VAE_DECODER, VAE_ENCODER
from .tasks import TASKS


class ClipConfig(Protocol):
    """What build_specs reads from the checkpoint's THFM config (thfm_serve.config.ThfmConfig), named
    here so that the contract does not depend on the config module."""

    frames: int
    height: int
    width: int
    text_len: int
    text_dim: int
    joint_names: Sequence[str]

    @property
    def num_joints(self) -> int: ...


# One batch row per task: a request asking for all six tasks runs the core once with batch 6.
MAX_BATCH = len(TASKS)
BASE_DIMS = ("batch", "latent_frames", "hp", "wp")
PROFILE_LEVELS = ("min", "opt", "max")


class Precision(str, enum.Enum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    INT8 = "int8"
    FP8 = "fp8"  # --target gpu only: Q/DQ E4M3 for GPUs with fp8 tensor cores (Hopper, Ada and newer)


class Target(str, enum.Enum):
    CPU = "cpu"
    GPU = "gpu"


def parse_precision(value: str | Precision) -> Precision:
    try:
        return Precision(value)
    except ValueError:
        raise ThfmError(f"unknown precision {value!r}; choose from {', '.join(p.value for p in Precision)}") from None


# Precisions of the Wan VAE graphs (--vae-precision, --target cpu): fp32; int8 Q/DQ on the
# convolutions for onnxruntime's int8 conv kernels (export/quantize.py, VAE_RECIPE); or bf16, the fp32
# graph executed by OpenVINO's CPU plugin in bf16 (serving.sessions: onnxruntime has no bf16 kernels).
VAE_PRECISIONS = (Precision.FP32, Precision.INT8, Precision.BF16)


def parse_vae_precision(value: str | Precision) -> Precision:
    choices = ", ".join(p.value for p in VAE_PRECISIONS)
    try:
        precision = Precision(value)
    except ValueError:
        raise ThfmError(f"unknown VAE precision {value!r}; choose from {choices}") from None
    if precision not in VAE_PRECISIONS:
        raise ThfmError(f"VAE precision {precision.value!r} is not supported; choose from {choices}")
    return precision


class Runtime(str, enum.Enum):
    """What executes an exported graph on the CPU target (a GPU repository's core is TensorRT's)."""

    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"


# Core precisions OpenVINO may run (--core-runtime openvino): the int8 Q/DQ graph (int8 linears through
# oneDNN, the float remainder in bf16 on CPUs with bf16 instructions) and fp32.
OPENVINO_CORE_PRECISIONS = (Precision.INT8, Precision.FP32)


# export_repository(vae_runtime=AUTO_RUNTIME): the machine's choice (machine.cpu_vae_runtime), what
# `thfm export` does without --vae-runtime; None there is the precision's runtime (default_runtime).
AUTO_RUNTIME = "auto"


def parse_runtime(value: str | Runtime) -> Runtime:
    try:
        return Runtime(value)
    except ValueError:
        raise ThfmError(f"unknown runtime {value!r}; choose from {', '.join(r.value for r in Runtime)}") from None


def default_runtime(name: str, precision: str) -> Runtime:
    """The runtime a graph of this submodel and precision has unless its spec says otherwise: a bf16
    VAE is the fp32 graph run by OpenVINO in bf16 (onnxruntime's CPU provider has no bf16 kernels);
    everything else onnxruntime."""
    if name in (VAE_ENCODER, VAE_DECODER) and precision == Precision.BF16.value:
        return Runtime.OPENVINO
    return Runtime.ONNXRUNTIME


def parse_target(value: str | Target) -> Target:
    try:
        return Target(value)
    except ValueError:
        raise ThfmError(f"unknown target {value!r}; choose from {', '.join(t.value for t in Target)}") from None


# --- axes -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Axis:
    """size = mul * dims[base] + add."""

    base: str
    mul: int = 1
    add: int = 0

    @property
    def symbol(self) -> str:
        s = self.base if self.mul == 1 else f"{self.mul}*{self.base}"
        if self.add:
            s += f"{self.add:+d}"
        return s

    def size(self, dims: Mapping[str, int]) -> int:
        return self.mul * int(dims[self.base]) + self.add

    def torch_dim(self, base_dims: Mapping[str, Any]):
        """The torch.export expression for this axis (``2*Dim("hp")``, ``4*Dim("lt")-3``)."""
        return self.mul * base_dims[self.base] + self.add if (self.mul != 1 or self.add) else base_dims[self.base]


_AXIS_RE = re.compile(r"^(?:(\d+)\*)?([a-z_]+)([+-]\d+)?$")


def parse_axis(symbol: str) -> Axis:
    m = _AXIS_RE.match(symbol.replace(" ", ""))
    if not m or m.group(2) not in BASE_DIMS:
        raise ValueError(f"bad axis symbol {symbol!r}: expected [M*]base[+/-A] with base in {BASE_DIMS}")
    return Axis(m.group(2), int(m.group(1) or 1), int(m.group(3) or 0))


# Symbols used below. Frames: T = 4*T' - 3 = 4*(T'-1)+1 (Wan VAE's causal 4x temporal compression).
FRAMES = Axis("latent_frames", VAE_TEMPORAL, 1 - VAE_TEMPORAL).symbol  # "4*latent_frames-3"
LATENT_H = Axis("hp", PATCH_SPATIAL).symbol  # "2*hp"
LATENT_W = Axis("wp", PATCH_SPATIAL).symbol
PIXEL_H = Axis("hp", PIXEL_MULTIPLE).symbol  # "16*hp"
PIXEL_W = Axis("wp", PIXEL_MULTIPLE).symbol


# --- tensors and tolerances -------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name, e.g. "float32"
    shape: tuple[int | str, ...]  # ints, or axis symbols (see parse_axis)
    # For dummy inputs: "normal" (latents, embeddings) or "video" (uniform in [-1, 1]).
    fill: str = "normal"
    doc: str = ""

    def axes(self) -> dict[int, Axis]:
        """Index -> Axis for every symbolic axis."""
        return {i: parse_axis(d) for i, d in enumerate(self.shape) if isinstance(d, str)}

    def concrete(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else parse_axis(d).size(dims) for d in self.shape)


@dataclass(frozen=True)
class Tolerance:
    """Element-wise |onnx - torch| <= atol + rtol * |torch| (numpy.allclose semantics)."""

    atol: float
    rtol: float

    def check(self, got: np.ndarray, ref: np.ndarray) -> tuple[bool, float, float]:
        """(ok, max abs diff, max rel diff); rel diff is |d| / max(|ref|, 1e-6)."""
        got = np.asarray(got, dtype=np.float64)
        ref = np.asarray(ref, dtype=np.float64)
        diff = np.abs(got - ref)
        if diff.size == 0:
            return True, 0.0, 0.0
        finite = bool(np.isfinite(got).all())
        ok = finite and bool((diff <= self.atol + self.rtol * np.abs(ref)).all())
        max_abs = float(diff.max()) if finite else float("inf")
        max_rel = float((diff / np.maximum(np.abs(ref), 1e-6)).max()) if finite else float("inf")
        return ok, max_abs, max_rel


# Tolerances per precision and output kind. fp32 is the exporter's own error (dynamo export matched
# Wan within ~2e-6; kernels differ in summation order). Low precisions were measured on the tiny and
# 1.3B random checkpoints (export/RESULTS.md) and set with headroom; keypoints2d goes through a sigmoid
# so its error is bounded by the logits' error / 4.
_TOLERANCES: dict[str, dict[str, Tolerance]] = {
    "fp32": {"latent": Tolerance(1e-3, 1e-3), "keypoints": Tolerance(1e-3, 1e-3), "maps": Tolerance(1e-3, 1e-3)},
    "fp16": {"latent": Tolerance(5e-2, 5e-2), "keypoints": Tolerance(5e-2, 5e-2), "maps": Tolerance(2e-2, 2e-2)},
    "bf16": {"latent": Tolerance(2.5e-1, 1e-1), "keypoints": Tolerance(1.5e-1, 1e-1), "maps": Tolerance(5e-2, 5e-2)},
    "int8": {"latent": Tolerance(5e-1, 2e-1), "keypoints": Tolerance(3e-1, 2e-1), "maps": Tolerance(1e-1, 1e-1)},
    # fp8 E4M3 has 3 mantissa bits against int8's ~7 at the calibrated range: measured on the tiny
    # checkpoint (latent max abs 0.03), the int8 bounds hold with the same headroom.
    "fp8": {"latent": Tolerance(5e-1, 2e-1), "keypoints": Tolerance(3e-1, 2e-1), "maps": Tolerance(1e-1, 1e-1)},
}


def tolerance_for(precision: str | Precision, kind: str) -> Tolerance:
    return _TOLERANCES[Precision(precision).value][kind]


# A low-precision VAE (--vae-precision int8 / bf16) against the fp32 PyTorch VAE, element-wise, on inputs from the
# calibrated distribution (held-out clips; the core's dense latents for the decoder). Set from what
# the numbers mean, not from a measurement: maps are in [0, 1], and 0.1 is the per-element budget
# the int8 core already has on them ("maps" above); an encoder latent is normalised to unit scale,
# and its budget is the int8 core's latent budget.
_VAE_TOLERANCES: dict[str, dict[str, Tolerance]] = {
    "fp32": {"latent": _TOLERANCES["fp32"]["latent"], "maps": _TOLERANCES["fp32"]["maps"]},
    "int8": {"latent": _TOLERANCES["int8"]["latent"], "maps": _TOLERANCES["int8"]["maps"]},
    # bf16 keeps 8 significant bits per value where int8 keeps 8 per tensor: the core's bf16 budgets.
    "bf16": {"latent": _TOLERANCES["bf16"]["latent"], "maps": _TOLERANCES["bf16"]["maps"]},
}


def vae_tolerance_for(precision: str | Precision, kind: str) -> Tolerance:
    return _VAE_TOLERANCES[parse_vae_precision(precision).value][kind]


@dataclass(frozen=True)
class DriftBound:
    """A bound on one task metric of the int8 VAE's maps against the fp32 VAE's (export fails past it)."""

    task: str
    metric: str  # a key of thfm_serve.evaluation's metric function for the task
    limit: float
    higher_is_better: bool

    def ok(self, value: float) -> bool:
        return value >= self.limit if self.higher_is_better else value <= self.limit

    def describe(self) -> str:
        return f"{self.task} {self.metric} {'>=' if self.higher_is_better else '<='} {self.limit:g}"


# Drift of the dense tasks' maps decoded by the int8 VAE against the fp32 VAE, in task units
# (thfm_serve.evaluation's metrics with the fp32 maps as the ground truth). Each bound keeps the int8
# VAE's error a fraction of an error users already accept, so it cannot dominate a model's error:
# - normals: 5 degrees mean angle, under half of THFM's own 11.01 deg on Hi4D (model-recipe.md);
#   added in quadrature to that error it moves 11.0 to 12.1 deg;
# - depth: abs-rel 0.02 (relative depth, both unaligned), a third of the 0.06 a trivial constant
#   depth already scores on rendered people (README's eval table);
# - segmentation: IoU >= 0.9 of the mattes thresholded at 0.5;
# - densepose: part accuracy >= 0.85 (the part is round(I * 24): an error of 1/48 on I flips a pixel
#   that sits at a part boundary).
# The thresholded metrics and the normals' angle are worst on maps near the decision points: a
# random-weight VAE decodes every latent to about 0.5 +- 0.1, so mattes sit at the IoU threshold,
# parts at bin edges and normals (2 * map - 1) are short vectors whose direction a small error turns.
# The first bounds written here (3 deg, IoU 0.95, part accuracy 0.9) failed on the tiny random
# checkpoint for that reason (3.65 deg, 0.922, 0.886 measured; export/RESULTS.md), while its
# unthresholded errors were small (matte MAD 0.0028, UV error 0.008); a trained decoder's saturated
# mattes, unit normals and confident parts are far from those points.
VAE_DRIFT_BOUNDS: tuple[DriftBound, ...] = (
    DriftBound("depth", "abs_rel", 0.02, higher_is_better=False),
    DriftBound("normals", "mean_deg", 5.0, higher_is_better=False),
    DriftBound("segmentation", "iou", 0.9, higher_is_better=True),
    DriftBound("densepose", "part_acc", 0.85, higher_is_better=True),
)


# --- submodel spec ----------------------------------------------------------------------------

@dataclass
class SubmodelSpec:
    """Everything shape-related about one exported submodel.

    profiles: base dim -> (min, opt, max). A base dim that is static for this submodel (the VAE's
    latent_frames, see build_specs) has min == opt == max and appears in ``static_dims``.
    """

    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    profiles: dict[str, tuple[int, int, int]]
    tolerances: dict[str, Tolerance]  # output name -> tolerance at this spec's precision
    precision: str = Precision.FP32.value
    static_dims: tuple[str, ...] = ()  # fixed by design (the VAE window); degenerate profiles are fixed too
    notes: list[str] = field(default_factory=list)
    runtime: str | None = None  # a Runtime value; None: default_runtime(name, precision)

    def __post_init__(self) -> None:
        self.runtime = (parse_runtime(self.runtime) if self.runtime else default_runtime(self.name, self.precision)).value

    # -- lookup
    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def tensor(self, name: str) -> TensorSpec:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no tensor {name!r}; it has {self.input_names + self.output_names}")

    @property
    def dynamic_dims(self) -> list[str]:
        """Base dims that vary: used by a tensor, not static by design, and min < max in the profile.
        Every other axis is a fixed size in the graph, the Triton dims and the TensorRT profile."""
        used = {a.base for t in self.inputs + self.outputs for a in t.axes().values()}
        return [d for d in BASE_DIMS if d in used and d not in self.static_dims
                and self.profiles[d][0] != self.profiles[d][2]]

    @property
    def max_batch(self) -> int:
        return self.profiles["batch"][2]

    # -- dims and shapes
    def dims(self, which: str = "opt") -> dict[str, int]:
        """Base dims at a profile level: 'min', 'opt' or 'max'."""
        if which not in PROFILE_LEVELS:
            raise ValueError(f"profile level must be one of {PROFILE_LEVELS}, got {which!r}")
        i = PROFILE_LEVELS.index(which)
        return {d: v[i] for d, v in self.profiles.items()}

    def shape(self, tensor: str, which: str | Mapping[str, int] = "opt") -> tuple[int, ...]:
        dims = self.dims(which) if isinstance(which, str) else which
        return self.tensor(tensor).concrete(dims)

    def shapes(self, which: str | Mapping[str, int] = "opt") -> dict[str, tuple[int, ...]]:
        return {t.name: self.shape(t.name, which) for t in self.inputs + self.outputs}

    def check_dims(self, dims: Mapping[str, int]) -> None:
        """ShapeError when a base dim is outside the profile (names the dim, value and range)."""
        for d, (lo, _, hi) in self.profiles.items():
            if d in dims and not lo <= dims[d] <= hi:
                raise ShapeError(f"{self.name}: {_describe(d, dims[d])} is outside the export profile "
                                 f"({_describe(d, lo)} .. {_describe(d, hi)})")

    def dims_of(self, arrays: Mapping[str, Any]) -> dict[str, int]:
        """Infer base dims from concrete input arrays/shapes; ShapeError on an inconsistent shape."""
        dims: dict[str, int] = {}
        for t in self.inputs:
            if t.name not in arrays:
                raise ShapeError(f"{self.name}: missing input {t.name!r}")
            shape = tuple(getattr(arrays[t.name], "shape", arrays[t.name]))
            if len(shape) != len(t.shape):
                raise ShapeError(f"{self.name}: input {t.name!r} has rank {len(shape)}, expected {len(t.shape)} {list(t.shape)}")
            for want, got in zip(t.shape, shape):
                if isinstance(want, int):
                    if want != got:
                        raise ShapeError(f"{self.name}: input {t.name!r} has shape {list(shape)}, expected {list(t.shape)}")
                    continue
                ax = parse_axis(want)
                if (got - ax.add) % ax.mul or (got - ax.add) // ax.mul < 1:
                    raise ShapeError(f"{self.name}: input {t.name!r} axis {want} cannot be {got}")
                base = (got - ax.add) // ax.mul
                if dims.setdefault(ax.base, base) != base:
                    raise ShapeError(f"{self.name}: inputs disagree on {ax.base} ({dims[ax.base]} vs {base})")
        return dims

    def check_inputs(self, arrays: Mapping[str, Any]) -> dict[str, int]:
        dims = self.dims_of(arrays)
        self.check_dims(dims)
        return dims

    # -- derived artefacts
    def triton_dims(self, tensor: str, drop_batch: bool = False) -> list[int]:
        """config.pbtxt dims: -1 for each dynamic axis. drop_batch=True leaves out axis 0 (the batch),
        as Triton wants when the model config has max_batch_size > 0."""
        t = self.tensor(tensor)
        dynamic = set(self.dynamic_dims)
        out = [-1 if isinstance(d, str) and parse_axis(d).base in dynamic else
               (d if isinstance(d, int) else self.shape(tensor)[i]) for i, d in enumerate(t.shape)]
        if drop_batch:
            if t.shape[0] != "batch":
                raise ValueError(f"{self.name}.{tensor}: axis 0 is not the batch")
            out = out[1:]
        return out

    def trt_profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Input name -> (min, opt, max) shapes for IOptimizationProfile.set_shape."""
        return {t.name: tuple(self.shape(t.name, w) for w in PROFILE_LEVELS) for t in self.inputs}  # type: ignore[return-value]

    def perf_shapes(self, which: str = "opt", drop_batch: bool = False) -> list[str]:
        """perf_analyzer ``--shape name:d1,d2,...`` values (without the flag) for every input."""
        out = []
        for t in self.inputs:
            shape = self.shape(t.name, which)
            if drop_batch:
                shape = shape[1:]
            out.append(f"{t.name}:{','.join(str(d) for d in shape)}")
        return out

    def torch_dynamic_shapes(self) -> dict[str, dict[int, Any]]:
        """``dynamic_shapes`` for torch.export / torch.onnx.export(dynamo=True), keyed by input name.

        Each dynamic base dim becomes one torch.export Dim bounded by the profile; derived axes are
        affine expressions of it (``2*Dim("hp")``), so the exporter proves the relations.
        """
        from torch.export import Dim

        base = {d: Dim(d, min=self.profiles[d][0], max=self.profiles[d][2]) for d in self.dynamic_dims}
        out: dict[str, dict[int, Any]] = {}
        for t in self.inputs:
            out[t.name] = {i: ax.torch_dim(base) for i, ax in t.axes().items() if ax.base in base}
        return out

    def onnx_dim_params(self) -> dict[str, dict[int, str]]:
        """Tensor name -> {axis: symbol} for every dynamic axis, inputs and outputs; the exported
        ONNX graph's dim_params are renamed to these symbols and validation checks them."""
        dynamic = set(self.dynamic_dims)
        return {t.name: {i: ax.symbol for i, ax in t.axes().items() if ax.base in dynamic}
                for t in self.inputs + self.outputs}

    def dummy_inputs(self, which: str | Mapping[str, int] = "opt", seed: int = 0) -> dict[str, np.ndarray]:
        """Random inputs at a profile level (or explicit base dims); same seed, same arrays."""
        rng = np.random.default_rng(seed)
        out = {}
        for t in self.inputs:
            shape = self.shape(t.name, which)
            if t.fill == "video":
                arr = rng.uniform(-1.0, 1.0, size=shape)
            else:
                arr = rng.standard_normal(size=shape)
            out[t.name] = arr.astype(t.dtype)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "precision": self.precision,
            "inputs": [asdict(t) for t in self.inputs],
            "outputs": [asdict(t) for t in self.outputs],
            "profiles": {d: list(v) for d, v in self.profiles.items()},
            "static_dims": list(self.static_dims),
            "tolerances": {k: asdict(v) for k, v in self.tolerances.items()},
            "notes": list(self.notes),
            "trt_profile": {k: [list(s) for s in v] for k, v in self.trt_profile().items()},
            # Written only where it is not the precision's default runtime, so the manifests' keys (which
            # hold this dict) of graphs exported before the field existed still match.
            **({"runtime": self.runtime} if self.runtime != default_runtime(self.name, self.precision).value else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SubmodelSpec":
        def tensors(items: Iterable[Mapping[str, Any]]) -> list[TensorSpec]:
            return [TensorSpec(**{**t, "shape": tuple(t["shape"])}) for t in items]

        return cls(
            name=data["name"],
            inputs=tensors(data["inputs"]),
            outputs=tensors(data["outputs"]),
            profiles={d: tuple(v) for d, v in data["profiles"].items()},  # type: ignore[misc]
            tolerances={k: Tolerance(**v) for k, v in data["tolerances"].items()},
            precision=data["precision"],
            static_dims=tuple(data.get("static_dims", ())),
            notes=list(data.get("notes", [])),
            runtime=data.get("runtime"),
        )


def _describe(dim: str, value: int) -> str:
    if dim == "latent_frames":
        return f"{video_frames(value)} frames (latent_frames={value})"
    if dim in ("hp", "wp"):
        return f"{'height' if dim == 'hp' else 'width'} {patch_pixels(value)}px ({dim}={value})"
    return f"{dim} {value}"


def base_dims_for(frames: int, height: int, width: int, batch: int = 1) -> dict[str, int]:
    """Clip geometry -> base dims; ShapeError on frames not 4n+1 or sizes not multiples of 16."""
    check_resolution(height, width)
    if batch < 1:
        raise ShapeError(f"batch {batch} must be at least 1")
    return {"batch": batch, "latent_frames": latent_frames(frames), "hp": patches(height), "wp": patches(width)}


def build_specs(
    cfg: ClipConfig,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    batch: int = 1,
    precision: str | Precision = Precision.FP32,
    max_batch: int = MAX_BATCH,
    vae_static_frames: bool = True,
    latent_channels: int = LATENT_CHANNELS,
    max_frames: int | None = None,
    max_height: int | None = None,
    max_width: int | None = None,
    vae_precision: str | Precision = Precision.FP32,
    core_runtime: str | Runtime | None = None,
    vae_runtime: str | Runtime | None = None,
) -> dict[str, SubmodelSpec]:
    """Specs for "core", "vae_encoder" and "vae_decoder" (contract.protocol names).

    frames/height/width: the export (opt) shape; default the checkpoint config's clip. The max
    profile is the larger of that and the config's default clip, with ``max_batch`` rows, unless
    max_frames/max_height/max_width set it; an opt shape above an explicit max is a ShapeError.

    vae_static_frames: the Wan VAE encodes and decodes in a Python loop over time chunks with a
    feature cache, so torch.export specialises the frame count (the loop is unrolled for the traced
    length). The VAE models are therefore exported for one window (frames static, batch/height/width
    dynamic); shorter clips are padded to the window and cropped after (contract.vae_window), which is
    exact because the Wan VAE is causal in time.

    core_runtime, vae_runtime: what runs the core graph and the VAE graphs (None: default_runtime, which
    for the VAE follows its precision).
    """
    precision = Precision(precision)
    frames = cfg.frames if frames is None else frames
    height = cfg.height if height is None else height
    width = cfg.width if width is None else width
    opt = base_dims_for(frames, height, width, batch)
    default = base_dims_for(cfg.frames, cfg.height, cfg.width, max_batch)
    if batch > max_batch:
        raise ShapeError(f"export batch {batch} exceeds the max batch {max_batch}")
    explicit = base_dims_for(max_frames or cfg.frames, max_height or cfg.height, max_width or cfg.width, max_batch)
    profiles = {}
    for d in BASE_DIMS:
        given = {"latent_frames": max_frames, "hp": max_height, "wp": max_width}.get(d)
        hi = explicit[d] if given else max(opt[d], default[d])
        if opt[d] > hi:
            raise ShapeError(f"the export shape's {_describe(d, opt[d])} is outside the profile (max {_describe(d, hi)})")
        profiles[d] = (1, opt[d], hi)
    k = cfg.num_joints
    f32 = "float32"

    def tol(kind: str) -> Tolerance:
        return tolerance_for(precision, kind)

    latent = TensorSpec(CORE_IN[0], f32, ("batch", latent_channels, "latent_frames", LATENT_H, LATENT_W),
                        doc="normalised Wan latent [B,16,T',H/8,W/8]")
    core = SubmodelSpec(
        name=CORE,
        inputs=[latent,
                TensorSpec(CORE_IN[1], f32, ("batch", cfg.text_len, cfg.text_dim),
                           doc="task prompt embedding (UMT5, zero-padded to text_len)")],
        outputs=[TensorSpec(CORE_OUT[0], f32, latent.shape, doc="predicted task latent (-v)"),
                 TensorSpec(CORE_OUT[1], f32, ("batch", FRAMES, k, 2), doc="2D keypoints, normalised [0,1] (x, y)"),
                 TensorSpec(CORE_OUT[2], f32, ("batch", FRAMES, k, 3), doc="3D keypoints, metres, root-relative")],
        profiles=dict(profiles),
        tolerances={CORE_OUT[0]: tol("latent"), CORE_OUT[1]: tol("keypoints"), CORE_OUT[2]: tol("keypoints")},
        precision=precision.value,
        runtime=core_runtime and parse_runtime(core_runtime).value,
    )

    vae_profiles = dict(profiles)
    static: tuple[str, ...] = ()
    notes: list[str] = []
    if vae_static_frames:
        # The window (export frames) is the one frame count the VAE graphs accept.
        lt = opt["latent_frames"]
        vae_profiles["latent_frames"] = (lt, lt, lt)
        static = ("latent_frames",)
        notes.append(f"frames static at {frames} (the window): the Wan VAE loops over time chunks in "
                     "Python with a feature cache; shorter clips are padded to the window and cropped "
                     "(exact: the VAE is causal in time)")
    # The VAE is fp32 by default at every core precision: the Wan authors run it in fp32 (diffusers'
    # Wan examples load AutoencoderKLWan with torch_dtype=float32, as checkpoint.load_checkpoint does),
    # and a low-precision decoder shows in every dense map. The precision flag applies to the core
    # only; vae_precision (--vae-precision) makes the VAE graphs int8 for onnxruntime on CPU, where
    # the decoder dominates the time of a dense request (export/quantize.py, VAE_RECIPE).
    vae_precision = parse_vae_precision(vae_precision)
    vae_tol, vae_lat_tol = vae_tolerance_for(vae_precision, "maps"), vae_tolerance_for(vae_precision, "latent")
    encoder = SubmodelSpec(
        name=VAE_ENCODER,
        inputs=[TensorSpec(ENCODER_IN, f32, ("batch", 3, FRAMES, PIXEL_H, PIXEL_W), fill="video",
                           doc="RGB clip in [-1, 1], 4n+1 frames")],
        outputs=[TensorSpec(ENCODER_OUT, f32, latent.shape, doc=latent.doc)],
        profiles=vae_profiles,
        tolerances={ENCODER_OUT: vae_lat_tol},
        precision=vae_precision.value,
        runtime=vae_runtime and parse_runtime(vae_runtime).value,
        static_dims=static,
        notes=list(notes),
    )
    decoder = SubmodelSpec(
        name=VAE_DECODER,
        inputs=[TensorSpec(DECODER_IN, f32, latent.shape, doc=latent.doc)],
        outputs=[TensorSpec(DECODER_OUT, f32, ("batch", 3, FRAMES, PIXEL_H, PIXEL_W), doc="task maps in [0, 1]")],
        profiles=dict(vae_profiles),
        tolerances={DECODER_OUT: vae_tol},
        precision=vae_precision.value,
        runtime=vae_runtime and parse_runtime(vae_runtime).value,
        static_dims=static,
        notes=list(notes),
    )
    return {CORE: core, VAE_ENCODER: encoder, VAE_DECODER: decoder}


__all__ = [
    "AUTO_RUNTIME", "Axis", "BASE_DIMS", "DriftBound", "LATENT_CHANNELS", "MAX_BATCH", "OPENVINO_CORE_PRECISIONS", "PROFILE_LEVELS",
    "Precision", "Runtime", "SubmodelSpec", "Target", "default_runtime", "parse_runtime",
    "TensorSpec", "Tolerance", "VAE_SPATIAL", "base_dims_for", "build_specs", "parse_axis", "parse_precision",
    "parse_target", "parse_vae_precision", "tolerance_for", "VAE_DRIFT_BOUNDS", "VAE_PRECISIONS", "vae_tolerance_for",
]
