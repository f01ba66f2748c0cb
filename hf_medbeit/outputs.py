"""The files of a run folder besides the model: results, predictions and plots.

Every file is written to a temporary name in the same folder and renamed into place, so a crash
never leaves a half-written file that a later step (model card, push, benchmark table) would read
as valid.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from .data import MULTI_LABEL_TASK
from .errors import UserError

RESULTS_FILE = "all_results.json"
RUN_CONFIG_FILE = "run_config.json"  # every argument, flat: `hf-medbeit train run_config.json` repeats the run
PREDICTIONS_FILE = "test_predictions.csv"
CONFUSION_FILE = "confusion_matrix.json"
CONFUSION_PLOT = "confusion_matrix.png"
ROC_PLOT = "roc_curve.png"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    # mkstemp makes the file private (0600); give it the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _json_safe(value):
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return None if math.isnan(value) else value  # JSON has no NaN
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    return value


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(_json_safe(data), indent=2, sort_keys=True) + "\n")


# What every consumer of a run (card, results table) relies on; finetune.py always writes them.
REQUIRED_RESULTS = ("dataset", "size", "task", "label_names", "test_auc", "test_acc")


class UnreadableResults(UserError):
    """A run folder without usable results: unfinished, damaged, or not a run at all."""

    def __init__(self, run_dir, reason: str):
        super().__init__(f"{run_dir} is not a finished run: {reason}; train to completion first")
        self.reason = reason


# A pre-training run (hf-medbeit pretrain) has no labels, so no test metrics; what its card needs.
REQUIRED_PRETRAINING_RESULTS = ("kind", "mim_target", "sources", "image_size", "patch_size", "images_per_epoch")


def read_results(run_dir: str | os.PathLike, kind: str = "train") -> dict:
    """``all_results.json`` of a run folder of ``kind`` (train or pretrain), checked: present,
    valid JSON, with the test metrics (fine-tuning) or the pre-training record (pretrain)."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise UnreadableResults(run_dir, f"no {RESULTS_FILE} (unfinished or not a run folder)")
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UnreadableResults(run_dir, f"{RESULTS_FILE} is corrupt ({type(error).__name__}: {error})") from error
    if not isinstance(results, dict):
        raise UnreadableResults(run_dir, f"{RESULTS_FILE} is not a JSON object")
    found = results.get("kind", "train")
    if found != kind:
        if found == "pretrain":
            raise UserError(f"{run_dir} is a pre-training run (an encoder without a classifier); fine-tune it first: "
                            f"hf-medbeit train --model_name_or_path {run_dir} --dataset_name ...")
        raise UserError(f"{run_dir} is a fine-tuning run, not a pre-training run; pass an hf-medbeit pretrain folder")
    required = REQUIRED_PRETRAINING_RESULTS if kind == "pretrain" else REQUIRED_RESULTS
    missing = [key for key in required if key not in results]
    if missing:
        raise UnreadableResults(run_dir, f"{RESULTS_FILE} lacks {', '.join(missing)}")
    return results


def write_predictions(path: str | os.PathLike, y_true: np.ndarray, scores: np.ndarray, label_names, task: str) -> None:
    """One row per test image, in the order of the test split: index, true label(s), score per class."""
    score_columns = [f"score_{name}" for name in label_names]
    if task == MULTI_LABEL_TASK:
        label_columns = [f"label_{name}" for name in label_names]
    else:
        label_columns = ["label"]
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", *label_columns, *score_columns])
        for index, (truth, row) in enumerate(zip(y_true, scores)):
            truth = np.atleast_1d(truth).tolist()
            writer.writerow([index, *truth, *(f"{value:.8g}" for value in row)])


def _save_figure(figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)


def plot_confusion_matrix(path: str | os.PathLike, matrix: np.ndarray, label_names, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from sklearn.metrics import ConfusionMatrixDisplay

    if matrix.ndim == 3:  # multi-label: one 2x2 per finding, shown as a table of recalls instead
        import matplotlib.pyplot as plt

        recall = matrix[:, 1, 1] / np.maximum(matrix[:, 1].sum(axis=1), 1)
        figure, axis = plt.subplots(figsize=(6, 0.35 * len(label_names) + 1))
        axis.barh(list(label_names), recall)
        axis.set_xlim(0, 1)
        axis.set_xlabel("recall at threshold 0.5")
        axis.set_title(title)
        _save_figure(figure, Path(path))
        return
    display = ConfusionMatrixDisplay(matrix, display_labels=list(label_names))
    display.plot(cmap="Blues", colorbar=False, values_format="d")
    display.ax_.set_title(title)
    _save_figure(display.figure_, Path(path))


def plot_roc_curves(path: str | os.PathLike, y_true: np.ndarray, scores: np.ndarray, label_names, task: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import RocCurveDisplay

    figure, axis = plt.subplots(figsize=(5, 5))
    if task == "binary-class":
        RocCurveDisplay.from_predictions(y_true, scores[:, -1], name=f"{label_names[-1]} vs {label_names[0]}", ax=axis)
    else:
        truth = y_true if task == MULTI_LABEL_TASK else np.eye(len(label_names), dtype=int)[y_true]
        for index, name in enumerate(label_names):
            if 0 < truth[:, index].sum() < len(truth):
                RocCurveDisplay.from_predictions(truth[:, index], scores[:, index], name=name, ax=axis)
    axis.plot([0, 1], [0, 1], linestyle=":", color="grey")
    axis.set_title(title)
    _save_figure(figure, Path(path))


def plot_loss_curve(path: str | os.PathLike, log_history: list[dict], title: str) -> None:
    """The training loss Trainer logged, against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    figure, axis = plt.subplots(figsize=(5, 3.5))
    if points:
        steps, losses = zip(*points)
        axis.plot(steps, losses, color="tab:blue")
    axis.set_xlabel("step")
    axis.set_ylabel("training loss")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    _save_figure(figure, Path(path))
