"""The real commands on the real BreastMNIST file: one process, then two under accelerate."""

from __future__ import annotations

import csv
import json
import subprocess

import numpy as np
import pytest
import torch
import yaml
from medmnist.evaluator import getACC, getAUC
from safetensors.torch import load_file

from conftest import DATA, REPO, TINY_BEIT, assert_one_line_error, run_cli, two_cpu_processes

pytestmark = pytest.mark.e2e


def read_predictions(path):
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels = np.array([int(row["label"]) for row in rows])
    scores = np.array([[float(row[key]) for key in row if key.startswith("score_")] for row in rows])
    return [int(row["index"]) for row in rows], labels, scores


def test_quickstart_config_trains_well_above_chance(tmp_path):
    """The README's main job: official BreastMNIST, a small BEiT from a config, on CPU."""
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    config.update(output_dir=str(tmp_path / "run"), dataset_cache_dir=str(tmp_path / "cache"), data_dir=str(DATA))
    config_path = tmp_path / "quickstart.yaml"
    config_path.write_text(yaml.safe_dump(config))
    result = run_cli("train", str(config_path))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"

    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "all_results.json",
                 "test_predictions.csv", "confusion_matrix.json", "confusion_matrix.png", "roc_curve.png"):
        assert (run / name).is_file(), name
    assert not list(run.glob("*.bin")) or [p.name for p in run.glob("*.bin")] == ["training_args.bin"]
    model_config = json.loads((run / "config.json").read_text())
    assert model_config["id2label"] == {"0": "malignant", "1": "normal, benign"}

    results = json.loads((run / "all_results.json").read_text())
    for key in ("eval_auc", "eval_acc", "test_auc", "test_acc", "test_recall_malignant", "test_recall_normal_benign"):
        assert key in results, key
    # Model selection by validation AUC: the checkpoint of the epoch with the best validation AUC
    # (the first, on a tie, as Trainer keeps it) is the one recorded, and the run folder's model
    # is that checkpoint's weights; re-evaluated, it gives that epoch's AUC.
    state = json.loads((run / "trainer_state.json").read_text())
    evaluations = [(entry["step"], entry["eval_auc"]) for entry in state["log_history"] if "eval_auc" in entry]
    best_step, best_auc = max(evaluations, key=lambda evaluation: evaluation[1])
    assert results["best_model_checkpoint"] == str(run / f"checkpoint-{best_step}")
    assert results["eval_auc"] == pytest.approx(best_auc, abs=1e-6)
    saved, best = load_file(run / "model.safetensors"), load_file(run / f"checkpoint-{best_step}" / "model.safetensors")
    assert saved.keys() == best.keys()
    assert all(torch.equal(saved[name], best[name]) for name in saved), "the saved model is not the best checkpoint"

    # The README's figures for this command (CPU runs with one seed are deterministic), and the two
    # recalls show it is not a collapsed one-class model.
    assert results["test_auc"] == pytest.approx(0.7216, abs=1e-4), results["test_auc"]
    assert results["test_acc"] == pytest.approx(0.6731, abs=1e-4), results["test_acc"]
    assert results["test_auc_ci95"] == pytest.approx([0.6207, 0.8201], abs=1e-4), results["test_auc_ci95"]
    assert min(results["test_recall_malignant"], results["test_recall_normal_benign"]) > 0.2

    # test_predictions.csv: every test image once, in order; its scores reproduce the metrics
    # through medmnist's own evaluator.
    indices, labels, scores = read_predictions(run / "test_predictions.csv")
    raw = np.load(DATA / "breastmnist.npz", allow_pickle=False)
    assert indices == list(range(156))
    np.testing.assert_array_equal(labels, raw["test_labels"][:, 0])
    assert getAUC(raw["test_labels"], scores, "binary-class") == pytest.approx(results["test_auc"], abs=1e-6)
    assert getACC(raw["test_labels"], scores, "binary-class") == pytest.approx(results["test_acc"], abs=1e-6)
    print(f"quickstart: test AUC {results['test_auc']:.4f}, ACC {results['test_acc']:.4f}, "
          f"wall {results['wall_time_seconds']} s")

    # The card shows a few explained test images (explain_per_class, on by default).
    explained = json.loads((run / "explanations" / "explanations.json").read_text())
    assert explained and (run / "explanations" / "grid.png").is_file()
    assert "explanations/grid.png" in (run / "README.md").read_text()

    # Running the same command again must not overwrite a finished run.
    again = run_cli("train", str(config_path))
    assert_one_line_error(again, "already holds a finished run")


def test_non_empty_output_dir_without_checkpoint_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run_cli("train", "--data_dir", str(DATA), "--dataset_cache_dir", str(tmp_path / "cache"),
                     "--output_dir", str(out), "--model_type", "beit", "--config_overrides", TINY_BEIT, "--max_steps", "1")
    assert_one_line_error(result, "is not an hf-medbeit run folder")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_two_cpu_processes_under_accelerate(tmp_path):
    """accelerate launch with 2 CPU processes: one all_results.json, every test image exactly once."""
    out = tmp_path / "run"
    command, env = two_cpu_processes(
        "--dataset_name", "breastmnist", "--data_dir", str(DATA), "--dataset_cache_dir", str(tmp_path / "cache"),
        "--model_type", "beit", "--config_overrides", TINY_BEIT, "--output_dir", str(out),
        "--max_steps", "4", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32",
        "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "2",
        "--report_to", "none", "--disable_tqdm", "true",
    )
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert sorted(p.name for p in tmp_path.rglob("all_results.json")) == ["all_results.json"]
    results = json.loads((out / "all_results.json").read_text())
    assert results["hyperparameters"]["world_size"] == 2
    indices, labels, scores = read_predictions(out / "test_predictions.csv")
    assert indices == list(range(156))
    raw = np.load(DATA / "breastmnist.npz", allow_pickle=False)
    np.testing.assert_array_equal(labels, raw["test_labels"][:, 0])  # gathered in order, no duplicates
    assert getAUC(raw["test_labels"], scores, "binary-class") == pytest.approx(results["test_auc"], abs=1e-6)
    # each of the 4 optimizer steps saw 2 x 8 images
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["train_batch_size"] == 8
