"""GPU serving glue that runs here without a GPU: the entry model's BLS requests ask for CPU outputs
(TensorRT and onnxruntime-CUDA answer with GPU tensors, whose as_numpy() raises), GPU tensors are
taken through DLPack, and the GPU repository's configs carry the onnxruntime CUDA options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from thfm_serve import serving


class _GpuTensor:
    """A tensor the way the python backend hands a GPU output: as_numpy() raises, DLPack works."""

    def __init__(self, array):
        self.array = array

    def is_cpu(self):
        return False

    def as_numpy(self):
        raise RuntimeError("Tensor is stored in GPU and cannot be converted to NumPy.")

    def to_dlpack(self):
        return torch.from_numpy(self.array).__dlpack__()


class _CpuTensor(_GpuTensor):
    def is_cpu(self):
        return True

    def as_numpy(self):
        return self.array


def _recording_pb_utils(answer):
    """triton_python_backend_utils' BLS surface, recording every InferenceRequest's arguments."""
    requests = []

    class PreferredMemory:
        def __init__(self, memory_type, device_id=0):
            self.memory_type, self.device_id = memory_type, device_id

    class Response:
        def has_error(self):
            return False

    class InferenceRequest:
        def __init__(self, **kwargs):
            requests.append(kwargs)

        def exec(self):
            return Response()

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

    class pb:  # noqa: N801 - the module's stand-in
        TRITONSERVER_MEMORY_GPU = 1
        TRITONSERVER_MEMORY_CPU = 0

    pb.PreferredMemory, pb.InferenceRequest, pb.Tensor = PreferredMemory, InferenceRequest, Tensor
    pb.get_output_tensor_by_name = staticmethod(lambda response, name: answer(name))
    return pb, requests


def test_bls_requests_ask_for_cpu_outputs():
    out = np.arange(6, dtype=np.float32).reshape(2, 3)
    pb, requests = _recording_pb_utils(lambda name: _CpuTensor(out))
    call = serving.bls_call(pb)
    got = call("core", {"latent": np.zeros((1, 2), np.float32)}, ["pred_latent"])
    np.testing.assert_array_equal(got["pred_latent"], out)
    (req,) = requests
    assert req["model_name"] == "core" and req["requested_output_names"] == ["pred_latent"]
    assert [t.name for t in req["inputs"]] == ["latent"]
    pref = req["preferred_memory"]
    assert pref.memory_type == pb.TRITONSERVER_MEMORY_CPU and pref.device_id == 0


def test_gpu_outputs_are_read_through_dlpack():
    out = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    pb, _ = _recording_pb_utils(lambda name: _GpuTensor(out))
    got = serving.bls_call(pb)("vae_decoder", {"latent": np.zeros(1, np.float32)}, ["maps"])["maps"]
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, out)


def test_missing_bls_output_is_named():
    pb, _ = _recording_pb_utils(lambda name: None)
    with pytest.raises(serving.ModelCallError, match="model .core. returned no output .kp2d."):
        serving.bls_call(pb)("core", {}, ["kp2d"])


def test_an_old_backend_without_preferred_memory_gets_plain_requests():
    pb, requests = _recording_pb_utils(lambda name: _CpuTensor(np.zeros(1, np.float32)))
    del pb.PreferredMemory
    serving.bls_call(pb)("core", {}, ["x"])
    assert "preferred_memory" not in requests[0]
