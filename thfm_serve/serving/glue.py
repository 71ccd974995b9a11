"""Triton glue: request tensors in, responses and errors out, BLS calls. pb_utils is passed in: this
module never imports the backend's utilities, so tests run it with a stand-in."""

from __future__ import annotations

import logging
import traceback
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..errors import ThfmError
from .entry import ModelCall, ModelCallError
from .sessions import OnnxModel

logger = logging.getLogger(__name__)

# The longest error message a model puts into a response (gRPC carries it as metadata).
MAX_ERROR_CHARS = 2000


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
    """A ModelCall through Triton's BLS (the entry model calling the other models of the repository).

    On a GPU server the core (TensorRT) and the VAE (onnxruntime CUDA) answer with tensors in GPU
    memory, where ``as_numpy()`` raises; the request therefore asks for its outputs in CPU memory
    (bls_request_options), and output_array still takes a GPU tensor through DLPack should a
    backend ignore the preference.
    """

    def call(name: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        request = pb_utils.InferenceRequest(
            model_name=name, requested_output_names=list(outputs),
            inputs=[pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in inputs.items()],
            **bls_request_options(pb_utils))
        response = request.exec()
        if response.has_error():
            raise ModelCallError(f"model {name!r} failed: {response.error().message()}")
        return {n: output_array(pb_utils.get_output_tensor_by_name(response, n), name, n) for n in outputs}

    return call


def bls_request_options(pb_utils) -> dict[str, Any]:
    """InferenceRequest keywords that make a BLS response come back in CPU memory.

    ``preferred_memory`` exists in the python backend since Triton 23.02 (the 2.51 stub bundled
    here has it); the entry model runs on CPU, so CPU outputs are what it reads.
    """
    preferred = getattr(pb_utils, "PreferredMemory", None)
    cpu = getattr(pb_utils, "TRITONSERVER_MEMORY_CPU", None)
    if preferred is None or cpu is None:
        return {}
    return {"preferred_memory": preferred(cpu, 0)}


def output_array(tensor, model: str, name: str) -> np.ndarray:
    """A BLS output tensor as a numpy array, copied from GPU memory through DLPack when needed."""
    if tensor is None:
        raise ModelCallError(f"model {model!r} returned no output {name!r}")
    is_cpu = getattr(tensor, "is_cpu", None)
    if is_cpu is None or is_cpu():
        return tensor.as_numpy()
    import torch  # the python models import torch already (thfm_serve.processing)

    return torch.from_dlpack(tensor.to_dlpack()).cpu().numpy()
