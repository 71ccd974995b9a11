"""Triton entry model `thfm` (BLS): any set of THFM tasks on one clip in one request.

Per window it encodes the clip once and runs the core once with one batch row per requested task,
calling vae_encoder / core / vae_decoder through BLS; the result equals ThfmPipeline.run. The wire
contract is thfm_serve.contract.protocol; the logic lives in thfm_serve.serving.
"""

import json

import triton_python_backend_utils as pb_utils

from thfm_serve import serving


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.model = serving.EntryModel(config, args["model_repository"], serving.bls_call(pb_utils))

    def execute(self, requests):
        def handle(request):
            return self.model.handle(serving.request_inputs(request, self.model.input_names, pb_utils),
                                     request.requested_output_names())

        return serving.execute_each(requests, "thfm", pb_utils, handle)
