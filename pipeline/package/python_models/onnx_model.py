"""Triton Python-backend model: runs 1/model.onnx through ONNX Runtime on the CPU.

Written by `python -m pipeline package` from pipeline/package/python_models/onnx_model.py;
rerun package instead of editing it. The requests the dynamic batcher hands over in one
call are concatenated into one ONNX Runtime run and split again.
"""

import json
from pathlib import Path

import numpy as np


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime
        import triton_python_backend_utils as pb_utils

        self.pb_utils = pb_utils
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_names = [output["name"] for output in config["output"]]
        model = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])

    def execute(self, requests):
        pb_utils = self.pb_utils
        inputs = [pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy() for request in requests]
        outputs = self.session.run(self.output_names, {self.input_name: np.concatenate(inputs)})
        responses = []
        start = 0
        for batch in inputs:
            stop = start + batch.shape[0]
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(value[start:stop]))
                for name, value in zip(self.output_names, outputs)
            ]
            responses.append(pb_utils.InferenceResponse(tensors))
            start = stop
        return responses
