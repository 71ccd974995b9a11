"""One options object per stage: what `thfm export`, `thfm serve` and `thfm predict` take.

The CLI builds one from its parsed arguments (``from_args``: every argparse destination is named
after its field, so there is no flag-to-field table), validates it, and hands it to the code; code
and tests can build the same object directly. Torch-free: the gRPC client takes PredictOptions.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .contract.params import Limits
from .contract.specs import (AUTO_RUNTIME, MAX_BATCH, Precision, Target, parse_precision, parse_runtime, parse_target,
                             parse_vae_precision)
from .errors import ThfmError

# Request-limit flags of `thfm export` use destinations LIMIT_PREFIX + <Limits field>.
LIMIT_PREFIX = "limit_"


def _from_args(cls, args: argparse.Namespace, **given: Any):
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name) and f.name not in given}
    return cls(**values, **given)


@dataclass(frozen=True)
class ExportOptions:
    """`thfm export`: checkpoint -> a model repository (arguments of export_repository)."""

    checkpoint: str
    repo: str
    target: str = Target.CPU.value
    precision: str | None = None  # None: cpu: machine.cpu_recipe for this CPU; gpu: bf16
    vae_precision: str | None = None  # the VAE graphs (fp32; int8/bf16 on cpu); None: machine.cpu_vae_recipe on cpu, fp32 on gpu
    core_runtime: str | None = None  # onnxruntime or openvino (cpu); None: machine.cpu_core_runtime
    vae_runtime: str | None = None  # onnxruntime or openvino (cpu); None: machine.cpu_vae_runtime
    frames: int | None = None  # the export window (default: the checkpoint's)
    height: int | None = None
    width: int | None = None
    calibration: tuple[str, ...] | None = None  # int8 calibration videos
    calibration_clips: int | None = None  # int8: generated clips when no video is given (None: the exporter's)
    only: tuple[str, ...] | None = None  # export only these submodels
    max_batch: int = MAX_BATCH
    max_frames: int | None = None  # profile maxima
    max_height: int | None = None
    max_width: int | None = None
    no_engine: bool = False
    no_configs: bool = False
    force: bool = False
    limits: dict[str, int] = field(default_factory=dict)  # request limits to change (Limits fields)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ExportOptions":
        limits = {k[len(LIMIT_PREFIX):]: v for k, v in vars(args).items() if k.startswith(LIMIT_PREFIX) and v is not None}
        return _from_args(cls, args, limits=limits)

    def validate(self) -> "ExportOptions":
        parse_target(self.target)
        if self.precision is not None:
            parse_precision(self.precision)
        if self.vae_precision is not None:
            parse_vae_precision(self.vae_precision)
        if self.core_runtime is not None:
            parse_runtime(self.core_runtime)
        if self.vae_runtime is not None:
            parse_runtime(self.vae_runtime)
        if self.limits:
            Limits(**self.limits).validate()  # a bad value fails before minutes of export
            if self.no_configs:
                raise ThfmError("--max-request-*/--max-in-flight go into the Triton configs, which --no-configs skips")
        return self

    def export_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of thfm_serve.export.build.export_repository after (checkpoint, repo)."""
        out: dict[str, Any] = dict(
            target=self.target, precision=self.precision, vae_precision=self.vae_precision, core_runtime=self.core_runtime,
            vae_runtime=AUTO_RUNTIME if self.vae_runtime is None else self.vae_runtime,
            frames=self.frames, height=self.height, width=self.width, calibration=self.calibration,
            models=self.only, build_engine=not self.no_engine, force=self.force, max_batch=self.max_batch,
            max_frames=self.max_frames, max_height=self.max_height, max_width=self.max_width,
            write_configs=not self.no_configs)
        if self.calibration_clips is not None:
            out["calibration_clips"] = self.calibration_clips
        return out


@dataclass(frozen=True)
class ServeOptions:
    """`thfm serve`: tritonserver on a repository, in the foreground."""

    repo: str
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    model_control: str = "none"
    on_stub_death: str = "restart"
    log: str | None = None
    start_timeout: float = 300.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ServeOptions":
        return _from_args(cls, args)

    def validate(self) -> "ServeOptions":
        if self.start_timeout <= 0:
            raise ThfmError(f"--start-timeout must be positive, got {self.start_timeout}")
        return self

    def server_config(self):
        from .server import ServerConfig

        return ServerConfig(repo=Path(self.repo), host=self.host, http_port=self.http_port, grpc_port=self.grpc_port,
                            metrics_port=self.metrics_port, model_control=self.model_control)


@dataclass(frozen=True)
class PredictOptions:
    """`thfm predict`: a video through the in-process pipeline (checkpoint) or Triton servers (url)."""

    video: str
    out: str
    tasks: str = "all"
    checkpoint: str | None = None
    url: tuple[str, ...] = ()
    height: int | None = None  # model grid (in-process; must agree with the served one)
    width: int | None = None
    window: int | None = None
    overlap: int | None = None  # None: the windowing policy's default (the served model's)
    prompt: tuple[str, ...] = ()  # TASK=TEXT, in-process only
    bf16: bool = False  # in-process only
    max_frames: int | None = None
    output_size: str = "input"  # dense maps at the input's size or the model grid's (contract.protocol.OUTPUT_SIZES)
    pictures: bool = False
    send: str = "video"  # served: "video" (lossless re-encode) or "frames"
    max_in_flight: int | None = None
    timeout: float | None = None
    retries: int | None = None
    quiet: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "PredictOptions":
        return _from_args(cls, args, url=tuple(args.url or ()), prompt=tuple(args.prompt or ()))

    @property
    def served(self) -> bool:
        return bool(self.url)

    @property
    def prompts(self) -> dict[str, str]:
        out = {}
        for item in self.prompt:
            task, sep, text = item.partition("=")
            if not sep or not text.strip():
                raise ThfmError(f"--prompt expects TASK=TEXT, got {item!r}")
            out[task.strip()] = text
        return out

    def validate(self) -> "PredictOptions":
        if bool(self.checkpoint) == self.served:
            raise ThfmError("give exactly one of --checkpoint (in-process) or --url (through Triton)")
        self.prompts  # noqa: B018 - parses, raising on a malformed --prompt
        if self.served:
            if self.prompt:
                raise ThfmError("--prompt works only in-process (--checkpoint): the served models use the task "
                                "prompts embedded at export")
            if self.bf16:
                raise ThfmError("--bf16 is for the in-process path; the served precision is chosen at export "
                                "(thfm export --precision)")
        if self.retries is not None and self.retries < 0:
            raise ThfmError(f"--retries must be >= 0, got {self.retries}")
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ThfmError(f"--max-in-flight must be at least 1, got {self.max_in_flight}")
        return self

    def check_served_grid(self, window: int, height: int, width: int) -> None:
        """--height/--width/--window are fixed by the export on the server side; accept them only when
        they agree, so that nobody believes they changed something."""
        for flag, want, have in (("--height", self.height, height), ("--width", self.width, width),
                                 ("--window", self.window, window)):
            if want is not None and want != have:
                raise ThfmError(f"{flag} {want} differs from the served model's {have} (fixed when the model "
                                "repository was exported)")
