"""Triton model `preprocess`: an encoded video (BYTES) or raw frames (UINT8 [F,H,W,3]) -> the clip's
windows fitted to the model grid, its geometry, and each task's prompt embedding per window.

The first step of the thfm_dense / thfm_sparse ensembles; the logic lives in thfm_serve.serving.
"""

import json

import triton_python_backend_utils as pb_utils

from thfm_serve import serving


class TritonPythonModel:
    def initialize(self, args):
        self.model = serving.PreprocessModel(json.loads(args["model_config"]), args["model_repository"])

    def execute(self, requests):
        def handle(request):
            inputs = serving.request_inputs(request, self.model.input_names, pb_utils)
            # Only the outputs the ensemble wires up are computed (each text_<task> is a full copy).
            return self.model.handle(inputs, request.requested_output_names())

        return serving.execute_each(requests, "preprocess", pb_utils, handle)
