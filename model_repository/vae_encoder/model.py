"""Triton model `vae_encoder` on CPU: clip [B,3,T,H,W] in [-1,1] -> latent [B,16,T',H/8,W/8] (Wan VAE encoder).

The exported ONNX graph (<version>/model.onnx) runs in onnxruntime inside the python backend (the
CPU tritonserver has no onnxruntime backend), or in OpenVINO for a bf16 VAE (`--vae-precision bf16`);
the logic lives in thfm_serve.serving.
"""

import json

import triton_python_backend_utils as pb_utils

from thfm_serve import serving


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.onnx = serving.OnnxModel.load(
            args["model_repository"], args["model_version"], config["name"], serving.model_parameters(config)
        )

    def execute(self, requests):
        # One onnxruntime run for all requests of a dynamic batch whose shapes agree.
        return serving.execute_onnx(requests, self.onnx, pb_utils)
