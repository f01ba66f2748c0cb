"""MedMNIST's AUC and ACC as a Hugging Face ``evaluate`` metric.

The definitions are those of ``medmnist.evaluator.getAUC`` / ``getACC`` (MedMNIST v2, MedMNIST+):
* ``binary-class``: AUC of the positive-class score; ACC at threshold 0.5 on that score;
* ``multi-class`` and ``ordinal-regression``: mean of the one-vs-rest AUCs; ACC by argmax;
* ``multi-label, binary-class``: mean of the per-label AUCs; ACC = mean per-label accuracy at 0.5.

This file stands alone (numpy, scikit-learn, evaluate, datasets): it is what a Hub user loads, with
``evaluate.load("<folder holding this file>", "binary-class")``. It is tested equal to
``hf_medbeit.metrics`` and to ``medmnist.evaluator`` in the hf_medbeit repository.
"""

import warnings

import datasets
import evaluate
import numpy as np
from sklearn.metrics import roc_auc_score

# MedMNIST's own task strings, as written in medmnist.INFO[flag]["task"].
BINARY = "binary-class"
MULTI_CLASS = "multi-class"
ORDINAL = "ordinal-regression"
MULTI_LABEL = "multi-label, binary-class"
TASKS = (BINARY, MULTI_CLASS, ORDINAL, MULTI_LABEL)

_CITATION = """\
@article{medmnistv2,
    title={MedMNIST v2-A large-scale lightweight benchmark for 2D and 3D biomedical image classification},
    author={Yang, Jiancheng and Shi, Rui and Wei, Donglai and Liu, Zequan and Zhao, Lin and Ke, Bilian and Pfister, Hanspeter and Ni, Bingbing},
    journal={Scientific Data},
    volume={10},
    number={1},
    pages={41},
    year={2023},
    publisher={Nature Publishing Group UK London}
}
"""

_DESCRIPTION = """\
AUC and ACC exactly as MedMNIST's evaluator (medmnist.evaluator.getAUC / getACC) defines them, for
the four MedMNIST task kinds: binary-class (AUC of the positive-class score, ACC at 0.5),
multi-class and ordinal-regression (mean one-vs-rest AUC, ACC by argmax) and
multi-label, binary-class (mean per-label AUC, mean per-label ACC at 0.5). Choose the task with the
configuration name or `task=`, using MedMNIST's own strings (medmnist.INFO[flag]["task"]).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): one row per example, one probability per class:
        softmax probabilities for binary-class, multi-class and ordinal-regression (two columns for
        binary-class, the last one the positive class), sigmoid probabilities per label for
        multi-label, binary-class. Values must lie in [0, 1]: logits are refused, because the
        one-vs-rest AUC of a logit column is not that of its softmax probability.
    references (`list` of `int`, or `list` of `list` of `int`): the class index per example
        (a plain int, or MedMNIST's one-element row such as `[3]`), or for
        multi-label, binary-class a 0/1 row with one entry per label.
    threshold (`float`, defaults to 0.5): the decision threshold of ACC for binary-class and
        multi-label, binary-class (as in getACC); unused by argmax tasks.
Returns:
    auc (`float`): MedMNIST's AUC; NaN, with a warning, where it is undefined (a class, or for
        multi-label a label, with no positive or no negative example).
    acc (`float`): MedMNIST's ACC.
Examples:
    >>> import evaluate
    >>> metric = evaluate.load("path/to/medmnist_metric", "binary-class")
    >>> metric.compute(predictions=[[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], references=[0, 1, 1])
    {'auc': 1.0, 'acc': 0.6666666666666666}
"""


def _resolve_task(config_name, task):
    """The task from the configuration name and/or ``task=``; they must agree when both are given."""
    config_name = None if config_name in (None, "default") else config_name
    if config_name is not None and task is not None and config_name != task:
        raise ValueError(
            f"the configuration name {config_name!r} and task={task!r} disagree; give the task once, "
            f"as one of {list(TASKS)}"
        )
    chosen = task if task is not None else config_name
    if chosen is None:
        raise ValueError(
            f"no task given; load the metric with one of MedMNIST's task strings {list(TASKS)}, "
            f"e.g. evaluate.load(path, 'binary-class') or evaluate.load(path, task='binary-class')"
        )
    if chosen not in TASKS:
        raise ValueError(
            f"unknown task {chosen!r}; use one of MedMNIST's task strings {list(TASKS)} "
            f"(medmnist.INFO[flag]['task'])"
        )
    return chosen


def _as_matrix(rows, name, dtype):
    """List of equal-length rows -> 2-D array, or a ValueError that says which lengths differ."""
    lengths = sorted({len(row) for row in rows})
    if len(lengths) > 1:
        raise ValueError(f"{name} rows have different lengths {lengths}; give every example the same number of columns")
    return np.asarray(rows, dtype=dtype).reshape(len(rows), lengths[0] if lengths else 0)


def medmnist_auc(y_true, scores, task):
    """MedMNIST's AUC; NaN (with a warning) where a class or label lacks positives or negatives."""
    try:
        if task == MULTI_LABEL:
            return float(roc_auc_score(y_true, scores, average="macro"))
        if task == BINARY:
            return float(roc_auc_score(y_true, scores[:, -1]))
        one_hot = np.eye(scores.shape[1], dtype=int)[y_true]
        # Column-wise one-vs-rest, averaged: MedMNIST's loop over classes.
        return float(roc_auc_score(one_hot, scores, average="macro"))
    except ValueError as error:
        warnings.warn(f"AUC is undefined here ({error}); reporting NaN", stacklevel=2)
        return float("nan")


def medmnist_acc(y_true, scores, task, threshold=0.5):
    if task == MULTI_LABEL:
        predicted = (scores > threshold).astype(int)
    elif task == BINARY:
        predicted = (scores[:, -1] > threshold).astype(int)
    else:
        predicted = scores.argmax(axis=-1)
    # For multi-label this is the mean over labels of per-label accuracy, as MedMNIST computes it.
    return float((predicted == y_true).mean())


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MedmnistMetric(evaluate.Metric):
    def __init__(self, config_name=None, task=None, **kwargs):
        # The task is settled before evaluate builds the module info, since the input features
        # (an int label or a 0/1 row per example) depend on it.
        self.task = _resolve_task(config_name, task)
        super().__init__(config_name=self.task, **kwargs)

    def _info(self):
        scores = datasets.Sequence(datasets.Value("float64"))
        if self.task == MULTI_LABEL:
            features = datasets.Features({"predictions": scores, "references": datasets.Sequence(datasets.Value("int64"))})
        else:
            # A plain class index, or MedMNIST's (N, 1) label rows as its .npz files store them.
            features = [
                datasets.Features({"predictions": scores, "references": datasets.Value("int64")}),
                datasets.Features({"predictions": scores, "references": datasets.Sequence(datasets.Value("int64"))}),
            ]
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=features,
            homepage="https://medmnist.com/",
            reference_urls=["https://github.com/MedMNIST/MedMNIST/blob/main/medmnist/evaluator.py"],
        )

    def _compute(self, predictions, references, threshold=0.5):
        if len(predictions) == 0:
            raise ValueError("no predictions were given; pass them to compute() or add_batch() first")
        scores = _as_matrix(predictions, "predictions", np.float64)
        if not np.all(np.isfinite(scores)) or scores.min() < 0 or scores.max() > 1:
            raise ValueError(
                "predictions must be probabilities in [0, 1] (softmax, or sigmoid for multi-label); "
                "convert logits first"
            )
        num_columns = scores.shape[1]
        if self.task == MULTI_LABEL:
            y_true = _as_matrix(references, "references", np.int64)
            if y_true.shape != scores.shape:
                raise ValueError(
                    f"references have shape {y_true.shape} but predictions {scores.shape}; "
                    f"give one 0/1 entry per label, as many labels as prediction columns"
                )
            if not np.isin(y_true, (0, 1)).all():
                raise ValueError("multi-label references must be 0 or 1")
        else:
            if isinstance(references[0], (list, tuple, np.ndarray)):
                references = _as_matrix(references, "references", np.int64)
                if references.shape[1] != 1:
                    raise ValueError(
                        f"references have {references.shape[1]} entries per example; task {self.task!r} "
                        f"takes one class index per example"
                    )
            y_true = np.asarray(references, dtype=np.int64).reshape(-1)
            expected = "2 (negative, positive)" if self.task == BINARY else "at least 2"
            if (self.task == BINARY and num_columns != 2) or num_columns < 2:
                raise ValueError(
                    f"predictions have {num_columns} column(s); task {self.task!r} takes {expected} "
                    f"probabilities per example, one per class"
                )
            if y_true.min() < 0 or y_true.max() >= num_columns:
                raise ValueError(
                    f"references must be class indices in [0, {num_columns - 1}] for {num_columns} "
                    f"prediction columns; got values {y_true.min()}..{y_true.max()}"
                )
        return {
            "auc": medmnist_auc(y_true, scores, self.task),
            "acc": medmnist_acc(y_true, scores, self.task, threshold),
        }
