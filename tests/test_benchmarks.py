"""The benchmark scripts run, and measure what they say they measure (no speed thresholds here:
speed targets live in benchmarks/README.md, these machines are too noisy for timed tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import throughput  # noqa: E402


def test_every_measurement_gets_the_same_fresh_model():
    first, second = (throughput.build_model("tiny", None, image_size=224) for _ in range(2))
    assert first is not second and not getattr(second, "_is_accelerate_prepared", False)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_precision_check_catches_a_run_in_the_wrong_precision():
    model = throughput.build_model("tiny", None, image_size=224)
    check = throughput.PrecisionCheck(model)
    model(pixel_values=torch.zeros(1, 3, 224, 224))  # fp32: no autocast
    with pytest.raises(RuntimeError, match="was to run in bf16 but its logits were"):
        check.require("bf16", "(b) our path")


@pytest.mark.e2e
def test_throughput_runs_all_measurements_in_the_labelled_precision(tmp_path):
    # bf16 on the CPU: (b) after (a) in one process is the case that once ran silently in fp32.
    out = tmp_path / "throughput.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--steps", "2", "--warmup", "1",
         "--precision", "bf16", "--data_batches", "4", "--inference_images", "64", "--pipeline_images", "4",
         "--out", str(out)],
        check=True, capture_output=True, text=True, timeout=600,
    )
    report = json.loads(out.read_text())
    assert report["precision"] == "bf16" and report["study_images_per_s"] > 0
    (row,) = report["training"]
    assert row["ours_images_per_s"] > 0 and row["model_only_images_per_s"] > 0
    assert report["data_path"]["speedup"] > 0 and report["inference"]["speedup"] > 0
