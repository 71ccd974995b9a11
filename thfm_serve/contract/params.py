"""The entry model's config parameters: written by the repository writer, read here by everyone.

repository.write_repository puts the grid (window, resolution, overlap) and the request limits into
the `parameters` of the entry model's config.pbtxt (and of preprocess/postprocess); the models read
them in initialize, the client and `thfm perf` from get_model_config. `read_params` is the one
parser; Grid and Limits are what it yields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from ..errors import ThfmError
from . import protocol
from .geometry import check_resolution, latent_frames
from .windows import check_overlap, default_overlap

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

# gRPC's hard ceiling for one message: a signed 32-bit length. Protobuf framing, tensor names and
# shapes come on top of the tensor bytes; 1 MiB covers them with room to spare.
GRPC_MAX_MESSAGE = 2**31 - 1
MESSAGE_SLACK = 1 << 20
MAX_RESPONSE_CEILING = GRPC_MAX_MESSAGE - MESSAGE_SLACK
# Default response limit. 1 GiB holds a full Wan window (81 frames) at the paper's 480x832 with all
# six tasks (0.96 GiB), or 81 frames of 1080p depth (0.63 GiB); bigger answers are split by the
# client (fewer tasks per request) or asked for at the model grid.
DEFAULT_MAX_RESPONSE_BYTES = 1 << 30


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
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES

    def validate(self) -> "Limits":
        for name, value in asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ThfmError(f"limit {name} must be a positive integer, got {value!r}")
        if self.max_response_bytes > MAX_RESPONSE_CEILING:
            raise ThfmError(f"limit max_response_bytes={self.max_response_bytes} is above what one gRPC message "
                            f"can carry ({MAX_RESPONSE_CEILING} bytes: 2 GiB less framing)")
        return self

    def to_params(self) -> dict[str, str]:
        return {protocol.PARAM_MAX_FRAMES: str(self.max_frames), protocol.PARAM_MAX_PIXELS: str(self.max_pixels),
                protocol.PARAM_MAX_REQUEST_BYTES: str(self.max_request_bytes),
                protocol.PARAM_MAX_RESPONSE_BYTES: str(self.max_response_bytes)}


@dataclass(frozen=True)
class Grid:
    """The model grid a clip is fitted to: frames per window (4n+1), resolution (multiples of 16),
    and the frames neighbouring windows share (None: contract.windows.default_overlap)."""

    window: int
    height: int
    width: int
    overlap: int | None = None  # None becomes default_overlap(window) on construction

    def __post_init__(self):
        if self.overlap is None:
            object.__setattr__(self, "overlap", default_overlap(self.window))

    @property
    def window_overlap(self) -> int:
        return self.overlap

    def validate(self) -> "Grid":
        latent_frames(self.window)
        check_resolution(self.height, self.width)
        check_overlap(self.window, self.window_overlap)
        return self

    def to_params(self) -> dict[str, str]:
        return {protocol.PARAM_WINDOW_FRAMES: str(self.window), protocol.PARAM_HEIGHT: str(self.height),
                protocol.PARAM_WIDTH: str(self.width), protocol.PARAM_OVERLAP: str(self.window_overlap)}


def model_parameters(model_config: Mapping[str, Any]) -> dict[str, str]:
    """config.pbtxt `parameters` (as the python backend and get_model_config(as_json=True) hand
    them over) -> {key: string}."""
    cfg = model_config.get("config", model_config)
    params = cfg.get("parameters") or {}
    return {k: str((v or {}).get("string_value", "")) for k, v in params.items()}


def _int_param(params: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = str(params.get(name, "")).strip()
    if not raw:
        if default is None:
            raise ThfmError(f"model config has no {name!r} parameter")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ThfmError(f"model config parameter {name!r} is {raw!r}, not an integer") from None


def _flag_param(params: Mapping[str, str], name: str) -> bool:
    raw = str(params.get(name, "")).strip().lower()
    if raw in ("", "0", "false"):
        return False
    if raw in ("1", "true"):
        return True
    raise ThfmError(f"model config parameter {name!r} is {raw!r}; use 1 or 0")


@dataclass(frozen=True)
class EntryParams:
    """The parameters as written, before defaults: a limit is None when the config has none."""

    window: int
    height: int
    width: int
    overlap: int | None
    max_frames: int | None
    max_pixels: int | None
    max_request_bytes: int | None
    max_response_bytes: int | None = None
    vae_max_batch: int | None = None  # rows per VAE decoder call; None: all dense rows in one call
    window_pipeline: bool = False  # the next window's encoder and core beside this one's decoder

    @property
    def grid(self) -> Grid:
        return Grid(self.window, self.height, self.width, self.overlap).validate()

    @property
    def limits(self) -> Limits:
        """Limits with the defaults for what the config leaves out."""
        return _limits(self.max_frames, self.max_pixels, self.max_request_bytes, self.max_response_bytes)


def _optional(params: Mapping[str, str], name: str) -> int | None:
    return _int_param(params, name) if str(params.get(name, "")).strip() else None


def _limits(max_frames: int | None, max_pixels: int | None, max_request_bytes: int | None,
            max_response_bytes: int | None = None) -> Limits:
    return Limits(DEFAULT_MAX_FRAMES if max_frames is None else max_frames,
                  DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels,
                  DEFAULT_MAX_REQUEST_BYTES if max_request_bytes is None else max_request_bytes,
                  max_response_bytes=DEFAULT_MAX_RESPONSE_BYTES if max_response_bytes is None
                  else max_response_bytes).validate()


def read_params(params: Mapping[str, str]) -> EntryParams:
    """The one parser of the entry model's parameters (ThfmError naming a missing or bad one)."""

    def optional(name: str) -> int | None:
        return _optional(params, name)

    return EntryParams(
        window=_int_param(params, protocol.PARAM_WINDOW_FRAMES),
        height=_int_param(params, protocol.PARAM_HEIGHT),
        width=_int_param(params, protocol.PARAM_WIDTH),
        overlap=optional(protocol.PARAM_OVERLAP),
        max_frames=optional(protocol.PARAM_MAX_FRAMES),
        max_pixels=optional(protocol.PARAM_MAX_PIXELS),
        max_request_bytes=optional(protocol.PARAM_MAX_REQUEST_BYTES),
        max_response_bytes=optional(protocol.PARAM_MAX_RESPONSE_BYTES),
        vae_max_batch=optional(protocol.PARAM_VAE_MAX_BATCH),
        window_pipeline=_flag_param(params, protocol.PARAM_WINDOW_PIPELINE),
    )


def grid_from_params(params: Mapping[str, str]) -> Grid:
    return read_params(params).grid


def limits_from_params(params: Mapping[str, str]) -> Limits:
    """The request limits alone (a config without a grid may carry them), defaults for absent ones."""
    return _limits(*(_optional(params, n) for n in
                     (protocol.PARAM_MAX_FRAMES, protocol.PARAM_MAX_PIXELS, protocol.PARAM_MAX_REQUEST_BYTES,
                      protocol.PARAM_MAX_RESPONSE_BYTES)))
