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


# --- GPU repository configs ------------------------------------------------------------------------

def _gpu_configs(frames, height, width):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from thfm_serve.config import ThfmConfig
    from thfm_serve.contract.specs import build_specs
    from thfm_serve.repository import default_grid, model_configs

    cfg = ThfmConfig(frames=frames, height=height, width=width, head_hidden=32, text_len=16, text_dim=32).validate()
    specs = build_specs(cfg)
    texts = model_configs(specs, "gpu", "bf16", cfg, default_grid(specs), serving.Limits())
    return {n: text_format.Parse(t, model_config_pb2.ModelConfig()) for n, t in texts.items()}


def test_gpu_vae_configs_carry_the_cuda_provider_options():
    configs = _gpu_configs(9, 64, 64)
    for name in ("vae_encoder", "vae_decoder"):
        params = {k: v.string_value for k, v in configs[name].parameters.items()}
        # onnxruntime backend keys: EXHAUSTIVE conv search, kSameAsRequested arena, a bounded arena.
        assert params == {"cudnn_conv_algo_search": "0", "arena_extend_strategy": "1",
                          "gpu_mem_limit": str(32 << 30)}
    assert not configs["core"].parameters  # the TensorRT plan takes none


def test_gpu_vae_batch_is_capped_at_the_default_clip():
    """At the default clip (81 frames at 480x832) one window per VAE call; the core keeps one row per
    task; the entry model and preprocess are told the cap."""
    configs = _gpu_configs(81, 480, 832)
    assert configs["vae_encoder"].max_batch_size == configs["vae_decoder"].max_batch_size == 1
    assert configs["core"].max_batch_size == 6
    assert configs["thfm"].parameters["vae_max_batch"].string_value == "1"
    assert configs["preprocess"].parameters["max_windows"].string_value == "1"
    small = _gpu_configs(9, 64, 64)  # a small grid keeps the full batch
    assert small["vae_decoder"].max_batch_size == 6


def test_vae_options_refuse_bad_values():
    from thfm_serve.gpu_options import VaeGpuOptions, vae_batch_cap

    with pytest.raises(Exception, match="conv algorithm search 'fastest'"):
        VaeGpuOptions(conv_algo_search="fastest").validate()
    with pytest.raises(Exception, match="below 1 GiB"):
        VaeGpuOptions(gpu_mem_limit_bytes=1000).validate()
    assert vae_batch_cap(81, 480, 832, 6) == 1 and vae_batch_cap(17, 256, 256, 6) == 6
    assert vae_batch_cap(81, 480, 416, 6) == 2


def test_entry_decodes_in_calls_of_the_vae_cap(tiny_pipeline):
    """run_entry with vae_max_batch=1 (a capped GPU decoder) makes one decoder call per dense task,
    and the results equal the in-process pipeline's."""
    from test_repository import TorchGraphs, _assert_same

    from thfm_serve.config import TASKS

    frames = np.random.default_rng(3).integers(0, 256, (9, 40, 56, 3), dtype=np.uint8)
    tasks = ["depth", "keypoints2d", "normals", "segmentation"]
    graphs = TorchGraphs(tiny_pipeline, 9)
    emb = {t: tiny_pipeline.ck.task_embedding(t).numpy() for t in TASKS}
    got = serving.run_entry(frames, tasks, serving.Grid(9, 64, 64), tiny_pipeline.cfg, emb, graphs, vae_max_batch=1)
    _assert_same(got, tiny_pipeline.run(frames, tasks), tasks)
    decodes = [c[1]["latent"][0] for c in graphs.calls if c[0] == "vae_decoder"]
    assert decodes == [1, 1, 1]


def test_plan_tensorrt_version_is_checked_against_the_serving_image(tmp_path, monkeypatch):
    from test_repository import TINY, _fake_graphs, tiny_embeddings

    from thfm_serve.errors import CheckpointError
    from thfm_serve.export import manifest as mf
    from thfm_serve.contract.specs import build_specs
    from thfm_serve.repository import check_repository, write_repository

    repo = tmp_path / "repo"
    _fake_graphs(repo, "gpu")
    write_repository(repo, build_specs(TINY), "gpu", "bf16", cfg=TINY, embeddings=tiny_embeddings())
    mf.write_json(repo / "core" / "1" / "manifest.json", {"engine": {"key": {"tensorrt_version": "10.8.0.43"}}})
    for var in ("THFM_SERVING_TENSORRT", "TRT_VERSION"):
        monkeypatch.delenv(var, raising=False)
    assert check_repository(repo, "gpu", tensorrt_version="10.8.0")["target"] == "gpu"
    with pytest.raises(CheckpointError, match="built with TensorRT 10.8.0.43 but the serving image has TensorRT 10.9.0.34"):
        check_repository(repo, "gpu", tensorrt_version="10.9.0.34")
    monkeypatch.setenv("TRT_VERSION", "10.13.3.9")  # as NVIDIA's containers set it
    with pytest.raises(CheckpointError, match="serving image has TensorRT 10.13.3.9"):
        check_repository(repo, "gpu")


def test_cpu_vae_calls_hold_one_17x256x256_window():
    """On CPU a VAE call holds at most one 17x256x256 window's pixels (a 1.3B-shaped decoder row there
    is about 4.5 GB of onnxruntime arena): one row per call at that window, the full batch below it."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from thfm_serve.config import ThfmConfig
    from thfm_serve.contract.specs import build_specs
    from thfm_serve.repository import CPU_VAE_CALL_PIXELS, default_grid, model_configs

    assert CPU_VAE_CALL_PIXELS == 17 * 256 * 256

    def cpu_configs(frames, height, width):
        cfg = ThfmConfig(frames=frames, height=height, width=width, head_hidden=32, text_len=16, text_dim=32).validate()
        specs = build_specs(cfg)
        texts = model_configs(specs, "cpu", "int8", cfg, default_grid(specs), serving.Limits())
        return {n: text_format.Parse(t, model_config_pb2.ModelConfig()) for n, t in texts.items()}

    big = cpu_configs(17, 256, 256)
    assert big["vae_encoder"].max_batch_size == big["vae_decoder"].max_batch_size == 1
    assert big["core"].max_batch_size == 6  # the core still takes one row per task
    assert big["thfm"].parameters["vae_max_batch"].string_value == "1"
    assert big["preprocess"].parameters["max_windows"].string_value == "1"
    assert cpu_configs(9, 128, 128)["vae_decoder"].max_batch_size == 6  # 7 such windows fit: the spec's 6
    assert cpu_configs(17, 128, 256)["vae_decoder"].max_batch_size == 2
