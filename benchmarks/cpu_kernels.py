"""Micro-timings behind the CPU data-path and conversion figures in benchmarks/README.md.

    python benchmarks/cpu_kernels.py            # prints JSON, milliseconds per call

- the bicubic uint8 resize 28 -> 224 of 32 gray images: one plane per image (planar) against four
  images as the planes of one channels-last image (what ``fast_path.DevicePreprocessor`` does);
- the same resize of 32 RGB images, channels-first contiguous against channels-last;
- writing a (B, 3, 224, 224) float32 batch into fresh memory against memory already touched
  (B = 32 and 128): the page-fault cost of a new batch;
- encoding one 224x224 gray image as PNG (what ``datasets.Image`` stores; the conversion cost).
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as tvF

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hf_medbeit.fast_path import pack_gray_planes  # noqa: E402


def milliseconds(function, repeats: int = 50) -> float:
    function()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) / repeats * 1e3


def resize(images: torch.Tensor) -> torch.Tensor:
    return tvF.resize(images, [224, 224], interpolation=InterpolationMode.BICUBIC, antialias=True)


def main() -> dict:
    rng = np.random.default_rng(0)
    gray = torch.from_numpy(rng.integers(0, 256, size=(32, 1, 28, 28), dtype=np.uint8))
    rgb_last = torch.from_numpy(rng.integers(0, 256, size=(32, 28, 28, 3), dtype=np.uint8)).permute(0, 3, 1, 2)
    rgb_first = rgb_last.contiguous()
    report = {
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "resize_32_gray_planar_ms": milliseconds(lambda: resize(gray)),
        "resize_32_gray_packed_ms": milliseconds(lambda: resize(pack_gray_planes(gray))),
        "resize_32_rgb_channels_first_ms": milliseconds(lambda: resize(rgb_first)),
        "resize_32_rgb_channels_last_ms": milliseconds(lambda: resize(rgb_last)),
    }
    for batch in (32, 128):
        touched = torch.empty(batch, 3, 224, 224)
        report[f"write_{batch}_fresh_ms"] = milliseconds(lambda: torch.empty(batch, 3, 224, 224).fill_(1.0), 20)
        report[f"write_{batch}_touched_ms"] = milliseconds(lambda: touched.fill_(1.0), 20)
    xx = np.arange(224)[None, :]
    image = (np.sin(xx / 20.0) * 60 + 128 + rng.normal(0, 10, (224, 224))).clip(0, 255).astype(np.uint8)
    report["png_encode_224_gray_ms"] = milliseconds(lambda: Image.fromarray(image).save(io.BytesIO(), format="PNG"))
    report = {key: round(value, 3) if isinstance(value, float) else value for key, value in report.items()}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
