"""Model cards: rendered from the run's own files, parsed back by huggingface_hub."""

from __future__ import annotations

import errno
import json
import math
import os
import pathlib
import re
import shutil

import pytest
from huggingface_hub import ModelCard
from medmnist import INFO

from hf_medbeit import cards, outputs
from hf_medbeit.data import get_spec
from hf_medbeit.errors import UserError
from hf_medbeit.metrics import metric_key
from tiny_run import copy_run, trained_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory)


def _fake_run(folder, flag: str, config=None, confusion=None, state=None, **overrides):
    """A run folder holding only what the card reads, with made-up metrics for ``flag``: the official
    file's MD5 and a selected checkpoint unless overridden; ``confusion`` (rows true, columns
    predicted) and ``state`` (trainer_state.json) are written when given."""
    info = INFO[flag]
    names = [info["label"][str(i)] for i in range(len(info["label"]))]
    results = {
        "dataset": flag, "size": 28, "task": info["task"], "label_names": names, "model_type": "beit",
        "data_md5": get_spec(flag, overrides.get("size", 28)).md5, "best_model_checkpoint": "runs/x/checkpoint-10",
        "test_auc": 0.8123, "test_acc": 0.7012, "eval_auc": 0.8, "eval_acc": 0.7,
        "test_auc_ci95": [0.75, 0.86], "trainable_parameters": 10, "total_parameters": 20,
        "trained_from_scratch": False, "model_name_or_path": "microsoft/beit-base-patch16-224-pt22k-ft22k",
        "base_model": "microsoft/beit-base-patch16-224-pt22k-ft22k", "balancing": "none",
        "hyperparameters": {"learning_rate": 3e-4, "num_train_epochs": 5.0, "seed": 42},
        **{f"test_recall_{metric_key(name)}": 0.5 for name in names},
    }
    results.update(overrides)
    folder.mkdir(parents=True)
    (folder / outputs.RESULTS_FILE).write_text(json.dumps(results))
    (folder / "config.json").write_text(json.dumps(
        config or {"model_type": "beit", "architectures": ["BeitForImageClassification"], "image_size": 224}))
    if confusion is not None:
        (folder / outputs.CONFUSION_FILE).write_text(json.dumps({"label_names": names, "matrix": confusion}))
    if state is not None:
        (folder / "trainer_state.json").write_text(json.dumps(state))  # NaN as NaN, as Trainer writes it
    return folder


def test_card_is_written_by_training_and_parses_with_model_index(run_dir):
    card = ModelCard.load(run_dir / cards.CARD_FILE)
    results = outputs.read_results(run_dir)
    data = card.data
    assert data.license == "cc-by-4.0"  # BreastMNIST: CC BY 4.0 in medmnist.INFO
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-classification"
    assert {"image-classification", "medical-imaging", "medmnist", "breastmnist"} <= set(data.tags)
    assert data.datasets == [cards.DATASET_ID]
    # Trained from a config (--model_type): there is no base model to name.
    assert data.base_model is None and "base_model" not in card.content.split("---")[1]
    by_metric = {result.metric_type: result for result in data.eval_results}
    assert by_metric["roc_auc"].metric_value == round(results["test_auc"], 4)
    assert by_metric["accuracy"].metric_value == round(results["test_acc"], 4)
    assert {result.dataset_split for result in data.eval_results} == {"test"}
    assert all(result.task_type == "image-classification" for result in data.eval_results)


def test_card_figures_match_the_run_files(run_dir):
    text = (run_dir / cards.CARD_FILE).read_text()
    results = outputs.read_results(run_dir)
    state = json.loads((run_dir / "trainer_state.json").read_text())
    test_row = next(line for line in text.splitlines() if line.startswith("| test |"))
    expected = [results["test_auc"], results["test_acc"], results["test_balanced_accuracy"],
                *(results[f"test_recall_{metric_key(name)}"] for name in results["label_names"])]
    assert test_row == "| test | " + " | ".join(f"{value:.3f}" for value in expected) + " |"
    validation_row = next(line for line in text.splitlines() if line.startswith("| validation |"))
    assert validation_row.startswith(f"| validation | {results['eval_auc']:.3f} | {results['eval_acc']:.3f} |")
    low, high = results["test_auc_ci95"]
    assert f"{low:.3f} to {high:.3f}" in text
    assert f"{results['trainable_parameters']:,} trained" in text
    assert results["hardware"] in text
    assert f"| `learning_rate` | {results['hyperparameters']['learning_rate']:g} |" in text
    assert f"| `seed` | {results['hyperparameters']['seed']} |" in text
    assert "weighted loss" in text or "class-weighted loss" in text
    # One validation row per epoch, from trainer_state.json.
    evaluations = [entry for entry in state["log_history"] if "eval_auc" in entry]
    for entry in evaluations:
        assert f"| {entry['step']} | {entry['eval_loss']:.3f} | {entry['eval_auc']:.3f} |" in text
    # MedMNIST v2 reference rows for BreastMNIST, with their source.
    assert "| ResNet-18 (28) | 0.901 | 0.863 |" in text and "Scientific Data" in text
    # Figures are the run's own image files; citations and the pipeline snippet are there.
    assert "![ROC curve on the test split](roc_curve.png)" in text
    assert "![Confusion matrix on the test split](confusion_matrix.png)" in text
    assert 'pipeline("image-classification"' in text
    for key in ("bao2022beit", "yang2023medmnistv2", "aldhabyani2020breast"):
        assert key in text
    assert "not a medical device" in text
    # No local paths of the training machine leak into the card.
    assert str(run_dir) not in text


def test_card_names_the_repository_when_given(run_dir, tmp_path):
    card = cards.render_card(run_dir, repo_id="someone/tiny-beit-breastmnist")
    assert card.data.model_name == "someone/tiny-beit-breastmnist"
    assert 'model="someone/tiny-beit-breastmnist"' in card.content


def test_dermamnist_card_is_cc_by_nc(tmp_path):
    run = _fake_run(tmp_path / "derma", "dermamnist")
    card = cards.render_card(run)
    assert card.data.license == "cc-by-nc-4.0"
    assert card.data.base_model == "microsoft/beit-base-patch16-224-pt22k-ft22k"
    assert "tschandl2018ham10000" in card.content
    assert "No MedMNIST v2 reference rows are bundled" in card.content
    reloaded = ModelCard(str(card))
    assert {r.metric_type: r.metric_value for r in reloaded.data.eval_results} == {"roc_auc": 0.8123, "accuracy": 0.7012}


def test_other_datasets_get_generic_citation_and_pneumonia_its_source(tmp_path):
    pneumonia = cards.render_card(_fake_run(tmp_path / "pneumonia", "pneumoniamnist"))
    assert "kermany2018identifying" in pneumonia.content
    assert "| ResNet-50 (224) | 0.962 | 0.884 |" in pneumonia.content
    blood = cards.render_card(_fake_run(tmp_path / "blood", "bloodmnist"))
    assert "yang2023medmnistv2" in blood.content and blood.data.license == "cc-by-4.0"


def test_hub_license_mapping():
    assert cards.hub_license("CC BY 4.0") == "cc-by-4.0"
    assert cards.hub_license("CC BY-NC 4.0") == "cc-by-nc-4.0"
    for flag, info in INFO.items():
        assert cards.hub_license(info["license"]) is not None, flag


def test_collapsed_model_is_flagged(tmp_path):
    # BreastMNIST's test split: 42 malignant, 114 normal/benign; the model predicts the majority every time.
    run = _fake_run(tmp_path / "collapsed", "breastmnist", confusion=[[0, 42], [0, 114]], test_recall_malignant=0.0)
    card = cards.render_card(run)
    assert re.search(r"never predicts 'malignant' \(recall 0; 42 test images are 'malignant'\)", card.content)
    assert "never predicts 'normal, benign'" not in card.content


def test_a_class_missing_from_the_test_split_is_reported_as_missing_not_as_never_predicted(tmp_path):
    # No malignant image in the test split, yet the model predicts malignant for 3 images: sklearn's
    # recall is 0 for it, which the card used to read as "never predicts 'malignant'".
    run = _fake_run(tmp_path / "missing", "breastmnist", confusion=[[0, 0], [3, 27]],
                    test_recall_malignant=0.0, test_recall_normal_benign=0.9)
    text = cards.render_card(run).content
    assert "never predicts" not in text
    assert "The test split holds no image of 'malignant'" in text
    assert "predicts 'malignant' for 3 test images, all of them wrongly" in text
    # Its recall is undefined, not 0; the class that is there keeps its figure.
    assert re.search(r"^\| test \| 0\.812 \| 0\.701 \| n/a \| n/a \| 0\.900 \|$", text, re.M), text
    assert "The test split has 30 images" in text


def test_never_predicted_classes_come_from_the_confusion_matrix_columns_for_every_task(tmp_path):
    # DermaMNIST (7 classes): class 2 is in the test split but never predicted; class 4 is absent
    # from the test split but predicted once; class 0 is predicted although its recall is 0.
    flag = "dermamnist"
    names = [INFO[flag]["label"][str(i)] for i in range(7)]
    matrix = [[0] * 7 for _ in range(7)]
    matrix[0][1] = 5          # class 0: 5 images, all predicted as 1
    matrix[1][0] = 2          # class 0 predicted twice (wrongly)
    matrix[1][1] = 10
    matrix[2][1] = 4          # class 2: 4 images, never predicted
    matrix[3][3] = 6
    matrix[5][4] = 1          # class 4: no true image, predicted once
    matrix[5][5] = 8
    matrix[6][6] = 3
    recalls = {f"test_recall_{metric_key(name)}": 0.0 for name in names}
    text = cards.render_card(_fake_run(tmp_path / flag, flag, confusion=matrix, **recalls)).content
    assert f"never predicts {names[2]!r} (recall 0; 4 test images are {names[2]!r})" in text
    for name in (names[0], names[1], names[3], names[4], names[5], names[6]):
        assert f"never predicts {name!r}" not in text
    assert f"The test split holds no image of {names[4]!r}" in text
    assert f"predicts {names[4]!r} for 1 test images" in text
    # Multi-label (ChestMNIST): one 2x2 [[tn, fp], [fn, tp]] per finding, over the same images.
    flag = "chestmnist"
    findings = [INFO[flag]["label"][str(i)] for i in range(len(INFO[flag]["label"]))]
    per_finding = [[[90, 0], [10, 0]]] + [[[95, 3], [2, 0]]] + [[[100, 0], [0, 0]]] * (len(findings) - 2)
    text = cards.render_card(_fake_run(tmp_path / flag, flag, confusion=per_finding)).content
    assert f"never predicts {findings[0]!r} (recall 0; 10 test images are {findings[0]!r})" in text
    assert f"never predicts {findings[1]!r}" not in text  # predicted 3 times, never rightly
    assert f"The test split holds no image of {findings[2]!r}" in text
    assert "The test split has 100 images" in text


def test_card_says_official_splits_only_when_the_data_md5_is_medmnists(tmp_path):
    official = cards.render_card(_fake_run(tmp_path / "official", "breastmnist"))
    assert "trained with hf_medbeit on the official MedMNIST v2 splits" in official.content
    assert "Splits (official MedMNIST splits): train 546, val 78, test 156" in official.content
    assert "not comparable" not in official.content
    assert official.data.eval_results[0].dataset_name == "MedMNIST v2 BreastMNIST (28x28)"

    own_md5 = "0123456789abcdef0123456789abcdef"
    # The 28x28 file's MD5 recorded for a 224 run is not the official 224 file either.
    for name, size, md5 in (("own", 28, own_md5), ("wrong-size", 224, get_spec("breastmnist", 28).md5)):
        card = cards.render_card(_fake_run(tmp_path / name, "breastmnist", size=size, data_md5=md5))
        text = card.content
        assert "official MedMNIST v2 splits" not in text
        assert f"the user's own file in MedMNIST's BreastMNIST format (MD5 `{md5}`)" in text
        assert get_spec("breastmnist", size).md5 in text  # the official file's MD5, to compare with
        assert "results are not comparable to the MedMNIST v2 reference rows as-is" in text
        assert "train 546, val 78, test 156" not in text  # INFO's split sizes are the official file's
        assert "MedMNIST v2" not in card.data.eval_results[0].dataset_name and md5 in card.data.eval_results[0].dataset_name

    unknown = cards.render_card(_fake_run(tmp_path / "unrecorded", "breastmnist", data_md5=None)).content
    assert "official MedMNIST v2 splits" not in unknown
    assert "whose MD5 the run did not record" in unknown and "not comparable" in unknown


def test_card_says_plainly_when_no_checkpoint_could_be_selected_by_validation_auc(tmp_path):
    # One class in the validation split: eval_auc is NaN at every evaluation, Trainer never sets a
    # best checkpoint, and the model kept is the last one.
    history = [{"epoch": 1.0, "step": 6, "eval_loss": 0.61, "eval_auc": math.nan, "eval_acc": 1.0},
               {"epoch": 2.0, "step": 12, "eval_loss": 0.55, "eval_auc": math.nan, "eval_acc": 1.0}]
    state = {"global_step": 12, "best_global_step": None, "best_metric": None, "log_history": history}
    run = _fake_run(tmp_path / "no-auc", "breastmnist", state=state, eval_auc=None, best_model_checkpoint=None)
    text = cards.render_card(run).content
    assert "step None" not in text and "best validation AUC was kept" not in text
    assert ("no checkpoint could be selected by validation AUC: it was never defined (for example, the validation "
            "split holds only one class), so the model in this repository is the last one, from step 12") in text
    assert "| 2 | 12 | 0.550 | n/a | 1.000 |" in text  # NaN shown as n/a, not "nan"

    state = {**state, "best_global_step": 6, "log_history": [{**history[0], "eval_auc": 0.7}, {**history[1], "eval_auc": 0.6}]}
    selected = cards.render_card(_fake_run(tmp_path / "selected", "breastmnist", state=state)).content
    assert "the checkpoint with the best validation AUC is the model in this repository, from step 6" in selected
    assert "no checkpoint could be selected" not in selected


def test_card_cites_the_architecture_that_was_trained_and_no_other(tmp_path):
    resnet = {"model_type": "resnet", "architectures": ["ResNetForImageClassification"]}
    text = cards.render_card(_fake_run(tmp_path / "resnet", "breastmnist", config=resnet, model_type="resnet")).content
    assert "he2016deep" in text and "bao2022beit" not in text
    assert "yang2023medmnistv2" in text and "aldhabyani2020breast" in text
    # The architecture comes from all_results.json's model_type; one without a citation in
    # model_cards/citations.json gets none rather than a wrong one.
    convnext = {"model_type": "convnext", "architectures": ["ConvNextForImageClassification"]}
    text = cards.render_card(_fake_run(tmp_path / "convnext", "breastmnist", config=convnext, model_type="convnext")).content
    assert "bao2022beit" not in text and "he2016deep" not in text and "yang2023medmnistv2" in text
    beit = cards.render_card(_fake_run(tmp_path / "beit", "breastmnist")).content
    assert "bao2022beit" in beit and "he2016deep" not in beit


def test_unfinished_run_is_a_user_error(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / "partial")
    (run / outputs.RESULTS_FILE).unlink()
    with pytest.raises(UserError, match="not a finished run"):
        cards.write_card(run)
    shutil.rmtree(run)


def test_write_card_is_repeatable(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / run_dir.name)  # same folder name, so the same card
    first = (run / cards.CARD_FILE).read_text()
    before = sorted(p.name for p in run.iterdir())
    cards.write_card(run)
    assert (run / cards.CARD_FILE).read_text() == first
    assert sorted(p.name for p in run.iterdir()) == before  # no temporary file left behind


def test_write_card_puts_the_card_in_place_by_one_rename(tmp_path, monkeypatch):
    run = _fake_run(tmp_path / "run", "breastmnist")
    card_path = run / cards.CARD_FILE
    card_path.write_text("old card")
    renames = []
    real_replace = os.replace

    def replace(source, destination):
        # Until the rename, readers must still see the old card, whole.
        assert card_path.read_text() == "old card"
        renames.append((pathlib.Path(source), pathlib.Path(destination)))
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace)
    cards.write_card(run)
    assert [destination for _, destination in renames] == [card_path]
    assert renames[0][0].parent == run and renames[0][0].name.startswith(".")  # a temporary beside it
    assert card_path.read_text() == str(cards.render_card(run))


def test_a_card_write_that_fails_midway_leaves_the_old_card_and_no_debris(tmp_path, monkeypatch):
    run = _fake_run(tmp_path / "run", "breastmnist")
    card_path = run / cards.CARD_FILE
    card_path.write_text("old card")
    real_write_text = pathlib.Path.write_text

    def disk_full(self, data, *args, **kwargs):
        real_write_text(self, data[: len(data) // 2], *args, **kwargs)  # half the card reaches the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        cards.write_card(run)
    assert card_path.read_text() == "old card"
    assert sorted(p.name for p in run.iterdir()) == sorted(["README.md", outputs.RESULTS_FILE, "config.json"])


def test_committed_example_card_parses_with_model_index():
    example = cards.MODEL_CARDS_DIR / "examples" / "breastmnist-tiny-beit"
    assert sorted(p.name for p in example.iterdir()) == ["README.md", "confusion_matrix.png", "roc_curve.png"]
    card = ModelCard.load(example / "README.md")
    assert card.data.license == "cc-by-4.0" and card.data.base_model is None
    metrics = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert set(metrics) == {"roc_auc", "accuracy"} and all(0 <= value <= 1 for value in metrics.values())
    assert f"Test AUC {metrics['roc_auc']:.3f}" in card.content
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card.content):
        assert (example / image).exists()
    assert "random initialisation" in card.content  # says honestly what it is


@pytest.mark.e2e
def test_an_installed_wheel_carries_the_card_template(tmp_path):
    # The template lives at the repository's top level; a wheel must still carry it, or a
    # non-editable install could train but not write its card.
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "wheel"), str(root)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("hf_medbeit-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"), str(wheel)],
                   check=True, capture_output=True)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); from hf_medbeit import cards; "
             "print(cards.TEMPLATE.resolve(strict=True)); print(len(cards.reference_rows('breastmnist')[0])); "
             "print(len(cards.citations('beit', 'breastmnist')))")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "site")], check=True, capture_output=True, text=True).stdout
    template_path, reference_rows, citations = out.splitlines()
    assert template_path.startswith(str(tmp_path / "site")), out
    assert int(reference_rows) > 0
    assert int(citations) == 3  # BEiT, MedMNIST v2, BreastMNIST's source: model_cards/citations.json travels too


@pytest.mark.e2e
def test_a_run_on_own_data_with_one_class_in_validation_and_test_gets_an_honest_card(tmp_path):
    # What a user meets: their own BreastMNIST-format file (--skip_md5_check) whose validation and
    # test splits hold only 'normal, benign' images. Validation AUC is then never defined and the
    # test split has no 'malignant' image.
    import numpy as np
    from conftest import TINY_BEIT, run_cli

    rng = np.random.default_rng(0)
    arrays = {}
    for split, labels in (("train", [0, 1] * 8), ("val", [1] * 6), ("test", [1] * 8)):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.asarray(labels, dtype=np.uint8).reshape(-1, 1)
    root = tmp_path / "data"
    root.mkdir()
    np.savez_compressed(root / "breastmnist.npz", **arrays)
    run = tmp_path / "run"
    result = run_cli(
        "train", "--dataset_name", "breastmnist", "--data_dir", str(root), "--skip_md5_check", "true",
        "--dataset_cache_dir", str(tmp_path / "cache"), "--model_type", "beit", "--config_overrides", TINY_BEIT,
        "--output_dir", str(run), "--num_train_epochs", "2", "--per_device_train_batch_size", "8",
        "--report_to", "none", env={"HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = (run / cards.CARD_FILE).read_text()
    md5 = outputs.read_results(run)["data_md5"]
    assert md5 != get_spec("breastmnist", 28).md5
    assert "official MedMNIST v2 splits" not in text
    assert f"the user's own file in MedMNIST's BreastMNIST format (MD5 `{md5}`)" in text
    assert "not comparable to the MedMNIST v2 reference rows as-is" in text
    assert "never predicts" not in text and "The test split holds no image of 'malignant'" in text
    assert "step None" not in text
    assert "no checkpoint could be selected by validation AUC" in text and "the last one, from step 4" in text


def test_card_shows_the_explained_test_images_and_their_sanity_numbers_when_the_run_has_them(run_dir, tmp_path):
    from hf_medbeit import explain

    run = copy_run(run_dir, tmp_path / "run")
    shutil.rmtree(run / explain.EXPLANATIONS_DIR, ignore_errors=True)
    assert "Where the model looks" not in str(cards.render_card(run))
    explain.write_run_explanations(run, per_class=1, device="cpu")
    card = str(cards.render_card(run))
    summary = json.loads((run / explain.EXPLANATIONS_DIR / explain.SUMMARY_FILE).read_text())
    right = sum(image["correct"] is True for image in summary["images"])
    wrong = sum(image["correct"] is False for image in summary["images"])
    assert "![Explained test images](explanations/grid.png)" in card
    assert f"{right} classified rightly,\n{wrong} wrongly" in card
    for method, numbers in summary["sanity_checks"].items():
        row = (f"| {explain.METHODS[method]} | {numbers['randomisation_rank_correlation']:.2f} | "
               f"{numbers['deletion_auc']:.3f} | {numbers['deletion_auc_random']:.3f} |")
        assert row in card
    assert ModelCard(card).data.to_dict()["model-index"]  # the card still parses
