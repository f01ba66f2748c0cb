"""The fast data path: same tensors as the image processor, and training/prediction through it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor, BeitImageProcessor, ConvNextImageProcessor, ViTImageProcessor

from conftest import BREASTMNIST_MD5, TINY_BEIT
from hf_medbeit import fast_path
from hf_medbeit.data import load_medmnist
from hf_medbeit.data_path import prepare_splits
from hf_medbeit.fast_path import DevicePreprocessor, UInt8ImageDataset, collate_uint8, processor_supported
from hf_medbeit.metrics import make_compute_metrics
from hf_medbeit.training import MedMNISTTrainingArguments, WeightedLossTrainer
from hf_medbeit.transforms import collate, make_transform

# float32 rounding of (x * r - m) / s computed two ways; one uint8 step would be 1/127.5.
TOLERANCE = 1e-5


def processor_pixels(split, processor, indices):
    reference = split.with_transform(make_transform(processor))
    return collate([reference[i] for i in indices])["pixel_values"]


def fast_pixels(split, processor, indices, **kwargs):
    batch = collate_uint8(UInt8ImageDataset(split, **kwargs).__getitems__(indices))
    assert batch["pixel_values"].dtype == torch.uint8
    return DevicePreprocessor(processor)(batch["pixel_values"])


@pytest.mark.parametrize(
    "processor",
    [BeitImageProcessor(), ViTImageProcessor(), BeitImageProcessor(size={"height": 64, "width": 48})],
    ids=["beit-bicubic-224", "vit-bilinear-224", "beit-64x48"],
)
def test_official_breastmnist_matches_the_image_processor(breast_root, cache_dir, processor):
    raw, _, md5 = load_medmnist("breastmnist", data_dir=breast_root, cache_dir=cache_dir)
    assert md5 == BREASTMNIST_MD5
    indices = [0, 5, 17, 300, 545]
    expected = processor_pixels(raw["train"], processor, indices)
    for in_memory in (True, False):
        actual = fast_pixels(raw["train"], processor, indices, in_memory=in_memory)
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("flag,size", [("bloodmnist", 28), ("pneumoniamnist", 64), ("dermamnist", 224)])
def test_rgb_and_larger_images_match(synthetic_root, cache_dir, flag, size):
    # 28 and 64 are upscaled; 224 -> 112 is a downscale, where antialiasing matters.
    processor = BeitImageProcessor(size={"height": 112, "width": 112}) if size == 224 else BeitImageProcessor()
    raw, _, _ = load_medmnist(flag, size=size, data_dir=synthetic_root(flag, size, counts=(6, 2, 2)),
                              verify_md5=False, cache_dir=cache_dir)
    indices = [4, 0, 2]
    torch.testing.assert_close(
        fast_pixels(raw["train"], processor, indices), processor_pixels(raw["train"], processor, indices),
        atol=TOLERANCE, rtol=0,
    )


@pytest.mark.parametrize("channels,pack_gray_on_cpu", [(1, True), (1, False), (3, True)],
                         ids=["gray-packed", "gray-unpacked", "rgb"])
def test_every_batch_size_gives_the_per_image_result_contiguous(channels, pack_gray_on_cpu):
    # Gray batches are resized four images to one RGBA image on the CPU, the last group padded (or,
    # as on other devices, one plane per image); RGB batches arrive channels-last. Each image must
    # come out as if resized on its own, and the batch as a plain contiguous (B, 3, H, W) float tensor.
    processor = BeitImageProcessor(size={"height": 40, "width": 40})
    preprocess = DevicePreprocessor(processor, pack_gray_on_cpu=pack_gray_on_cpu)
    generator = torch.Generator().manual_seed(0)
    hwc = torch.randint(0, 256, (9, 28, 28, channels), dtype=torch.uint8, generator=generator)
    images = hwc.permute(0, 3, 1, 2)  # channels-last, as UInt8ImageDataset hands them out
    one_by_one = torch.cat([preprocess(image[None].contiguous()) for image in images])
    for batch_size in range(1, 10):
        batch = preprocess(images[:batch_size])
        assert batch.shape == (batch_size, 3, 40, 40) and batch.is_contiguous()
        assert torch.equal(batch, one_by_one[:batch_size])


# ImageNet's per-channel mean and std: a gray image broadcast to three channels must still get
# each channel's own normalisation (BEiT's and ViT's 0.5 everywhere would hide a mix-up).
IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}


@pytest.mark.parametrize(
    "processor",
    [BeitImageProcessor(), BeitImageProcessor(size={"height": 64, "width": 48}), ViTImageProcessor(**IMAGENET),
     BeitImageProcessor(size={"height": 14, "width": 14}, **IMAGENET)],
    ids=["beit-bicubic-224", "beit-64x48", "vit-bilinear-imagenet-mean", "beit-downscale-14-imagenet-mean"],
)
def test_unpacked_gray_branch_matches_the_processor_and_the_packed_branch(breast_root, cache_dir, processor, monkeypatch):
    """Off the CPU (a GPU), gray batches are never packed four to an RGBA image: each is resized as
    one plane and broadcast to three channels in the normalisation. ``pack_gray_on_cpu=False`` runs
    that branch here. It must match the processor as closely as the packed branch does (the
    resize is the same uint8 kernel on the CPU, so the two branches agree bit for bit; only the
    normalisation's float32 rounding separates both from the processor, hence TOLERANCE). What
    this cannot check is the GPU's own resize kernel."""
    raw, _, _ = load_medmnist("breastmnist", data_dir=breast_root, cache_dir=cache_dir)
    indices = [0, 5, 17, 300, 545]
    images = UInt8ImageDataset(raw["train"]).__getitems__(indices)["pixel_values"]
    assert images.shape == (5, 1, 28, 28)
    packed = DevicePreprocessor(processor)(images)

    def no_packing(images):
        raise AssertionError("the unpacked branch packed gray images")

    monkeypatch.setattr(fast_path, "pack_gray_planes", no_packing)
    unpacked = DevicePreprocessor(processor, pack_gray_on_cpu=False)(images)
    assert unpacked.shape == packed.shape and unpacked.dtype == torch.float32 and unpacked.is_contiguous()
    assert torch.equal(unpacked, packed)
    torch.testing.assert_close(unpacked, processor_pixels(raw["train"], processor, indices), atol=TOLERANCE, rtol=0)


def test_single_examples_and_lazy_decoding_agree(breast_root, cache_dir):
    raw, _, _ = load_medmnist("breastmnist", data_dir=breast_root, cache_dir=cache_dir)
    eager, lazy = UInt8ImageDataset(raw["test"], in_memory=True), UInt8ImageDataset(raw["test"], in_memory=False)
    assert eager.in_memory and not lazy.in_memory and len(eager) == len(lazy) == 156
    one_by_one = collate_uint8([eager[i] for i in (3, 1, 4)])
    batch = lazy.__getitems__([3, 1, 4])
    assert torch.equal(one_by_one["pixel_values"], batch["pixel_values"])
    assert torch.equal(one_by_one["labels"], batch["labels"])
    assert batch["pixel_values"].shape == (3, 1, 28, 28) and batch["labels"].dtype == torch.long


def test_lazy_split_through_loader_workers_gives_the_in_memory_batches(breast_root, cache_dir):
    # Splits too large for RAM are decoded per batch in DataLoader workers (the GPU default):
    # their channels-last batches cross process boundaries and must arrive unchanged.
    raw, _, _ = load_medmnist("breastmnist", data_dir=breast_root, cache_dir=cache_dir)
    lazy, eager = UInt8ImageDataset(raw["test"], in_memory=False), UInt8ImageDataset(raw["test"], in_memory=True)
    loader = torch.utils.data.DataLoader(lazy, batch_size=64, num_workers=2, collate_fn=collate_uint8)
    preprocess = DevicePreprocessor(BeitImageProcessor())
    seen = 0
    for batch in loader:
        expected = eager.__getitems__(list(range(seen, seen + len(batch["labels"]))))
        assert torch.equal(batch["pixel_values"], expected["pixel_values"])
        assert torch.equal(preprocess(batch["pixel_values"]), preprocess(expected["pixel_values"]))
        seen += len(batch["labels"])
    assert seen == 156


def test_unsupported_processor_falls_back_to_the_processor_path(breast_root, cache_dir):
    raw, _, _ = load_medmnist("breastmnist", data_dir=breast_root, cache_dir=cache_dir)
    convnext = ConvNextImageProcessor()  # resizes by crop_pct: not replicated
    assert processor_supported(convnext) is not None and processor_supported(BeitImageProcessor()) is None
    prepared = prepare_splits(raw["train"], raw["validation"], raw["test"], convnext, data_path="fast")
    assert prepared.path == "processor" and prepared.device_preprocessor is None
    prepared = prepare_splits(raw["train"], raw["validation"], raw["test"], BeitImageProcessor(), augment=True)
    assert prepared.path == "processor"


def test_multi_label_batches_train_with_bce(synthetic_root, cache_dir, tmp_path):
    from transformers import BeitConfig, BeitForImageClassification

    raw, spec, _ = load_medmnist("chestmnist", data_dir=synthetic_root("chestmnist", counts=(12, 4, 4)),
                                 verify_md5=False, cache_dir=cache_dir)
    processor = BeitImageProcessor(size={"height": 28, "width": 28})
    prepared = prepare_splits(raw["train"], raw["validation"], raw["test"], processor)
    batch = prepared.collate_fn(prepared.train.__getitems__([0, 1, 2]))
    assert batch["labels"].shape == (3, spec.num_labels) and batch["labels"].dtype == torch.float32
    assert torch.equal(batch["labels"], torch.tensor(np.array(raw["train"]["label"][:3]), dtype=torch.float32))
    config = BeitConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        image_size=28, patch_size=7, num_labels=spec.num_labels, problem_type="multi_label_classification")
    args = MedMNISTTrainingArguments(
        output_dir=str(tmp_path / "out"), report_to="none", save_strategy="no", eval_strategy="epoch",
        load_best_model_at_end=False, disable_tqdm=True, use_cpu=True, max_steps=2, per_device_train_batch_size=4,
    )
    assert not args.bf16 and not args.fp16  # GPU defaults leave CPU runs in fp32
    trainer = WeightedLossTrainer(
        model=BeitForImageClassification(config), args=args, train_dataset=prepared.train, eval_dataset=prepared.validation,
        data_collator=prepared.collate_fn, multi_label=True, device_preprocessor=prepared.device_preprocessor,
        compute_metrics=make_compute_metrics(spec.task, spec.label_names),
    )
    assert np.isfinite(trainer.train().training_loss)
    output = trainer.predict(prepared.test)
    assert output.predictions.shape == (4, spec.num_labels) and output.label_ids.shape == (4, spec.num_labels)


@pytest.mark.e2e
def test_train_command_uses_the_fast_path_and_saves_a_plain_model(breast_root, cache_dir, tmp_path, monkeypatch):
    """The recipe's default data path: every image of every split goes through the device
    preprocessor, and the run ends where the processor path (the reference) ends with the same
    seed. The saved model is a plain one that ``pipeline`` loads with its image processor."""
    from transformers import pipeline
    from PIL import Image

    from hf_medbeit.finetune import main

    images_seen = []
    preprocess = DevicePreprocessor.__call__

    def counting(self, images):
        images_seen.append(images.shape[0])
        return preprocess(self, images)

    monkeypatch.setattr(DevicePreprocessor, "__call__", counting)

    def train(data_path):
        images_seen.clear()
        results = main([
            "--dataset_name", "breastmnist", "--data_dir", str(breast_root), "--dataset_cache_dir", str(cache_dir),
            "--model_type", "beit", "--config_overrides", TINY_BEIT, "--output_dir", str(tmp_path / data_path),
            "--num_train_epochs", "1", "--per_device_train_batch_size", "64", "--report_to", "none", "--explain_per_class", "0",
            "--use_cpu", "--disable_tqdm", "True", "--max_train_samples", "128", "--data_path", data_path,
        ])
        return results, sum(images_seen)

    fast, fast_images = train("fast")
    reference, reference_images = train("processor")
    # 128 training images, the 78 validation images (evaluated during training and again for the
    # selected model) and the 156 test images, all through the device preprocessor; none on the
    # processor path.
    assert fast_images == 128 + 2 * 78 + 156 and reference_images == 0
    # Same inputs up to float32 rounding (TOLERANCE above), so the same predictions and metrics.
    scores = {path: np.loadtxt(tmp_path / path / "test_predictions.csv", delimiter=",", skiprows=1)
              for path in ("fast", "processor")}
    np.testing.assert_allclose(scores["fast"], scores["processor"], rtol=0, atol=1e-6)
    for key in ("eval_auc", "eval_acc", "test_auc", "test_acc", "test_balanced_accuracy"):
        assert fast[key] == pytest.approx(reference[key], abs=1e-6), key

    out = tmp_path / "fast"
    saved_type = json.loads((out / "preprocessor_config.json").read_text())["image_processor_type"]
    assert type(AutoImageProcessor.from_pretrained(out)).__name__ == saved_type  # a plain transformers processor
    classifier = pipeline("image-classification", model=str(out), device="cpu")
    image = Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).convert("RGB")
    assert {row["label"] for row in classifier(image)} == {"malignant", "normal, benign"}
