"""Triton Python-backend model: encoded images (BYTES: PNG, JPEG, ...) -> the model's input tensor.

Written by `python -m pipeline package` from pipeline/package/python_models/preprocess.py;
rerun package instead of editing it. It applies preprocessing.json (next to config.pbtxt),
the recipe's evaluation transform: decode, colour mode, resize of the shorter side or of the whole
image (bilinear or bicubic, antialiased), centre crop (zero padding when smaller), /255, (x - mean) / std.
A request whose bytes are not a decodable image gets an error response.
"""

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image


def preprocess_image(data: bytes, spec: dict) -> np.ndarray:
    """One encoded image as a C,H,W array, exactly as torchvision's eval transform in pipeline/data.py."""
    image: Image.Image = Image.open(io.BytesIO(data))  # an ImageFile; convert, resize and crop give Images
    image.load()
    image = image.convert(spec["color"])
    if spec["resize"]:
        width, height = image.size
        short = spec["resize"]
        size = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
        if spec.get("resize_shape", "shorter") == "square":  # the whole image to resize x resize
            size = (short, short)
        bicubic = spec.get("resize_interpolation", "bilinear") == "bicubic"
        image = image.resize(size, Image.Resampling.BICUBIC if bicubic else Image.Resampling.BILINEAR)
    crop = spec["crop"]
    width, height = image.size
    if width < crop or height < crop:  # torchvision's CenterCrop pads small images with zeros first
        padded = Image.new(image.mode, (max(width, crop), max(height, crop)))
        padded.paste(image, (max(crop - width, 0) // 2, max(crop - height, 0) // 2))
        image = padded
        width, height = image.size
    left, top = int(round((width - crop) / 2.0)), int(round((height - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    x = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec["std"], dtype=np.float32).reshape(-1, 1, 1)
    x = (x - mean) / std
    return x.astype(np.float16 if spec["input"]["datatype"] == "FP16" else np.float32)


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb_utils = pb_utils
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        model_dir = Path(args["model_repository"])
        self.spec = json.loads((model_dir / "preprocessing.json").read_text())
        missing = [key for key in ("color", "resize", "crop", "mean", "std", "input") if key not in self.spec]
        if missing:  # the model refuses to load (Triton logs it) rather than serve another transform
            raise ValueError(f"{model_dir / 'preprocessing.json'} lacks {', '.join(missing)}; rerun package")

    def execute(self, requests):
        pb_utils = self.pb_utils
        responses = []
        for request in requests:
            encoded = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy().reshape(-1)
            try:
                batch = np.stack([preprocess_image(bytes(item), self.spec) for item in encoded])
            except Exception as exc:  # PIL raises several types for undecodable bytes
                message = f"input {self.input_name!r}: not a decodable image ({type(exc).__name__}: {exc})"
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, batch)]))
        return responses
