"""Names: the models of a THFM repository, their tensors, their config parameters and files.

The entry model's wire contract: one request carries one clip (encoded video bytes, or raw frames)
and a list of task names; the response carries one output per requested task, named after the
task, plus the joint names when a keypoint task was asked for. Arrays and layouts equal the
in-process pipeline's (contract.tasks.OUTPUT_KEYS).
"""

from __future__ import annotations

from .tasks import TASKS

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
PARAM_OVERLAP = "window_overlap"  # frames shared by neighbouring windows (contract.windows)
# Config parameter of the onnxruntime models: intra-op threads (0 = onnxruntime's default, one per core).
PARAM_THREADS = "intra_op_threads"
# Config parameter of preprocess: the most windows one ensemble request may take (the VAE's max batch).
PARAM_MAX_WINDOWS = "max_windows"
PARAM_VAE_MAX_BATCH = "vae_max_batch"  # entry model: rows per VAE call (capped on a GPU, gpu_options)
# Entry model: "1" runs the next window's encoder and core while this window is decoded
# (contract.windows.run_windows, pipelined); "0" or absent: one window after another.
PARAM_WINDOW_PIPELINE = "window_pipeline"

# Tensor names between the models (the ensembles' wiring).
CLIP = "clip"  # FP32 [W, 3, T, H, W]: W full windows in [-1, 1]
GEOMETRY = "geometry"  # INT64 [3]: input frames, height, width (what outputs are mapped back to)
TEXT_PREFIX = "text_"  # text_<task>: FP32 [W, L, D], the task's embedding once per window
MAPS_PREFIX = "maps_"  # maps_<task>: FP32 [W, 3, T, H, W], the decoder's output for that task
KP2D = "kp2d"  # FP32 [W, T, K, 2], the core's 2D keypoints (the keypoints2d row)
KP3D = "kp3d"  # FP32 [W, T, K, 3], the core's 3D keypoints (the keypoints3d row)
# Tensor names of the exported submodels (contract.specs builds the specs with these names).
ENCODER_IN, ENCODER_OUT = "video", "latent"
CORE_IN = ("latent", "text")
CORE_OUT = ("pred_latent", "kp2d", "kp3d")
DECODER_IN, DECODER_OUT = "latent", "maps"

# Repository files. At the repository root (tritonserver loads only sub-directories as models; a
# root file is ignored):
REPOSITORY_MANIFEST = "thfm_repository.json"
MANIFEST_FORMAT = "thfm-model-repository"
MANIFEST_VERSION = 1
# In <repo>/core/1/, written by the exporter: the cached UMT5 prompt embedding of every task
# ([text_len, text_dim] float32) and the checkpoint's thfm/config.json (tasks, joints, depth scale).
TASK_EMBEDDINGS = "task_embeddings.npz"
THFM_CONFIG = "thfm_config.json"
# Every model has one version folder, <repo>/<model>/1/; the exported graphs are model.onnx there
# (and the TensorRT core model.plan).
MODEL_VERSION = "1"
ONNX_FILE = "model.onnx"
PLAN_FILE = "model.plan"
MODEL_MANIFEST = "manifest.json"  # per model version folder: what was exported or built, and its key
