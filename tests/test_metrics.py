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


def percentile_bootstrap(y, scores, task, n_resamples, seed, level=0.95):
    """The 95% percentile bootstrap written out: resample test images (label and score together)
    with replacement, recompute the AUC, take the 2.5th and 97.5th percentiles. The draws are
    ``Generator.integers(0, n, (n_resamples, n))``, as scipy.stats.bootstrap makes them."""
    rng = np.random.default_rng(seed)
    resamples = rng.integers(0, len(y), (n_resamples, len(y)))
    aucs = np.array([medmnist_auc(y[i], scores[i], task) for i in resamples])
    tail = (1 - level) / 2 * 100
    return np.percentile(aucs, tail), np.percentile(aucs, 100 - tail)


@pytest.mark.parametrize("task,n_resamples", [("binary-class", 200), ("multi-class", 30), ("multi-label, binary-class", 30)])
def test_bootstrap_interval_is_the_percentile_bootstrap_of_the_auc(task, n_resamples):
    y, logits = _predictions(task, n=200)
    scores = scores_from_logits(logits, task)
    low, high = auc_confidence_interval(y, scores, task, n_resamples=n_resamples, seed=3)
    assert (low, high) == pytest.approx(percentile_bootstrap(y, scores, task, n_resamples, seed=3), abs=1e-12)
    assert low < medmnist_auc(y, scores, task) < high


def test_bootstrap_interval_has_a_fixed_default_seed():
    """Two runs with the same predictions report the same interval (seed 0 unless told)."""
    y, logits = _predictions("binary-class", n=200)
    scores = scores_from_logits(logits, "binary-class")
    interval = auc_confidence_interval(y, scores, "binary-class", n_resamples=100)
    assert interval == pytest.approx(percentile_bootstrap(y, scores, "binary-class", 100, seed=0), abs=1e-12)


def test_bootstrap_interval_of_a_perfect_ranking_is_a_point():
    y = np.array([0] * 20 + [1] * 30)
    scores = np.stack([1 - np.linspace(0, 1, 50), np.linspace(0, 1, 50)], axis=1)
    assert auc_confidence_interval(y, scores, "binary-class", n_resamples=100) == (1.0, 1.0)
