"""Triton model `postprocess_sparse`: core keypoints -> keypoints2d, keypoints3d, joint_names, at the input's frames and resolution (the in-process
pipeline's arrays). The last step of an ensemble; the logic lives in thfm_serve.serving.
"""

import json

import triton_python_backend_utils as pb_utils

from thfm_serve import serving


class TritonPythonModel:
    def initialize(self, args):
        self.model = serving.PostprocessModel(json.loads(args["model_config"]), args["model_repository"], dense=False)

    def execute(self, requests):
        def handle(request):
            return self.model.handle(serving.request_inputs(request, self.model.input_names, pb_utils))

        return serving.execute_each(requests, "postprocess_sparse", pb_utils, handle)
