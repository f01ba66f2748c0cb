"""`hf-medbeit explain`: maps against hand computations, the sanity checks on a toy with a known
answer, the command on a run's test split and on files, and its one-line errors."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageClassification, BeitConfig, ResNetConfig

from conftest import assert_one_line_error, run_cli
from hf_medbeit import explain, outputs
from hf_medbeit.errors import UserError
from hf_medbeit.modeling import build_image_processor
from tiny_run import copy_run, trained_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory)


def tiny_resnet(num_labels=2, seed=0):
    torch.manual_seed(seed)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=num_labels,
                          downsample_in_first_stage=False)
    return AutoModelForImageClassification.from_config(config).eval()


def tiny_beit(layers=2, seed=0):
    torch.manual_seed(seed)
    config = BeitConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                        image_size=28, patch_size=4, num_labels=2)
    return AutoModelForImageClassification.from_config(config, attn_implementation="eager").eval()


def save_model(model, folder, image_size):
    model.save_pretrained(folder)
    build_image_processor(image_size).save_pretrained(folder)
    return folder


def test_gradcam_from_the_library_equals_gradcam_computed_by_hand_on_a_cnn():
    import cv2

    model = tiny_resnet()
    pixels = torch.randn(3, 3, 32, 32)
    structure = explain.find_structure(model, pixels)
    assert structure.kind == "cnn" and structure.target_name == "resnet.encoder.stages.1"
    targets = np.array([0, 1, 1])
    maps = explain.gradcam_maps(model, structure, pixels, targets)

    # By the definition (Selvaraju et al.): channel weights = mean gradient of the class logit over
    # the map; ReLU of the weighted sum of the channels; then scaled to 0..1 and resized as shown.
    captured = {}
    handle = structure.target_layer.register_forward_hook(lambda m, a, out: captured.update(out=out))
    logits = model(pixel_values=pixels).logits
    handle.remove()
    activations = captured["out"]
    gradients = torch.autograd.grad(logits[torch.arange(3), torch.as_tensor(targets)].sum(), activations)[0]
    cam = torch.relu((gradients.mean(dim=(2, 3), keepdim=True) * activations).sum(dim=1)).detach().numpy()
    for index in range(3):
        scaled = (cam[index] - cam[index].min()) / (cam[index].max() - cam[index].min() + 1e-7)
        resized = cv2.resize(scaled, (32, 32))
        expected = (resized - resized.min()) / (resized.max() - resized.min() + 1e-7)
        np.testing.assert_allclose(maps[index], expected, atol=1e-4)


def test_token_gradcam_maps_the_patch_grid_of_the_last_block_onto_the_input():
    model = tiny_beit()
    pixels = torch.randn(2, 3, 28, 28)
    structure = explain.find_structure(model, pixels)
    assert (structure.kind, structure.grid, structure.reads_mean) == ("tokens", (7, 7), True)
    assert structure.target_name == "beit.layers.1.layernorm_before"
    maps = explain.gradcam_maps(model, structure, pixels, np.array([0, 1]))
    assert maps.shape == (2, 28, 28) and maps.min() >= 0 and maps.max() <= 1


@pytest.mark.parametrize("reads_mean", [True, False])
def test_rollout_and_last_attention_of_a_one_layer_model_are_its_attention_rows_by_hand(reads_mean):
    model = tiny_beit(layers=1)
    model.config.use_mean_pooling = reads_mean  # the row read: patch-token mean (BEiT) or CLS (ViT)
    pixels = torch.randn(2, 3, 28, 28)
    structure = explain.find_structure(model, pixels)
    with torch.no_grad():
        attention = model(pixel_values=pixels, output_attentions=True).attentions[0].mean(dim=1)  # (B, 50, 50)
    mixed = 0.5 * attention + 0.5 * torch.eye(50)
    mixed = mixed / mixed.sum(-1, keepdim=True)
    for method, matrix in (("rollout", mixed), ("attention", attention)):
        rows = matrix[:, 1:, 1:].mean(dim=1) if reads_mean else matrix[:, 0, 1:]
        expected = explain._upsample(rows.reshape(2, 7, 7).numpy(), (28, 28))
        np.testing.assert_allclose(explain.attention_maps(model, structure, pixels, method), expected, atol=1e-4)


def test_attention_maps_refuse_a_model_loaded_with_sdpa_instead_of_returning_nothing():
    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_config(tiny_beit().config, attn_implementation="sdpa").eval()
    pixels = torch.randn(1, 3, 28, 28)
    with pytest.raises(RuntimeError, match="eager"):
        explain.attention_maps(model, explain.find_structure(model, pixels), pixels, "rollout")


def _toy_images(count, rng):
    """Class 1: a bright 8x8 square somewhere on noise; class 0: noise only. The evidence is known."""
    images = rng.normal(-0.5, 0.3, size=(count, 3, 32, 32)).astype(np.float32)
    labels = np.arange(count) % 2
    for index in np.flatnonzero(labels):
        top, left = rng.integers(0, 24, size=2)
        images[index, :, top:top + 8, left:left + 8] = 1.5
    return torch.from_numpy(images), torch.from_numpy(labels)


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is faster than two fighting over shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sanity_checks_tell_a_trained_toy_model_from_a_randomised_one(one_thread):
    rng = np.random.default_rng(0)
    model = tiny_resnet(seed=0).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        images, labels = _toy_images(32, rng)
        loss = torch.nn.functional.cross_entropy(model(pixel_values=images).logits, labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    images, labels = _toy_images(8, rng)
    squares = images[labels == 1]
    with torch.no_grad():
        assert (model(pixel_values=squares).logits.argmax(-1) == 1).all()  # the toy is learnt
    targets = np.ones(len(squares), dtype=int)

    def numbers(candidate):
        structure = explain.find_structure(candidate, squares)
        maps = explain.compute_maps(candidate, structure, squares, targets, ["gradcam"])
        return explain.sanity_checks(candidate, structure, squares, targets, maps, multi_label=False)["gradcam"]

    trained = numbers(model)
    untrained = numbers(explain.randomised_copy(model, seed=1))
    # Removing what Grad-CAM points at removes the square: the score falls faster than at random.
    assert trained["deletion_auc"] < trained["deletion_auc_random"] - 0.1, trained
    assert untrained["deletion_auc_random"] - untrained["deletion_auc"] < 0.05, untrained
    # The trained model's maps are not those of a freshly initialised one.
    assert trained["randomisation_rank_correlation"] < 0.5, trained


def test_rank_correlation_counts_a_constant_map_as_sharing_no_ranking():
    ramp = np.arange(16.0).reshape(4, 4)
    assert explain.rank_correlation(ramp, ramp) == pytest.approx(1.0)
    assert explain.rank_correlation(ramp, -ramp) == pytest.approx(-1.0)
    assert explain.rank_correlation(ramp, np.zeros((4, 4))) == 0.0


def test_test_images_are_chosen_per_class_right_and_wrong_or_misclassified_first():
    truth = np.eye(2, dtype=int)[[0, 0, 0, 1, 1, 1]]
    scores = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7], [0.95, 0.05], [0.45, 0.55]])
    # Class 0: right 0 (0.9) then 1; wrong 2. Class 1: right 3 (0.7) then 5; wrong 4.
    assert explain.select_test_images(truth, scores, 2, None, False) == [0, 1, 2, 3, 5, 4]
    assert explain.select_test_images(truth, scores, 1, None, False) == [0, 2, 3, 4]
    # Wrong ones first, most confidently wrong first (4 at 0.95, then 2 at 0.8), then right ones.
    assert explain.select_test_images(truth, scores, None, 3, True) == [4, 2, 0]


def _csv_scores(run):
    with open(run / outputs.PREDICTIONS_FILE, newline="") as handle:
        return {int(row["index"]): row for row in csv.DictReader(handle)}


def test_explain_on_a_runs_test_split_writes_every_image_the_grid_and_the_sanity_numbers(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / "run")
    written = explain.main(["--model", str(run), "--split", "test", "--per_class", "1"])
    assert written == run / explain.EXPLANATIONS_DIR
    summary = json.loads((written / explain.SUMMARY_FILE).read_text())
    assert set(summary["methods"]) == {"gradcam", "rollout", "attention"}
    assert summary["token_read"] == "mean of patch tokens"
    rows = _csv_scores(run)
    names = outputs.read_results(run)["label_names"]
    assert 2 <= len(summary["images"]) <= 4
    for record in summary["images"]:
        row = rows[int(record["source"][5:-1])]
        assert record["true"] == [names[int(row["label"])]]
        # The explained images are scored as the run scored them (processor path vs fast path).
        for name in names:
            assert record["scores"][name] == pytest.approx(float(row[f"score_{name}"]), abs=1e-4)
        assert record["correct"] == (record["predicted"] == record["true"])
        with Image.open(written / record["file"]) as image:
            assert image.format == "PNG" and image.width > 300
    assert {record["correct"] for record in summary["images"]} == {True, False}
    for numbers in summary["sanity_checks"].values():
        assert -1 <= numbers["randomisation_rank_correlation"] <= 1 and 0 <= numbers["deletion_auc"] <= 1
    with np.load(written / explain.MAPS_FILE, allow_pickle=False) as maps:
        assert maps["gradcam"].shape == (len(summary["images"]), 28, 28)
    assert Image.open(written / explain.GRID_FILE).height > 400

    # Run again: the folder is replaced whole, and nothing is left beside it.
    explain.main(["--model", str(run), "--split", "test", "--misclassified_first", "--num_images", "2",
                  "--methods", "gradcam", "--no_sanity_check"])
    summary = json.loads((written / explain.SUMMARY_FILE).read_text())
    assert [record["correct"] for record in summary["images"]] == [False, False]
    assert summary["sanity_checks"] is None and len(list(written.glob("0*.png"))) == 2
    assert not [path for path in run.iterdir() if path.name.startswith(".explanations")]


def test_explain_on_files_skips_what_is_not_an_image_and_works_for_a_cnn(tmp_path, capsys):
    folder = save_model(tiny_resnet(), tmp_path / "cnn", 32)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50), dtype=np.uint8)).save(images / "scan.png")
    (images / "notes.png").write_text("not an image")
    written = explain.main(["--model", str(folder), str(images), "--output_dir", str(tmp_path / "out")])
    assert "skipped" in capsys.readouterr().err
    summary = json.loads((written / explain.SUMMARY_FILE).read_text())
    assert list(summary["methods"]) == ["gradcam"] and summary["images"][0]["source"].endswith("scan.png")
    assert summary["images"][0]["true"] is None and (written / "000_scan.png").is_file()


def _user_error(argv) -> str:
    with pytest.raises(UserError) as caught:
        explain.main(argv)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_bad_arguments_are_one_line_errors_before_the_model_is_loaded(run_dir, tmp_path):
    image = tmp_path / "x.png"
    Image.new("L", (28, 28)).save(image)
    run = str(run_dir)
    cases = [
        (["--model", run], "nothing to explain"),
        (["--model", run, str(image), "--split", "test"], "not both"),
        (["--model", run, str(image), "--per_class", "2"], "add --split test"),
        (["--model", run, "--split", "test", "--per_class", "1", "--misclassified_first"], "pass one of them"),
        (["--model", run, "--split", "test", "--num_images", "3"], "goes with --misclassified_first"),
        (["--model", run, "--split", "test", "--per_class", "0"], "--per_class 0 must be at least 1"),
        (["--model", run, str(image), "--methods", "gradcam,lime"], "choose from gradcam, rollout, attention"),
        (["--model", "someone/some-model", "--split", "test"], "--model must be a run folder"),
        (["--model", str(tmp_path / "nope"), str(image)], "does not exist"),
    ]
    for argv, fragment in cases:
        assert fragment in _user_error(argv), argv
    other = tmp_path / "results"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert "holds other files" in _user_error(["--model", run, str(image), "--output_dir", str(other)])
    assert (other / "keep.txt").read_text() == "mine"


def test_attention_methods_on_a_cnn_and_a_missing_data_file_are_one_line_errors(run_dir, tmp_path):
    folder = save_model(tiny_resnet(), tmp_path / "cnn", 32)
    image = tmp_path / "x.png"
    Image.new("L", (28, 28)).save(image)
    out = tmp_path / "out"
    assert "a CNN has none of; use --methods gradcam" in _user_error(
        ["--model", str(folder), str(image), "--methods", "rollout", "--output_dir", str(out)])
    run = copy_run(run_dir, tmp_path / "run")
    config = json.loads((run / outputs.RUN_CONFIG_FILE).read_text())
    config["data_dir"] = str(tmp_path / "moved")
    (run / outputs.RUN_CONFIG_FILE).write_text(json.dumps(config))
    assert "is not there; put breastmnist.npz back" in _user_error(["--model", str(run), "--split", "test"])
    assert not out.exists() and not (run / explain.EXPLANATIONS_DIR).exists()


def test_the_real_command_prints_one_error_line_and_exit_status_2(tmp_path):
    result = run_cli("explain", "--model", str(tmp_path / "missing"), "--split", "test")
    assert_one_line_error(result, "--model", "does not exist")


def test_write_run_explanations_is_what_explain_split_test_writes(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / "run")
    shutil.rmtree(run / explain.EXPLANATIONS_DIR, ignore_errors=True)
    written = explain.write_run_explanations(run, per_class=1, device="cpu")
    summary = json.loads((written / explain.SUMMARY_FILE).read_text())
    assert summary["split"] == "test" and set(summary["sanity_checks"]) == {"gradcam", "rollout", "attention"}
    assert (written / explain.GRID_FILE).is_file()
