"""`thfm perf`: measure a served model with Triton's perf_analyzer.

perf_analyzer (2.51.0, from the tritonclient 2.51.0 wheel; scripts/setup.sh puts it in
<venv>/perf_analyzer) drives the server over gRPC at a fixed request concurrency and reports
throughput and latency percentiles. This module builds its command line from what the server says
about the model (get_model_config) and from the export specs (thfm_serve/contract/specs.py), runs one
perf_analyzer per concurrency level, merges the CSVs and writes a JSON summary.

Inputs per model kind:
  * the entry model "thfm" (and the ensembles) take BYTES inputs: an encoded video and a task list.
    perf_analyzer cannot invent valid BYTES data, so a JSON data file (--input-data) is written with a
    small generated clip (mp4, one model window at the model resolution) and the task names;
  * "core", "vae_encoder", "vae_decoder" take float tensors with dynamic axes: their concrete shapes
    come from the export spec (SubmodelSpec.perf_shapes) at the served geometry, checked against the
    served config, and perf_analyzer fills them with random data.

Everything up to running the binary is plain functions (tests/test_perf.py calls them without a
server).
"""

from __future__ import annotations

import base64
import csv
import json
import logging
import os
import shlex
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .config import ThfmConfig, latent_frames, parse_tasks
from .clipgen import walking_clip
from .contract.params import model_parameters, read_params
from .errors import ThfmError
from .contract.protocol import (
    CORE,
    CORE_IN,
    DENSE_ENSEMBLE,
    ENTRY_MODEL,
    INPUT_FRAMES,
    INPUT_TASKS,
    INPUT_VIDEO,
    PARAM_HEIGHT,
    PARAM_WIDTH,
    PARAM_WINDOW_FRAMES,
    SPARSE_ENSEMBLE,
    VAE_DECODER,
    VAE_ENCODER,
)

logger = logging.getLogger(__name__)

# Models whose inputs are described by an export spec (thfm_serve/contract/specs.py build_specs keys).
SPEC_MODELS = (CORE, VAE_ENCODER, VAE_DECODER)
# Models that take the entry contract (video/frames + tasks).
CLIP_MODELS = (ENTRY_MODEL, DENSE_ENSEMBLE, SPARSE_ENSEMBLE)
DEFAULT_TASKS = ("depth", "keypoints2d")  # one dense and one sparse task: both server paths run
PERF_CSV = "perf.csv"
PERF_SUMMARY = "summary.json"
INPUT_DATA = "input_data.json"
# perf_analyzer reports latencies in microseconds; the summary uses milliseconds.
_US_PER_MS = 1000.0
# Columns perf_analyzer's -f CSV has (2.51); their sum is its "Avg latency" for a concurrency level.
_LATENCY_PARTS = ("Client Send", "Network+Server Send/Recv", "Server Queue", "Server Compute Input",
                  "Server Compute Infer", "Server Compute Output", "Client Recv")
_PERCENTILES = ("p50", "p90", "p95", "p99")
# Config dtypes (model_config.proto names, as get_model_config returns them) -> perf_analyzer's.
_TRITON_DTYPES = {"TYPE_STRING": "BYTES", "TYPE_FP32": "FP32", "TYPE_FP16": "FP16", "TYPE_BF16": "BF16",
                  "TYPE_UINT8": "UINT8", "TYPE_INT8": "INT8", "TYPE_INT32": "INT32", "TYPE_INT64": "INT64",
                  "TYPE_BOOL": "BOOL"}


# --- locating perf_analyzer ---------------------------------------------------------------------

@dataclass(frozen=True)
class PerfAnalyzer:
    binary: Path
    libdir: Path

    def env(self, base: Mapping[str, str] | None = None, host: str | None = None) -> dict[str, str]:
        """Environment for the binary: its private libs (libb64.so.0d, libcudart.so.12) first on
        LD_LIBRARY_PATH, and the server host exempt from any proxy (gRPC honours http_proxy)."""
        env = dict(os.environ if base is None else base)
        paths = [str(self.libdir)] + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else [])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(paths)
        if host:
            for key in ("no_proxy", "NO_PROXY"):
                env[key] = ",".join(x for x in (env.get(key, ""), host) if x)
        return env


def find_perf_analyzer(venv: str | Path | None = None) -> PerfAnalyzer:
    """<venv>/perf_analyzer/{bin/perf_analyzer, lib}; the venv defaults to the running Python's."""
    root = Path(venv) if venv is not None else Path(sys.prefix)
    binary = root / "perf_analyzer" / "bin" / "perf_analyzer"
    libdir = root / "perf_analyzer" / "lib"
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise ThfmError(f"perf_analyzer not found at {binary}: run scripts/setup.sh")
    missing = [n for n in ("libb64.so.0d", "libcudart.so.12") if not (libdir / n).exists()]
    if missing:
        raise ThfmError(f"perf_analyzer's libraries {missing} are missing from {libdir}: run scripts/setup.sh")
    return PerfAnalyzer(binary, libdir)


# --- options ------------------------------------------------------------------------------------

@dataclass
class PerfOptions:
    url: str  # gRPC HOST:PORT
    model: str = ENTRY_MODEL
    out: Path = Path("perf_results")
    concurrency: tuple[int, ...] = (1,)
    # Time-window mode: each measurement window lasts measurement_ms, and perf_analyzer repeats
    # windows (up to max_trials) until 3 in a row agree within stability_percentage.
    measurement_ms: int = 5000
    stability_percentage: float = 10.0
    max_trials: int = 10
    # Fixed-count mode instead: exactly this many requests per concurrency level, no stability
    # search. For models whose one request takes seconds, a time window holds too few requests.
    request_count: int | None = None
    tasks: tuple[str, ...] = DEFAULT_TASKS
    # Geometry: the clip (entry model) or the spec shapes (core/VAE). None: the entry model's
    # window_frames/height/width parameters.
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    batch: int = 1  # rows per request for core/VAE models (one row per task in the real server)
    timeout_s: float = 3600.0
    extra_args: tuple[str, ...] = ()

    def validate(self) -> "PerfOptions":
        host, sep, port = self.url.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ThfmError(f"--url must be HOST:PORT (the gRPC endpoint), got {self.url!r}")
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise ThfmError(f"concurrency levels must be positive integers, got {list(self.concurrency)}")
        if self.measurement_ms < 100:
            raise ThfmError(f"--measurement-ms must be at least 100, got {self.measurement_ms}")
        if self.request_count is not None and self.request_count < 1:
            raise ThfmError(f"--request-count must be at least 1, got {self.request_count}")
        if self.batch < 1:
            raise ThfmError(f"--batch must be at least 1, got {self.batch}")
        if self.frames is not None:
            latent_frames(self.frames)
        self.tasks = tuple(parse_tasks(list(self.tasks)))
        return self

    @property
    def host(self) -> str:
        return self.url.rpartition(":")[0].strip("[]")


def parse_concurrency(text: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4); also 'START:END[:STEP]' like perf_analyzer's --concurrency-range."""
    text = text.strip()
    try:
        if ":" in text:
            parts = [int(p) for p in text.split(":")]
            if len(parts) not in (2, 3):
                raise ValueError
            start, end, step = parts[0], parts[1], parts[2] if len(parts) == 3 else 1
            if step < 1 or end < start:
                raise ValueError
            values = tuple(range(start, end + 1, step))
        else:
            values = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ThfmError(f"--concurrency expects a list like 1,2,4 or a range like 1:8:2, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ThfmError(f"--concurrency levels must be positive integers, got {text!r}")
    return tuple(dict.fromkeys(values))  # de-duplicated, in order


# --- the served model ---------------------------------------------------------------------------

def fetch_model_config(url: str, model: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """The served model's config (JSON form of model_config.proto) over gRPC."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    try:
        client = grpcclient.InferenceServerClient(url, channel_args=[("grpc.enable_http_proxy", 0)])
    except InferenceServerException as e:
        raise ThfmError(f"cannot reach Triton at {url}: {e}") from None
    try:
        if not client.is_server_live(client_timeout=timeout_s):
            raise ThfmError(f"Triton at {url} is not live")
        if not client.is_model_ready(model, client_timeout=timeout_s):
            try:
                names = [m.get("name") for m in client.get_model_repository_index(as_json=True).get("models", [])]
                has = f"; the server has {sorted(set(names))}"
            except InferenceServerException:  # `thfm serve` restricts the repository API
                has = ""
            raise ThfmError(f"model {model!r} is not ready on {url}{has}")
        return client.get_model_config(model, as_json=True, client_timeout=timeout_s)["config"]
    except InferenceServerException as e:
        raise ThfmError(f"Triton at {url}: {e.message() if hasattr(e, 'message') else e}") from None
    finally:
        client.close()


@dataclass(frozen=True)
class ServedInput:
    name: str
    datatype: str  # perf_analyzer's names: FP32, BYTES, UINT8, ...
    dims: tuple[int, ...]  # as in the config (without the batch axis when max_batch_size > 0)
    optional: bool = False


def served_inputs(config: Mapping[str, Any]) -> list[ServedInput]:
    out = []
    for t in config.get("input", []):
        dtype = t.get("data_type", "TYPE_FP32")
        out.append(ServedInput(
            name=t["name"],
            datatype=_TRITON_DTYPES.get(dtype, dtype.removeprefix("TYPE_")),
            dims=tuple(int(d) for d in t.get("dims", [])),
            optional=bool(t.get("optional", False)),
        ))
    return out


def served_geometry(config: Mapping[str, Any]) -> dict[str, int]:
    """window_frames/height/width from a model config's parameters (the entry model has them), read
    by the contract's one parser; {} for a model without them."""
    try:
        p = read_params(model_parameters(config))
    except ThfmError:
        return {}
    return {"frames": p.window, "height": p.height, "width": p.width}


def resolve_geometry(opts: PerfOptions, entry_config: Mapping[str, Any] | None) -> tuple[int, int, int]:
    """(frames, height, width): explicit options win, else the entry model's parameters."""
    served = served_geometry(entry_config) if entry_config else {}
    frames = opts.frames or served.get("frames")
    height = opts.height or served.get("height")
    width = opts.width or served.get("width")
    if not (frames and height and width):
        raise ThfmError(
            "cannot tell the clip geometry: give --frames/--height/--width, or serve the entry model "
            f"{ENTRY_MODEL!r} with its {PARAM_WINDOW_FRAMES}/{PARAM_HEIGHT}/{PARAM_WIDTH} parameters"
        )
    return frames, height, width


# --- inputs: spec shapes (core/VAE) -----------------------------------------------------------------

def spec_for(model: str, config: Mapping[str, Any], frames: int, height: int, width: int, batch: int = 1):
    """The export spec of a core/VAE model at this geometry, checked against the served config.

    The text length and width are not geometry: they are read from the served core's fixed "text"
    dims, so the spec matches the checkpoint that was exported.
    """
    from thfm_serve.contract.specs import build_specs

    inputs = {i.name: i for i in served_inputs(config)}
    text_len, text_dim = ThfmConfig.text_len, ThfmConfig.text_dim
    if model == CORE and CORE_IN[1] in inputs:
        text_len, text_dim = inputs[CORE_IN[1]].dims[-2], inputs[CORE_IN[1]].dims[-1]
    cfg = ThfmConfig(frames=frames, height=height, width=width, text_len=text_len, text_dim=text_dim).validate()
    spec = build_specs(cfg, frames, height, width, batch=batch)[model]
    drop_batch = int(config.get("max_batch_size", 0)) > 0
    for t in spec.inputs:
        if t.name not in inputs:
            raise ThfmError(f"served {model!r} has no input {t.name!r} (it has {sorted(inputs)}); "
                            "the repository does not match the export spec")
        want = spec.shape(t.name)[1:] if drop_batch else spec.shape(t.name)
        got = inputs[t.name].dims
        if len(got) != len(want) or any(g not in (-1, w) for g, w in zip(got, want)):
            raise ThfmError(f"served {model}.{t.name} dims {list(got)} do not fit the spec shape {list(want)} "
                            f"at {frames} frames {height}x{width}")
    return spec, drop_batch


def spec_shape_args(spec, drop_batch: bool) -> list[str]:
    """['--shape', 'latent:1,16,3,8,8', ...] from the spec's opt shapes."""
    args: list[str] = []
    for s in spec.perf_shapes("opt", drop_batch=drop_batch):
        args += ["--shape", s]
    return args


# --- inputs: a generated clip (entry model) ---------------------------------------------------------

def encode_clip(frames: np.ndarray) -> bytes:
    from .video import encode_video

    data = encode_video(frames, None, fps=24.0)
    assert data is not None
    return data


def serialize_bytes_tensor(items: Sequence[bytes]) -> bytes:
    """Triton's wire form of a BYTES tensor: each element as a 4-byte little-endian length, then
    its bytes. perf_analyzer sends a "b64" value as this raw buffer (data_loader.cc), so binary
    elements (an mp4) must be serialised here."""
    return b"".join(struct.pack("<I", len(b)) + bytes(b) for b in items)


def clip_input_data(inputs: Sequence[ServedInput], video: bytes, tasks: Sequence[str]) -> dict[str, Any]:
    """perf_analyzer --input-data JSON for the entry contract: the video as b64, the tasks as strings.

    Every non-optional input must be given (perf_analyzer refuses a data file missing one); the raw
    "frames" input is optional in the entry contract and left out.
    """
    step: dict[str, Any] = {}
    names = {i.name: i for i in inputs}
    for inp in inputs:
        if inp.name == INPUT_VIDEO:
            step[inp.name] = {"b64": base64.b64encode(serialize_bytes_tensor([video])).decode("ascii"),
                              "shape": [1]}
        elif inp.name == INPUT_TASKS:
            step[inp.name] = {"content": list(tasks), "shape": [len(tasks)]}
        elif inp.name == INPUT_FRAMES and inp.optional:
            continue
        elif not inp.optional:
            raise ThfmError(f"no generated data for required input {inp.name!r} ({inp.datatype} {list(inp.dims)})")
    if INPUT_VIDEO not in names or INPUT_TASKS not in names:
        raise ThfmError(f"model inputs {sorted(names)} are not the entry contract ({INPUT_VIDEO!r} + {INPUT_TASKS!r})")
    return {"data": [step]}


# --- command line -----------------------------------------------------------------------------------

def build_command(
    pa: PerfAnalyzer,
    opts: PerfOptions,
    concurrency: int,
    input_args: Sequence[str],
    csv_path: Path,
    batch_arg: int | None = None,
) -> list[str]:
    """argv for one perf_analyzer run at one concurrency level (run without a shell)."""
    argv = [
        str(pa.binary),
        "-m", opts.model,
        "-u", opts.url,
        "-i", "grpc",
        # Synchronous requests, `concurrency` of them in flight: the closed-loop load a client sees.
        "--concurrency-range", f"{concurrency}:{concurrency}",
        "-f", str(csv_path),
    ]
    if batch_arg is not None:
        argv += ["-b", str(batch_arg)]
    if opts.request_count is not None:
        # Total requests for the level; perf_analyzer needs at least one per concurrent slot.
        argv += ["--request-count", str(max(opts.request_count, concurrency))]
    else:
        argv += ["--measurement-mode", "time_windows", "-p", str(opts.measurement_ms),
                 "-s", f"{opts.stability_percentage:g}", "-r", str(opts.max_trials)]
    argv += list(input_args)
    argv += list(opts.extra_args)
    return argv


# --- results ------------------------------------------------------------------------------------------

def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [dict(r) for r in csv.DictReader(f)]


def summarize_row(row: Mapping[str, str], frames_per_request: int | None = None) -> dict[str, Any]:
    """One CSV row -> {concurrency, throughput, p50/p90/p95/p99/avg latency in ms}."""
    def num(key: str) -> float:
        try:
            return float(row[key])
        except (KeyError, ValueError):
            raise ThfmError(f"perf_analyzer CSV has no numeric {key!r} column (columns: {list(row)})") from None

    out: dict[str, Any] = {
        "concurrency": int(num("Concurrency")),
        "throughput_infer_per_s": num("Inferences/Second"),
    }
    for p in _PERCENTILES:
        out[f"{p}_latency_ms"] = num(f"{p} latency") / _US_PER_MS
    if all(k in row for k in _LATENCY_PARTS):
        out["avg_latency_ms"] = sum(num(k) for k in _LATENCY_PARTS) / _US_PER_MS
        out["server_compute_infer_ms"] = num("Server Compute Infer") / _US_PER_MS
    if frames_per_request:
        out["frames_per_s"] = out["throughput_infer_per_s"] * frames_per_request
    return out


def merge_csv(parts: Sequence[Path], dest: Path) -> None:
    """Concatenate per-level CSVs (same header) into one."""
    header: list[str] | None = None
    rows: list[dict[str, str]] = []
    for p in parts:
        with open(p, newline="") as f:
            reader = csv.DictReader(f)
            if header is None:
                header = list(reader.fieldnames or [])
            rows.extend(reader)
    with open(dest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header or [])
        w.writeheader()
        w.writerows(rows)


# --- the run ------------------------------------------------------------------------------------------

@dataclass
class PerfPlan:
    """Everything decided before perf_analyzer runs (tests check it without running anything)."""

    model: str
    input_args: list[str]
    batch_arg: int | None
    frames_per_request: int | None
    geometry: dict[str, int] = field(default_factory=dict)
    data_file: Path | None = None


def plan(opts: PerfOptions, config: Mapping[str, Any], entry_config: Mapping[str, Any] | None) -> PerfPlan:
    """Decide inputs for one served model: a data file (entry contract) or spec shapes."""
    inputs = served_inputs(config)
    out = Path(opts.out)
    if any(i.datatype == "BYTES" for i in inputs):
        if opts.batch != 1:
            raise ThfmError(f"--batch applies to core/VAE models; {opts.model!r} takes one clip per request")
        # The entry model carries its own grid parameters; an ensemble reads the entry model's.
        frames, height, width = resolve_geometry(opts, entry_config or config)
        clip = walking_clip(frames, height, width)
        video = encode_clip(clip)
        data = clip_input_data(inputs, video, opts.tasks)
        out.mkdir(parents=True, exist_ok=True)
        path = out / INPUT_DATA
        path.write_text(json.dumps(data))
        logger.info("input data: %d-frame %dx%d mp4 (%d bytes), tasks %s -> %s",
                    frames, height, width, len(video), ",".join(opts.tasks), path)
        return PerfPlan(opts.model, ["--input-data", str(path)], None, frames,
                        {"frames": frames, "height": height, "width": width}, path)
    if opts.model in SPEC_MODELS:
        frames, height, width = resolve_geometry(opts, entry_config)
        spec, drop_batch = spec_for(opts.model, config, frames, height, width, opts.batch)
        # With max_batch_size > 0, shapes exclude the batch axis and perf_analyzer's -b sets it.
        batch_arg = opts.batch if drop_batch else None
        geometry = {"frames": frames, "height": height, "width": width, "batch": opts.batch}
        return PerfPlan(opts.model, spec_shape_args(spec, drop_batch), batch_arg, frames * opts.batch, geometry)
    dynamic = [i.name for i in inputs if any(d < 0 for d in i.dims) and not i.optional]
    if dynamic:
        raise ThfmError(f"model {opts.model!r} has dynamic inputs {dynamic} and no export spec to size them; "
                        f"perf supports {', '.join(CLIP_MODELS + SPEC_MODELS)} or fully static models")
    return PerfPlan(opts.model, [], None, None)


def run_perf(opts: PerfOptions, pa: PerfAnalyzer | None = None) -> dict[str, Any]:
    """Run the sweep; write <out>/perf.csv, <out>/summary.json (and per-level CSVs/logs).

    A level that fails is recorded in the summary with its error (``"error"`` key) and the sweep goes
    on; ThfmError only when no level produced a result.
    """
    opts.validate()
    pa = pa or find_perf_analyzer()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    config = fetch_model_config(opts.url, opts.model)
    entry_config = config if opts.model == ENTRY_MODEL else _try_config(opts.url, ENTRY_MODEL)
    p = plan(opts, config, entry_config)

    parts, results, commands = [], [], []
    for c in opts.concurrency:
        csv_path = out / f"perf_c{c}.csv"
        argv = build_command(pa, opts, c, p.input_args, csv_path, p.batch_arg)
        commands.append(shlex.join(argv))
        logger.info("perf_analyzer: %s at concurrency %d", opts.model, c)
        logger.debug("argv: %s", commands[-1])
        t0 = time.monotonic()
        try:
            proc = subprocess.run(argv, env=pa.env(host=opts.host), capture_output=True, text=True,
                                  timeout=opts.timeout_s, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ThfmError(f"perf_analyzer did not finish in {opts.timeout_s:.0f} s at concurrency {c}") from None
        log_path = out / f"perf_c{c}.log"
        log_path.write_text(proc.stdout + proc.stderr)
        rows = read_csv(csv_path) if proc.returncode == 0 and csv_path.is_file() else []
        if not rows:
            # One level failing (most often "Failed to obtain stable measurement" on a busy machine)
            # must not throw away the levels already measured: it is recorded and reported.
            error = (f"perf_analyzer failed at concurrency {c} (exit {proc.returncode}): "
                     f"{_error_lines(proc.stdout + proc.stderr)} (log: {log_path})")
            logger.error("%s", error)
            results.append({"concurrency": c, "error": error})
            continue
        r = summarize_row(rows[0], p.frames_per_request)
        r["wall_s"] = round(time.monotonic() - t0, 2)
        results.append(r)
        parts.append(csv_path)
        logger.info("concurrency %d: %.3f infer/s, p50 %.1f ms, p99 %.1f ms", c,
                    r["throughput_infer_per_s"], r["p50_latency_ms"], r["p99_latency_ms"])

    if not parts:
        raise ThfmError("perf_analyzer failed at every concurrency level: " + "; ".join(r["error"] for r in results))
    merge_csv(parts, out / PERF_CSV)
    summary = {
        "model": opts.model,
        "url": opts.url,
        "tasks": list(opts.tasks) if p.data_file else None,
        "geometry": p.geometry,
        "frames_per_request": p.frames_per_request,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        "perf_analyzer": str(pa.binary),
        "commands": commands,
        "results": results,
    }
    (out / PERF_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("wrote %s and %s", out / PERF_CSV, out / PERF_SUMMARY)
    return summary


def _try_config(url: str, model: str) -> dict[str, Any] | None:
    try:
        return fetch_model_config(url, model)
    except ThfmError:
        return None


def _error_lines(text: str) -> str:
    """The lines of perf_analyzer's output that say what went wrong, on one line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    bad = [ln for ln in lines if "error" in ln.lower() or "failed" in ln.lower() or "unable" in ln.lower()]
    return " | ".join((bad or lines[-3:])[:5]) or "no output"


__all__ = [
    "PerfAnalyzer", "PerfOptions", "PerfPlan", "ServedInput", "build_command", "clip_input_data",
    "fetch_model_config", "find_perf_analyzer", "merge_csv", "parse_concurrency", "plan",
    "read_csv", "resolve_geometry", "run_perf", "served_geometry", "served_inputs", "serialize_bytes_tensor",
    "spec_for", "spec_shape_args", "summarize_row",
]
