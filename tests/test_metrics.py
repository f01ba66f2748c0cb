"""Our metrics against medmnist's own evaluator formulas, on the same predictions."""

from __future__ import annotations

import numpy as np
import pytest
from medmnist.evaluator import getACC, getAUC
from transformers import EvalPrediction

from hf_medbeit.metrics import (
    auc_confidence_interval, classification_metrics, confusion, make_compute_metrics, medmnist_acc, medmnist_auc,
    scores_from_logits,
)

TASKS = {
    "binary-class": 2,
    "multi-class": 9,
    "ordinal-regression": 5,
    "multi-label, binary-class": 14,
}


def _predictions(task, n=300, seed=0):
    rng = np.random.default_rng(seed)
    k = TASKS[task]
    if task.startswith("multi-label"):
        y = rng.integers(0, 2, size=(n, k))
        logits = rng.normal(size=(n, k)) + 1.5 * y  # informative but imperfect
    else:
        y = rng.integers(0, k, size=n)
        logits = rng.normal(size=(n, k))
        logits[np.arange(n), y] += 1.0
    return y, logits


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_and_acc_equal_medmnist_evaluator(task, seed):
    y, logits = _predictions(task, seed=seed)
    scores = scores_from_logits(logits, task)
    # medmnist's evaluator takes labels as (N, 1) for single-label sets, as in its .npz files
    y_medmnist = y if y.ndim == 2 else y.reshape(-1, 1)
    assert medmnist_auc(y, scores, task) == pytest.approx(getAUC(y_medmnist, scores, task), abs=1e-12)
    assert medmnist_acc(y, scores, task) == pytest.approx(getACC(y_medmnist, scores, task), abs=1e-12)


def test_collapsed_model_is_visible():
    """Always 'normal, benign': ACC looks fine, but a recall is 0 and balanced accuracy is 0.5."""
    y = np.array([0] * 42 + [1] * 114)
    scores = np.tile([0.2, 0.8], (156, 1))
    metrics = classification_metrics(y, scores, "binary-class", ["malignant", "normal, benign"])
    assert metrics["acc"] == pytest.approx(114 / 156)
    assert metrics["recall_malignant"] == 0.0 and metrics["recall_normal_benign"] == 1.0
    assert metrics["balanced_accuracy"] == pytest.approx(0.5)
    assert confusion(y, scores, "binary-class", 2).tolist() == [[0, 42], [0, 114]]


def test_compute_metrics_from_trainer_logits():
    y, logits = _predictions("multi-class")
    compute = make_compute_metrics("multi-class", [f"c{i}" for i in range(9)])
    metrics = compute(EvalPrediction(predictions=logits, label_ids=y))
    scores = scores_from_logits(logits, "multi-class")
    assert metrics["auc"] == pytest.approx(getAUC(y, scores, "multi-class"))
    assert {f"recall_c{i}" for i in range(9)} <= set(metrics)


def test_auc_undefined_is_nan_not_a_crash():
    with pytest.warns(UserWarning, match="not defined|undefined"):
        value = medmnist_auc(np.zeros(5, dtype=int), np.tile([0.6, 0.4], (5, 1)), "binary-class")
    assert np.isnan(value)


def test_bootstrap_interval_brackets_the_auc():
    y, logits = _predictions("binary-class", n=200)
    scores = scores_from_logits(logits, "binary-class")
    low, high = auc_confidence_interval(y, scores, "binary-class", n_resamples=200)
    assert low < medmnist_auc(y, scores, "binary-class") < high
    assert (low, high) == auc_confidence_interval(y, scores, "binary-class", n_resamples=200)
