"""Everything the THFM Triton models do, as plain functions (model.py files only forward to these).

Models of a THFM repository (contract.protocol names them; repository.py writes their configs):

    preprocess          video BYTES [1] | frames UINT8 [F,H,W,3] -> clip [W,3,T,H,W] (one full window
                        per batch row), geometry INT64 [3], text_<task> [W,L,D] per task
    vae_encoder         clip -> latent                      (ONNX; python+onnxruntime, or OpenVINO, on CPU)
    core                latent, text -> pred_latent, kp2d, kp3d (ONNX / TensorRT; dynamic batching;
                        python+onnxruntime or OpenVINO on CPU)
    vae_decoder         latent -> maps                      (ONNX; python+onnxruntime, or OpenVINO, on CPU)
    postprocess_dense   geometry, maps_<task> -> one output per dense task (input frames and size)
    postprocess_sparse  geometry, kp2d, kp3d -> keypoints2d, keypoints3d, joint_names
    thfm_dense          ensemble: preprocess -> vae_encoder -> core x4 -> vae_decoder x4 -> postprocess
    thfm_sparse         ensemble: preprocess -> vae_encoder -> core x2 -> postprocess_sparse
    thfm                entry (BLS): any set of tasks in one request, the in-process pipeline's path

Two paths, on purpose:
- The entry model mirrors ThfmPipeline.run exactly: per window it encodes the clip once, runs the
  core once with one batch row per requested task, decodes the dense rows in one decoder call, and
  pads/crops around the fixed-window VAE graphs (contract.vae_window: exact, the Wan VAE is causal).
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

Files, by job:
    requests   request checking and limits (clip, tasks, requested outputs)
    assets     what the models read from the repository once (manifest, specs, config, embeddings)
    sessions   onnxruntime (and OpenVINO) sessions and the dynamic-batch runner of the exported submodels
    entry      the entry model's algorithm (the shared window loop over the exported models)
    ensemble   the ensembles' preprocess and postprocess steps
    glue       Triton glue: request tensors, responses, errors, BLS calls
    handlers   per-model handlers (what each model.py's initialize and execute run)
"""

from __future__ import annotations

# The names below are the serving API the model.py files and tests use (serving.EntryModel, ...).
from ..contract.params import (  # noqa: F401
    DEFAULT_MAX_FRAMES,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_REQUEST_BYTES,
    Grid,
    Limits,
    _int_param,
    grid_from_params,
    limits_from_params,
    model_parameters,
)
from ..contract.protocol import (  # noqa: F401
    CLIP,
    CORE_IN,
    CORE_OUT,
    DECODER_IN,
    DECODER_OUT,
    ENCODER_IN,
    ENCODER_OUT,
    GEOMETRY,
    KP2D,
    KP3D,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    MAPS_PREFIX,
    PARAM_MAX_WINDOWS,
    PARAM_THREADS,
    REPOSITORY_MANIFEST,
    TASK_EMBEDDINGS,
    TEXT_PREFIX,
    THFM_CONFIG,
)
from .assets import RepositoryAssets, load_assets, load_task_embeddings, read_manifest, repository_root  # noqa: F401
from .ensemble import fit_full_windows, postprocess_dense, postprocess_sparse, preprocess  # noqa: F401
from .entry import ModelCall, ModelCallError, entry_outputs, local_call, names_tensor, run_entry  # noqa: F401
from .glue import (  # noqa: F401
    MAX_ERROR_CHARS,
    bls_call,
    bls_request_options,
    clip_message,
    error_response,
    execute_each,
    execute_onnx,
    guarded,
    make_response,
    output_array,
    request_inputs,
)
from .handlers import EntryModel, PostprocessModel, PreprocessModel  # noqa: F401
from .requests import (  # noqa: F401
    MAX_TASK_NAME_BYTES,
    MAX_TASK_NAMES,
    check_requested_outputs,
    read_clip,
    read_tasks,
)
from .sessions import OnnxModel, check_finite, create_session  # noqa: F401
