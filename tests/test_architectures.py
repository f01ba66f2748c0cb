"""Baselines built from a config: the model presets in configs/models/ (MedMNIST v2's ResNet-18/50 at
28 and 224, the tiny BEiT), their image processor (size, no crop, same numbers on the fast path),
and what a user gets back from a run folder with plain transformers."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

from hf_medbeit.arguments import ModelArguments
from hf_medbeit.data import get_spec
from hf_medbeit.fast_path import DevicePreprocessor, processor_supported
from hf_medbeit.modeling import load_image_processor, load_model

from conftest import DATA, REPO, assert_nothing_written, assert_one_line_error, run_cli

PRESETS = REPO / "configs" / "models"


def preset(name: str) -> ModelArguments:
    return ModelArguments(**yaml.safe_load((PRESETS / f"{name}.yaml").read_text()))


def breast_images(count: int) -> list[Image.Image]:
    """The first test images of the official BreastMNIST file (28x28 gray), as RGB as the data
    paths and pipeline give them to the processor."""
    return [Image.fromarray(image).convert("RGB") for image in np.load(DATA / "breastmnist.npz")["test_images"][:count]]


def test_every_preset_is_a_model_argument_file():
    names = sorted(path.stem for path in PRESETS.glob("*.yaml"))
    assert names == ["resnet18_224", "resnet18_28", "resnet50_224", "resnet50_28", "tiny_beit_28"]
    model_fields = set(ModelArguments.__dataclass_fields__)
    for name in names:
        assert set(yaml.safe_load((PRESETS / f"{name}.yaml").read_text())) <= model_fields, name


@pytest.mark.parametrize("name,input_size,parameters", [
    ("resnet18_28", 112, 11_177_538),
    ("resnet50_28", 112, 23_512_130),
    ("resnet18_224", 224, 11_177_538),
    ("resnet50_224", 224, 23_512_130),
    ("tiny_beit_28", 28, 137_602),
])
def test_preset_builds_its_architecture_at_its_input_size(name, input_size, parameters):
    """Parameter counts of torchvision's resnet18/resnet50 with a 2-class head (the paper's models)."""
    args = preset(name)
    model = load_model(args, get_spec("breastmnist"))
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert model.config.image_size == input_size
    assert load_image_processor(args, model)(breast_images(1), return_tensors="pt")["pixel_values"].shape[-2:] == (input_size, input_size)


@pytest.mark.parametrize("name", ["resnet18_28", "tiny_beit_28"])
def test_preset_round_trips_through_from_pretrained_and_pipeline(tmp_path, name):
    """Saved with its processor, the model reloads with plain transformers and pipeline gives the
    scores of the model itself on the processor's inputs."""
    args = preset(name)
    torch.manual_seed(0)
    model = load_model(args, get_spec("breastmnist")).eval()
    processor = load_image_processor(args, model)
    model.save_pretrained(tmp_path / name)
    processor.save_pretrained(tmp_path / name)

    images = breast_images(2)
    inputs = processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = torch.softmax(model(pixel_values=inputs).logits, dim=-1)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / name).eval()
    reloaded_processor = AutoImageProcessor.from_pretrained(tmp_path / name)
    with torch.no_grad():
        again = torch.softmax(reloaded(pixel_values=reloaded_processor(images, return_tensors="pt")["pixel_values"]).logits, -1)
    torch.testing.assert_close(again, expected)

    classifier = pipeline("image-classification", model=str(tmp_path / name), device="cpu")
    for image, scores in zip(images, expected):
        by_label = {row["label"]: row["score"] for row in classifier(image, top_k=None)}
        assert by_label == pytest.approx({"malignant": scores[0].item(), "normal, benign": scores[1].item()}, abs=1e-5)


@pytest.mark.parametrize("name", ["resnet18_28", "resnet50_28"])
def test_28x28_scans_reach_the_first_stage_as_28x28_maps(name):
    """MedMNIST v2's 28x28 ResNets have a stride-1 stem and no max-pool, so the first block sees the
    whole 28x28 grid. The presets get there by enlarging 4x (nearest) before the standard stem; a
    standard ResNet fed the 28x28 image itself would cut it to 7x7."""
    args = preset(name)
    model = load_model(args, get_spec("breastmnist")).eval()
    pixel_values = load_image_processor(args, model)(breast_images(1), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        stem = model.resnet.embedder(pixel_values)
        assert stem.shape[-2:] == (28, 28)
        stages = model.resnet.encoder(stem, output_hidden_states=True).hidden_states
        assert [tuple(h.shape[-2:]) for h in stages[1:]] == [(28, 28), (14, 14), (7, 7), (4, 4)]  # as in the paper
        assert model.resnet.embedder(pixel_values[..., ::4, ::4]).shape[-2:] == (7, 7)


@pytest.mark.parametrize("name", ["resnet18_28", "resnet18_224", "tiny_beit_28"])
def test_processor_does_not_crop_and_the_fast_path_gives_the_same_inputs(name):
    args = preset(name)
    model = load_model(args, get_spec("breastmnist"))
    processor = load_image_processor(args, model)
    assert processor_supported(processor) is None  # the fast path applies
    assert not getattr(processor, "do_center_crop", False) and not getattr(processor, "crop_pct", None)
    pixels = np.load(DATA / "breastmnist.npz")["test_images"][:5]  # 5 images: one padded group of four on the CPU
    expected = processor([Image.fromarray(image).convert("RGB") for image in pixels], return_tensors="pt")["pixel_values"]
    batch = torch.from_numpy(pixels)[:, None]
    for packed in (True, False):
        torch.testing.assert_close(DevicePreprocessor(processor, pack_gray_on_cpu=packed)(batch), expected, rtol=0, atol=1e-6)
    # No crop: nearest enlargement by an integer factor keeps every pixel, normalised with mean/std 0.5.
    factor = expected.shape[-1] // 28
    torch.testing.assert_close(expected[:, 0, ::factor, ::factor], torch.from_numpy(pixels).float() / 127.5 - 1, rtol=0, atol=1e-6)


def test_bad_overrides_are_one_line_naming_the_key_and_the_config_class(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    result = run_cli("train", "--model_type", "resnet", "--config_overrides", "depths=[2,2,2,2],hidden_size=[64]",
                     "--data_dir", str(DATA), "--dataset_cache_dir", str(cache), "--output_dir", str(out))
    assert_one_line_error(result, "unknown --config_overrides key 'hidden_size'", "ResNetConfig")
    assert_nothing_written(out, cache)


@pytest.mark.e2e
def test_resnet18_preset_trains_on_the_fast_path_and_its_run_folder_loads_with_plain_transformers(tmp_path):
    out = tmp_path / "resnet18-28"
    result = run_cli("train", str(PRESETS / "resnet18_28.yaml"), "--dataset_name", "breastmnist", "--data_dir", str(DATA),
                     "--dataset_cache_dir", str(tmp_path / "cache"), "--output_dir", str(out), "--max_steps", "1",
                     "--max_eval_samples", "16", "--per_device_train_batch_size", "16", "--report_to", "none", "--explain_per_class", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Data path: fast" in result.stdout, result.stdout[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["trained_from_scratch"] and results["model_type"] == "resnet"
    saved = json.loads((out / "preprocessor_config.json").read_text())
    assert saved["size"] == {"height": 112, "width": 112} and saved["resample"] == 0 and saved["image_mean"] == [0.5] * 3

    # A fresh interpreter that never imports hf_medbeit: no trust_remote_code, no custom code.
    script = (
        "import sys, json, numpy as np\n"
        "from PIL import Image\n"
        "from transformers import pipeline\n"
        f"classifier = pipeline('image-classification', model={str(out)!r}, device='cpu')\n"
        f"image = Image.fromarray(np.load({str(DATA / 'breastmnist.npz')!r})['test_images'][0])\n"
        "print(json.dumps({'scores': classifier(image, top_k=None), 'hf_medbeit': 'hf_medbeit' in sys.modules}))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    answer = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert not answer["hf_medbeit"]
    assert {row["label"] for row in answer["scores"]} == {"malignant", "normal, benign"}
    # The same score as the run's own test prediction for that image (Trainer.predict on the fast path).
    with open(out / "test_predictions.csv", newline="") as handle:
        first = next(csv.DictReader(handle))
    by_label = {row["label"]: row["score"] for row in answer["scores"]}
    assert by_label["malignant"] == pytest.approx(float(first["score_malignant"]), abs=1e-5)
    assert by_label["normal, benign"] == pytest.approx(float(first["score_normal, benign"]), abs=1e-5)
