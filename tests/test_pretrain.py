"""Self-supervised pre-training (hf-medbeit pretrain): masks, targets, augmentation, the recipe,
its run folder and the hand-off to fine-tuning."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import BeitConfig, BeitForImageClassification, BeitForMaskedImageModeling

from hf_medbeit import finetune, outputs, pretrain
from hf_medbeit.errors import UserError
from hf_medbeit.mim import (BlockMaskGenerator, DeviceAugmenter, PatchCodebook, PixelTarget, RandomMaskGenerator,
                            TokenTarget, collate_images, draw_masks, normalize_patches, patchify)

from conftest import DATA, REPO, TINY_BEIT, assert_one_line_error, run_cli, two_cpu_processes

# A tiny BEiT for masked image modeling (relative position bias, as BEiT pre-trains).
TINY_MIM = TINY_BEIT.replace(",image_size=28", "") + ",use_relative_position_bias=true"


def pretrain_args(out: Path, *extra: str) -> list[str]:
    return ["--sources", "breastmnist", "--data_dir", str(DATA), "--config_overrides", TINY_MIM,
            "--codebook_size", "16", "--codebook_fit_images", "200", "--per_device_train_batch_size", "32",
            "--output_dir", str(out), "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1", *extra]


# --- masks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(7, 7), (14, 14)])
def test_block_masks_cover_about_the_ratio_never_more(grid):
    generator = BlockMaskGenerator(grid, 0.4)
    rng = np.random.default_rng(0)
    counts = np.array([generator(rng).sum() for _ in range(300)])
    assert counts.max() <= generator.target
    # BEiT's algorithm may stop a little short when no block fits; on average it is close.
    assert counts.mean() >= 0.85 * generator.target


def test_block_masks_are_blocks_not_scattered_patches():
    """On BEiT's 14x14 grid, masked patches touch other masked patches far more than random ones."""
    rng = np.random.default_rng(1)

    def neighbours(mask):
        grid = mask.reshape(14, 14)
        return (grid[:, 1:] & grid[:, :-1]).sum() + (grid[1:] & grid[:-1]).sum()

    block = np.mean([neighbours(BlockMaskGenerator((14, 14), 0.4)(rng)) for _ in range(100)])
    scattered = np.mean([neighbours(RandomMaskGenerator((14, 14), 0.4)(rng)) for _ in range(100)])
    assert block > 2 * scattered


def test_the_smallest_block_scales_with_the_grid():
    assert BlockMaskGenerator((14, 14), 0.4).min_block == 16  # BEiT's own setting
    assert BlockMaskGenerator((7, 7), 0.4).min_block == 4


def test_random_masks_have_exactly_the_ratio():
    generator = RandomMaskGenerator((7, 7), 0.6)
    rng = np.random.default_rng(0)
    assert {int(generator(rng).sum()) for _ in range(20)} == {29}


def test_masks_differ_per_image_and_repeat_under_the_same_seed():
    generator = BlockMaskGenerator((7, 7), 0.4)
    masks = draw_masks(generator, 8, np.random.default_rng(0))
    assert masks.shape == (8, 49) and masks.dtype == torch.bool
    assert len({tuple(row.tolist()) for row in masks}) > 1
    assert torch.equal(draw_masks(generator, 8, np.random.default_rng(0)), masks)


def test_the_collator_drops_labels():
    batch = collate_images({"pixel_values": torch.zeros(2, 1, 28, 28, dtype=torch.uint8), "labels": torch.zeros(2)})
    assert set(batch) == {"pixel_values"}


# --- targets -----------------------------------------------------------------------------------


def test_patchify_orders_patches_as_beits_patch_embedding():
    """Patch k of patchify is what BEiT's stride-p convolution sees at token k (row-major grid)."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, 28, 28)
    conv = torch.nn.Conv2d(3, 5, kernel_size=4, stride=4, bias=False)
    tokens = conv(images).flatten(2).transpose(1, 2)  # (B, 49, 5), BEiT's order
    # The same linear map applied to patchify's (p, p, C)-ordered vectors.
    weight = conv.weight.permute(0, 2, 3, 1).reshape(5, -1)
    assert torch.allclose(patchify(images, 4) @ weight.T, tokens, atol=1e-5)


def test_codebook_tokens_are_the_nearest_centroids():
    torch.manual_seed(0)
    codes = torch.randn(16, 48)
    codebook = PatchCodebook(codes, patch_size=4, normalize=False)
    images = torch.randn(3, 3, 28, 28)
    patches = patchify(images, 4)
    expected = torch.cdist(patches, codes.expand(3, -1, -1)).argmin(-1)
    assert torch.equal(codebook.tokens(images), expected)


def test_a_fitted_codebook_survives_saving_and_loading(tmp_path):
    from hf_medbeit.fast_path import DevicePreprocessor, UInt8ImageDataset
    from hf_medbeit.modeling import build_image_processor
    from hf_medbeit.unlabeled import load_unlabeled

    corpus = load_unlabeled(["breastmnist"], 28, data_dir=DATA, cache_dir=tmp_path / "cache")
    images = UInt8ImageDataset(corpus.dataset)
    codebook = PatchCodebook.fit(images, DevicePreprocessor(build_image_processor(28)), 4, 16, True, seed=0, max_images=100)
    codebook.save(tmp_path / "codebook.safetensors")
    loaded = PatchCodebook.load(tmp_path / "codebook.safetensors")
    assert torch.equal(loaded.codes, codebook.codes) and loaded.patch_size == 4 and loaded.normalize
    pixels = torch.randn(2, 3, 28, 28)
    assert torch.equal(loaded.tokens(pixels), codebook.tokens(pixels))
    assert len(set(codebook.tokens(pixels).flatten().tolist())) > 1


def test_the_token_loss_is_cross_entropy_against_the_masked_patches_tokens():
    torch.manual_seed(0)
    codebook = PatchCodebook(torch.randn(8, 48), 4, normalize=False)
    pixels = torch.randn(2, 3, 28, 28)
    mask = torch.zeros(2, 49, dtype=torch.bool)
    mask[:, :10] = True
    logits = torch.randn(20, 8)
    expected = F.cross_entropy(logits, codebook.tokens(pixels)[:, :10].reshape(-1))
    assert torch.allclose(TokenTarget(codebook).loss(logits, pixels, mask), expected)


def test_the_pixel_loss_is_zero_for_a_perfect_prediction_of_normalised_patches():
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 28, 28)
    mask = torch.rand(2, 49) < 0.4
    perfect = normalize_patches(patchify(pixels, 4))[mask]
    target = PixelTarget(4, normalize=True)
    assert target.output_size == 48
    assert target.loss(perfect, pixels, mask).item() < 1e-5
    assert target.loss(torch.zeros_like(perfect), pixels, mask).item() > 0.5


def test_device_augmentation_keeps_the_size_and_a_full_crop_is_the_image_or_its_mirror():
    torch.manual_seed(0)
    pixels = torch.randn(4, 3, 28, 28)
    out = DeviceAugmenter(min_scale=0.3)(pixels)
    assert out.shape == pixels.shape and not torch.allclose(out, pixels)
    whole = DeviceAugmenter(min_scale=1.0, aspect=(1.0, 1.0))(pixels.repeat(8, 1, 1, 1))
    same = [torch.allclose(image, pixels[i % 4], atol=1e-5) for i, image in enumerate(whole)]
    mirrored = [torch.allclose(image, pixels[i % 4].flip(-1), atol=1e-5) for i, image in enumerate(whole)]
    assert all(a or b for a, b in zip(same, mirrored))
    assert any(same) and any(mirrored)


# --- the recipe, its run folder and the hand-off ------------------------------------------------

BACKBONE_PREFIXES = ("beit.embeddings.", "beit.encoder.")


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory) -> Path:
    """A finished pre-training run on BreastMNIST's training images plus a synthetic unlabelled
    array (8 optimizer steps)."""
    root = tmp_path_factory.mktemp("pretrain")
    extra = root / "scans.npy"
    np.save(extra, np.random.default_rng(0).integers(0, 256, (64, 32, 32), dtype=np.uint8))
    out = root / "run"
    args = pretrain_args(out, "--max_steps", "8", "--dataset_cache_dir", str(root / "cache"))
    args[1:2] = ["breastmnist", str(extra)]
    pretrain.main(args)
    return out


@pytest.mark.e2e
def test_a_pretraining_run_folder_holds_the_model_codebook_card_and_results(pretrained_run):
    names = {path.name for path in pretrained_run.iterdir()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "codebook.safetensors", "README.md",
            "all_results.json", "run_config.json", "pretraining_loss.png", ".hf_medbeit_run.json"} <= names
    results = outputs.read_results(pretrained_run, kind="pretrain")
    assert results["kind"] == "pretrain" and results["mim_target"] == "tokens"
    assert [source["name"] for source in results["sources"]][0] == "breastmnist"
    assert results["images_per_epoch"] == 546 + 64  # training split only, plus the array
    card = (pretrained_run / "README.md").read_text()
    assert "masked image modeling" in card and "training split only" in card and "546" in card
    config = json.loads((pretrained_run / "config.json").read_text())
    assert config["architectures"] == ["BeitForMaskedImageModeling"] and config["use_mask_token"]
    assert config["vocab_size"] == 16  # the codebook's size


@pytest.mark.e2e
def test_every_backbone_weight_of_the_pretrained_encoder_reaches_the_classifier(pretrained_run):
    classifier, info = BeitForImageClassification.from_pretrained(pretrained_run, num_labels=2, output_loading_info=True)
    # Only the heads differ: the MIM head and its norm are left out, the pooler norm and classifier are new.
    assert not [key for key in info["missing_keys"] if key.startswith(BACKBONE_PREFIXES)], info["missing_keys"]
    assert not [key for key in info["unexpected_keys"] if key.startswith(BACKBONE_PREFIXES)], info["unexpected_keys"]
    assert set(info["unexpected_keys"]) <= {"layernorm.weight", "layernorm.bias", "lm_head.weight", "lm_head.bias"}
    assert not info["mismatched_keys"]
    pretrained = BeitForMaskedImageModeling.from_pretrained(pretrained_run).state_dict()
    loaded = classifier.state_dict()
    backbone = [key for key in pretrained if key.startswith(BACKBONE_PREFIXES)]
    assert backbone and all(torch.equal(pretrained[key], loaded[key]) for key in backbone)


@pytest.mark.e2e
def test_hf_medbeit_train_fine_tunes_the_pretraining_run_and_records_it(pretrained_run, tmp_path):
    results = finetune.main([
        "--model_name_or_path", str(pretrained_run), "--dataset_name", "breastmnist", "--data_dir", str(DATA),
        "--max_steps", "2", "--per_device_train_batch_size", "16", "--output_dir", str(tmp_path / "ft"),
        "--report_to", "none", "--explain_per_class", "0", "--disable_tqdm", "true", "--eval_strategy", "steps", "--eval_steps", "2",
        "--save_strategy", "steps", "--save_steps", "2",
    ])
    assert results["pretraining"]["run"] == str(pretrained_run)
    assert results["pretraining"]["mim_target"] == "tokens"
    assert results["pretraining"]["sources"][0] == "breastmnist"
    assert not results["trained_from_scratch"]
    card = (tmp_path / "ft" / "README.md").read_text()
    assert str(pretrained_run) in card


@pytest.mark.e2e
def test_pixel_targets_give_a_head_of_patch_pixels(tmp_path):
    results = pretrain.main(pretrain_args(tmp_path / "run", "--mim_target", "pixels", "--masking", "random",
                                          "--max_steps", "2", "--dataset_cache_dir", str(tmp_path / "cache")))
    assert results["mim_target"] == "pixels" and results["codebook_size"] is None
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["vocab_size"] == 4 * 4 * 3
    assert not (tmp_path / "run" / "codebook.safetensors").exists()


@pytest.mark.e2e
def test_a_pretraining_run_stopped_by_a_signal_resumes_to_the_same_model(tmp_path):
    """Ctrl-C saves a checkpoint and exits 130; the same command resumes (with the saved codebook)
    and ends with the weights of a run that was never stopped."""
    cache = tmp_path / "cache"
    common = ("--max_steps", "12", "--save_strategy", "steps", "--save_steps", "4", "--dataset_cache_dir", str(cache))
    pretrain.main(pretrain_args(tmp_path / "whole", *common))

    command = [sys.executable, "-m", "hf_medbeit.cli", "pretrain", *pretrain_args(tmp_path / "cut", *common)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**__import__("os").environ, "PYTHONUNBUFFERED": "1"})
    logged = 0
    for line in process.stdout:
        if line.startswith("{'loss'"):
            logged += 1
            if logged == 5:
                process.send_signal(signal.SIGINT)
                break
    rest = process.communicate(timeout=300)[0]
    assert process.returncode == 130, rest[-2000:]
    assert "hf-medbeit: stopped:" in rest and not (tmp_path / "cut" / "all_results.json").exists()
    codebook_before = load_file(tmp_path / "cut" / "codebook.safetensors")["codes"]

    resumed = run_cli("pretrain", *pretrain_args(tmp_path / "cut", *common))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout + resumed.stderr
    assert torch.equal(load_file(tmp_path / "cut" / "codebook.safetensors")["codes"], codebook_before)
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    cut = load_file(tmp_path / "cut" / "model.safetensors")
    assert whole.keys() == cut.keys()
    assert all(torch.allclose(whole[key], cut[key], atol=1e-6) for key in whole)


# --- mistakes: one line, exit 2, nothing written ------------------------------------------------


@pytest.mark.parametrize("flags, expected", [
    (["--mask_ratio", "1.5"], "--mask_ratio 1.5 must be between 0 and 1"),
    (["--codebook_size", "1"], "--codebook_size 1 must be 2 or more"),
    (["--sources", "breastmnst"], "did you mean"),
    (["--sources", "breastmnist", "--source_repeats", "1", "2"], "repeats"),
    (["--config_overrides", "hidden_sise=8"], "unknown --config_overrides key 'hidden_sise'"),
    (["--config_overrides", "patch_size=5"], "not a multiple of patch_size=5"),
    (["--num_train_epochs", "0"], "trains nothing"),
    (["--model_name_or_path", "x", "--config_overrides", "hidden_size=8"], "keep one of them"),
    (["--mim_targt", "pixels"], "did you mean --mim_target"),
])
def test_pretraining_mistakes_are_one_line_before_any_data_is_read(tmp_path, flags, expected):
    out = tmp_path / "run"
    with pytest.raises(UserError, match=__import__("re").escape(expected)):
        pretrain.main(pretrain_args(out) + flags)
    assert not out.exists()


def test_a_pretraining_mistake_from_the_command_line_exits_2_with_one_line(tmp_path):
    result = run_cli("pretrain", *pretrain_args(tmp_path / "run", "--mask_ratio", "0"))
    assert_one_line_error(result, "--mask_ratio 0.0 must be between 0 and 1")
    assert not (tmp_path / "run").exists()


def test_a_pretraining_folder_is_not_a_classifier_for_the_commands_that_need_one(pretrained_run):
    with pytest.raises(UserError, match="is a pre-training run .* fine-tune it first"):
        outputs.read_results(pretrained_run)


def test_train_refuses_to_resume_a_pretraining_folder(pretrained_run, tmp_path):
    import shutil

    unfinished = tmp_path / "unfinished"
    shutil.copytree(pretrained_run, unfinished)
    (unfinished / "all_results.json").unlink()
    with pytest.raises(UserError, match="unfinished `hf-medbeit pretrain` run"):
        finetune.main(["--dataset_name", "breastmnist", "--data_dir", str(DATA), "--model_type", "beit",
                       "--config_overrides", TINY_BEIT, "--output_dir", str(unfinished), "--report_to", "none", "--explain_per_class", "0"])


@pytest.mark.e2e
def test_accelerate_launch_pretrains_in_two_cpu_processes(tmp_path):
    """scripts/pretrain.py under `accelerate launch` (2 CPU processes, one gloo group): one run
    folder, written once, with the batch split between the processes."""
    command, env = two_cpu_processes(*pretrain_args(tmp_path / "run", "--max_steps", "2", "--per_device_train_batch_size", "8",
                                                    "--dataset_cache_dir", str(tmp_path / "cache")), script="pretrain.py")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = outputs.read_results(tmp_path / "run", kind="pretrain")
    assert results["hyperparameters"]["world_size"] == 2
    assert results["hyperparameters"]["total_train_batch_size"] == 16
    assert (tmp_path / "run" / "codebook.safetensors").is_file()
