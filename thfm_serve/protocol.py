"""The wire contract of the served THFM entry model, shared by the Triton models and the client.

One request carries one clip (encoded video bytes, or raw frames) and a list of task names; the
response carries one output per requested task, named after the task, plus the joint names when a
keypoint task was asked for. Arrays and layouts equal the in-process pipeline's (processing.OUTPUT_KEYS).
"""

from __future__ import annotations

from .config import TASKS

ENTRY_MODEL = "thfm"  # serves any set of tasks in one request (BLS over the models below)
DENSE_ENSEMBLE = "thfm_dense"  # preprocess -> vae_encoder -> core -> vae_decoder -> postprocess_dense
SPARSE_ENSEMBLE = "thfm_sparse"  # preprocess -> vae_encoder -> core -> postprocess_sparse
PREPROCESS = "preprocess"
VAE_ENCODER = "vae_encoder"
CORE = "core"
VAE_DECODER = "vae_decoder"
POSTPROCESS_DENSE = "postprocess_dense"
POSTPROCESS_SPARSE = "postprocess_sparse"

# Entry-model inputs: exactly one of VIDEO / FRAMES, plus TASKS.
INPUT_VIDEO = "video"  # BYTES [1]: an encoded video file (mp4, mov, webm, ...)
INPUT_FRAMES = "frames"  # UINT8 [F, H, W, 3]: RGB frames in displayed orientation
INPUT_TASKS = "tasks"  # BYTES [N]: task names, e.g. [b"depth", b"keypoints2d"]
# Optional: BYTES [1], the resolution of the dense outputs: "input" (the default: the input's displayed
# size) or "model" (the model grid, PARAM_HEIGHT x PARAM_WIDTH). Keypoints are in input pixels either way.
INPUT_OUTPUT_SIZE = "output_size"
OUTPUT_SIZE_INPUT = "input"
OUTPUT_SIZE_MODEL = "model"
OUTPUT_SIZES = (OUTPUT_SIZE_INPUT, OUTPUT_SIZE_MODEL)

# Entry-model outputs: one per task, named after it, plus the joint names for keypoint tasks.
OUTPUT_FOR_TASK = {t: t for t in TASKS}
OUTPUT_JOINT_NAMES = "joint_names"  # BYTES [K]

# Model-config parameters of the entry model that a client reads (get_model_config) to plan windows.
PARAM_WINDOW_FRAMES = "window_frames"  # frames per model window (4n+1)
PARAM_HEIGHT = "height"  # model resolution the clip is fitted to
PARAM_WIDTH = "width"
PARAM_MAX_FRAMES = "max_frames"  # request limits (configurable when the repository is written)
PARAM_MAX_PIXELS = "max_pixels"  # per frame
PARAM_MAX_REQUEST_BYTES = "max_request_bytes"
PARAM_MAX_RESPONSE_BYTES = "max_response_bytes"  # the size of one response (thfm_serve.budget)
