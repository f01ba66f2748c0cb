"""AUC and ACC as MedMNIST defines them, plus the numbers that expose class collapse.

MedMNIST's evaluator (``medmnist.evaluator.getAUC`` / ``getACC``):
* binary: AUC of the positive-class score; ACC at threshold 0.5 on that score;
* multi-class and ordinal: mean of one-vs-rest AUCs; ACC by argmax;
* multi-label: mean of per-label AUCs; ACC = mean per-label accuracy at 0.5.

Scores are softmax probabilities (sigmoid for multi-label). Per-class recall, balanced accuracy
and the confusion matrix make a model that always predicts the majority class obvious: its
accuracy may look fine (0.731 on BreastMNIST) while one recall is 0.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
from scipy.special import expit, softmax
from scipy.stats import bootstrap
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, multilabel_confusion_matrix, recall_score, roc_auc_score

from .data import MULTI_LABEL_TASK

# The AUC and ACC below as a stand-alone Hugging Face `evaluate` module, for users outside this
# package: evaluate.load(EVALUATE_METRIC_PATH, "binary-class"). A str, as evaluate.load expects.
EVALUATE_METRIC_PATH = str(Path(__file__).with_name("medmnist_metric"))


def scores_from_logits(logits: np.ndarray, task: str) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    return expit(logits) if task == MULTI_LABEL_TASK else softmax(logits, axis=-1)


def predicted_labels(scores: np.ndarray, task: str, threshold: float = 0.5) -> np.ndarray:
    if task == MULTI_LABEL_TASK:
        return (scores > threshold).astype(int)
    if task == "binary-class":
        return (scores[:, -1] > threshold).astype(int)
    return scores.argmax(axis=-1)


def medmnist_auc(y_true: np.ndarray, scores: np.ndarray, task: str) -> float:
    """MedMNIST's AUC; NaN (with a warning) where a split lacks a class and AUC is undefined."""
    y_true = np.asarray(y_true)
    try:
        if task == MULTI_LABEL_TASK:
            return float(roc_auc_score(y_true, scores, average="macro"))
        if task == "binary-class":
            return float(roc_auc_score(y_true, scores[:, -1]))
        one_hot = np.eye(scores.shape[1], dtype=int)[y_true]
        # Column-wise one-vs-rest, averaged: exactly MedMNIST's loop over classes.
        return float(roc_auc_score(one_hot, scores, average="macro"))
    except ValueError as error:
        warnings.warn(f"AUC is undefined here ({error}); reporting NaN", stacklevel=2)
        return float("nan")


def medmnist_acc(y_true: np.ndarray, scores: np.ndarray, task: str, threshold: float = 0.5) -> float:
    predicted = predicted_labels(scores, task, threshold)
    # For multi-label this is the mean over labels of per-label accuracy, as MedMNIST computes it.
    return float((predicted == np.asarray(y_true)).mean())


def metric_key(label_name: str) -> str:
    """'normal, benign' -> 'normal_benign': safe as a metric name in logs and JSON."""
    return re.sub(r"[^0-9a-zA-Z]+", "_", label_name).strip("_").lower()


def classification_metrics(y_true: np.ndarray, scores: np.ndarray, task: str, label_names) -> dict[str, float]:
    """AUC, ACC, balanced accuracy and per-class recall, as a flat dict of floats."""
    predicted = predicted_labels(scores, task)
    metrics = {"auc": medmnist_auc(y_true, scores, task), "acc": medmnist_acc(y_true, scores, task)}
    labels = list(range(len(label_names)))
    if task == MULTI_LABEL_TASK:
        recalls = recall_score(y_true, predicted, average=None, zero_division=0)
        metrics["balanced_accuracy"] = float(np.mean([
            balanced_accuracy_score(y_true[:, i], predicted[:, i]) for i in labels
        ]))
    else:
        recalls = recall_score(y_true, predicted, labels=labels, average=None, zero_division=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a split without some class: sklearn warns, we report what it gives
            metrics["balanced_accuracy"] = float(balanced_accuracy_score(y_true, predicted))
    for name, recall in zip(label_names, recalls):
        metrics[f"recall_{metric_key(name)}"] = float(recall)
    return metrics


def confusion(y_true: np.ndarray, scores: np.ndarray, task: str, num_labels: int) -> np.ndarray:
    """(K, K) confusion matrix (rows true, columns predicted); (K, 2, 2) per finding for multi-label."""
    predicted = predicted_labels(scores, task)
    if task == MULTI_LABEL_TASK:
        return multilabel_confusion_matrix(y_true, predicted)
    return confusion_matrix(y_true, predicted, labels=list(range(num_labels)))


def auc_confidence_interval(y_true: np.ndarray, scores: np.ndarray, task: str, n_resamples: int = 1000, seed: int = 0):
    """95% percentile-bootstrap interval of the AUC over test images (resampled with replacement)."""
    indices = np.arange(len(y_true))

    def statistic(sample):
        return medmnist_auc(y_true[sample], scores[sample], task)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = bootstrap(
            (indices,), statistic, vectorized=False, n_resamples=n_resamples, method="percentile",
            confidence_level=0.95, rng=np.random.default_rng(seed),
        )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def make_compute_metrics(task: str, label_names):
    """``compute_metrics`` for ``Trainer``: logits and labels -> MedMNIST metrics."""

    def compute_metrics(eval_prediction) -> dict[str, float]:
        logits = eval_prediction.predictions
        if isinstance(logits, tuple):
            logits = logits[0]
        scores = scores_from_logits(logits, task)
        y_true = np.asarray(eval_prediction.label_ids)
        y_true = y_true.astype(int)
        return classification_metrics(y_true, scores, task, label_names)

    return compute_metrics
