"""Model cards: rendered from the run's own files, parsed back by huggingface_hub."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from huggingface_hub import ModelCard
from medmnist import INFO

from hf_medbeit import cards, outputs
from hf_medbeit.errors import UserError
from hf_medbeit.metrics import metric_key
from tiny_run import copy_run, trained_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory)


def _fake_run(folder, flag: str, **overrides):
    """A run folder holding only what the card reads, with made-up metrics for ``flag``."""
    info = INFO[flag]
    names = [info["label"][str(i)] for i in range(len(info["label"]))]
    results = {
        "dataset": flag, "size": 28, "task": info["task"], "label_names": names,
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
    (folder / "config.json").write_text(json.dumps({"model_type": "beit", "architectures": ["BeitForImageClassification"], "image_size": 224}))
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
    card = cards.render_card(_fake_run(tmp_path / "collapsed", "breastmnist", test_recall_malignant=0.0))
    assert re.search(r"never predicts 'malignant' \(recall 0\)", card.content)


def test_unfinished_run_is_a_user_error(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / "partial")
    (run / outputs.RESULTS_FILE).unlink()
    with pytest.raises(UserError, match="not a finished run"):
        cards.write_card(run)
    shutil.rmtree(run)


def test_write_card_is_atomic_and_repeatable(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / run_dir.name)  # same folder name, so the same card
    first = (run / cards.CARD_FILE).read_text()
    cards.write_card(run)
    assert (run / cards.CARD_FILE).read_text() == first
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


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
             "print(cards.TEMPLATE.resolve(strict=True)); print(len(cards.reference_rows('breastmnist')[0]))")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "site")], check=True, capture_output=True, text=True).stdout
    template_path, reference_rows = out.splitlines()
    assert template_path.startswith(str(tmp_path / "site")), out
    assert int(reference_rows) > 0
