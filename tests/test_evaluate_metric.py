"""The `evaluate` metric module (hf_medbeit/medmnist_metric) against hf_medbeit.metrics and medmnist's
evaluator, loaded the way a Hub user loads it: ``evaluate.load(<folder>, <task>)``, offline."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import evaluate
import evaluate.loading
import numpy as np
import pytest
from medmnist import INFO
from medmnist.evaluator import getACC, getAUC

from hf_medbeit.metrics import EVALUATE_METRIC_PATH, medmnist_acc, medmnist_auc

# task -> number of classes (labels for multi-label), as in BreastMNIST, PathMNIST, RetinaMNIST, ChestMNIST
TASKS = {
    "binary-class": 2,
    "multi-class": 9,
    "ordinal-regression": 5,
    "multi-label, binary-class": 14,
}
MULTI_LABEL = "multi-label, binary-class"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def modules_cache_in_tmp(tmp_path_factory):
    """evaluate copies a loaded script into ~/.cache/huggingface/modules; keep the tests' copies out
    of the user's cache, under a package name of their own so no earlier import can shadow it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate.loading, "init_dynamic_modules", functools.partial(
            evaluate.loading.init_dynamic_modules, name="hf_medbeit_test_evaluate_modules",
            hf_modules_cache=tmp_path_factory.mktemp("evaluate_modules"),
        ))
        yield


@pytest.fixture
def load(tmp_path):
    """evaluate.load of our folder; predictions and references go to files under tmp_path, evaluate's default."""
    return functools.partial(evaluate.load, EVALUATE_METRIC_PATH, cache_dir=str(tmp_path))


def random_predictions(task, n, seed, decimals=None):
    """Labels with every class present (so MedMNIST's AUC is defined) and probabilities that carry
    some signal; ``decimals`` rounds them, so many scores tie, also at the 0.5 threshold and argmax."""
    rng = np.random.default_rng(seed)
    k = TASKS[task]
    if task == MULTI_LABEL:
        y = rng.integers(0, 2, size=(n, k))
        y[0], y[1] = 0, 1
        scores = 1 / (1 + np.exp(-(rng.normal(size=(n, k)) + y)))
    else:
        y = rng.permutation(np.arange(n) % k)
        logits = rng.normal(size=(n, k))
        logits[np.arange(n), y] += 1.0
        scores = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    if decimals is not None:
        scores = scores.round(decimals)
    return y, scores


def compute_in_batches(metric, y, scores, seed):
    """add_batch over uneven chunks, then compute(), as an evaluation loop would."""
    cuts = np.sort(np.random.default_rng(seed).choice(np.arange(1, len(y)), size=3, replace=False))
    for y_part, scores_part in zip(np.split(y, cuts), np.split(scores, cuts)):
        metric.add_batch(predictions=scores_part, references=y_part)
    return metric.compute()


@pytest.mark.parametrize("task", list(TASKS))
def test_module_equals_hf_medbeit_and_medmnist_evaluator_for_many_seeds_with_and_without_ties(task, load):
    for seed in range(6):
        for decimals in (None, 1):
            y, scores = random_predictions(task, n=40 + 23 * seed, seed=seed, decimals=decimals)
            result = compute_in_batches(load(task), y, scores, seed)
            # Same formulas, same sklearn calls: equal to the last bit.
            assert result == {"auc": medmnist_auc(y, scores, task), "acc": medmnist_acc(y, scores, task)}
            # medmnist's evaluator takes labels as (N, 1) for single-label sets, as its .npz files store them.
            y_medmnist = y if y.ndim == 2 else y.reshape(-1, 1)
            assert result["auc"] == pytest.approx(getAUC(y_medmnist, scores, task), abs=1e-12)
            assert result["acc"] == pytest.approx(getACC(y_medmnist, scores, task), abs=1e-12)


@pytest.mark.parametrize("task", ["binary-class", "multi-class", "ordinal-regression"])
def test_medmnist_label_rows_and_plain_lists_give_the_same_result_as_arrays(task, load):
    y, scores = random_predictions(task, n=50, seed=7)
    expected = load(task).compute(predictions=scores, references=y)
    assert load(task).compute(predictions=scores.tolist(), references=y.reshape(-1, 1)) == expected
    assert load(task=task).compute(predictions=scores.tolist(), references=y.tolist()) == expected


@pytest.mark.parametrize("task", ["binary-class", MULTI_LABEL])
def test_threshold_is_passed_to_acc_as_in_medmnist_get_acc(task, load):
    y, scores = random_predictions(task, n=60, seed=3)
    result = load(task).compute(predictions=scores, references=y, threshold=0.3)
    y_medmnist = y if y.ndim == 2 else y.reshape(-1, 1)
    assert result["acc"] == pytest.approx(getACC(y_medmnist, scores, task, threshold=0.3), abs=1e-12)
    assert result["acc"] == medmnist_acc(y, scores, task, threshold=0.3)
    assert result["acc"] != load(task).compute(predictions=scores, references=y)["acc"]


def test_card_example_gives_the_numbers_it_shows(load):
    result = load("binary-class").compute(predictions=[[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], references=[0, 1, 1])
    assert result == {"auc": 1.0, "acc": 2 / 3}


@pytest.mark.parametrize("task,y,scores", [
    ("binary-class", [0, 0, 0], [[0.6, 0.4], [0.3, 0.7], [0.5, 0.5]]),
    ("multi-class", [0, 1, 0], [[0.2, 0.3, 0.5], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1]]),
    (MULTI_LABEL, [[0, 1], [0, 0], [0, 1]], [[0.2, 0.3], [0.1, 0.8], [0.5, 0.4]]),
])
def test_undefined_auc_is_nan_with_a_warning_as_in_hf_medbeit(task, y, scores, load):
    """A class (or a finding) with no positive or no negative example: hf_medbeit reports NaN and
    warns whatever scikit-learn version raises or warns there, and so must the module."""
    y, scores = np.array(y), np.array(scores)
    with pytest.warns(UserWarning, match="not defined|undefined"):
        result = load(task).compute(predictions=scores, references=y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isnan(medmnist_auc(y, scores, task))
    assert np.isnan(result["auc"])
    assert result["acc"] == medmnist_acc(y, scores, task)


def test_every_medmnist_task_string_is_a_task_of_the_module_and_nothing_else(load):
    module = sys.modules[type(load("binary-class")).__module__]
    assert set(module.TASKS) == {info["task"] for info in INFO.values()} == set(TASKS)


@pytest.mark.parametrize("load_kwargs,message", [
    ({}, "no task given"),
    ({"config_name": "binary"}, "unknown task 'binary'"),
    ({"task": "multi-label"}, "unknown task 'multi-label'"),
    ({"config_name": "multi-class", "task": "binary-class"}, "disagree"),
])
def test_a_missing_or_wrong_task_string_is_refused_at_load_with_the_valid_ones(load_kwargs, message, load):
    with pytest.raises(ValueError, match=message) as error:
        load(**load_kwargs)
    assert "'ordinal-regression'" in str(error.value)


@pytest.mark.parametrize("task,predictions,references,message", [
    ("binary-class", [[0.1, 0.9], [0.3, 0.7]], [1], r"number of predictions \(2\) and references \(1\)"),
    ("binary-class", [[0.1, 0.8, 0.1]], [1], r"3 column\(s\); task 'binary-class' takes 2"),
    ("binary-class", [[0.6]], [1], r"1 column\(s\)"),
    ("multi-class", [[0.1, 0.9], [1.0]], [1, 0], r"rows have different lengths \[1, 2\]"),
    ("multi-class", [[0.2, 0.3, 0.5]], [3], r"class indices in \[0, 2\]"),
    ("multi-class", [[0.2, 0.3, 0.5]], [[1, 0, 0]], "3 entries per example"),
    ("ordinal-regression", [[2.0, -1.0]], [0], "probabilities in \\[0, 1\\].*convert logits"),
    ("binary-class", [[float("nan"), 0.5]], [0], "probabilities in \\[0, 1\\]"),
    (MULTI_LABEL, [[0.2, 0.9, 0.5]], [[0, 1]], r"references have shape \(1, 2\) but predictions \(1, 3\)"),
    (MULTI_LABEL, [[0.2, 0.9]], [[0, 2]], "must be 0 or 1"),
])
def test_bad_inputs_say_what_is_wrong(task, predictions, references, message, load):
    with pytest.raises(ValueError, match=message):
        load(task).compute(predictions=predictions, references=references)


def test_compute_with_nothing_added_says_so(load):
    with pytest.raises(ValueError, match="call `add` or `add_batch`"):  # evaluate's own check
        load("multi-class").compute()
    # Empty inputs get past evaluate where the task has one input format (multi-label).
    with pytest.raises(ValueError, match="no predictions were given"):
        load(MULTI_LABEL).compute(predictions=[], references=[])


@pytest.mark.e2e
def test_the_folder_from_an_installed_wheel_loads_offline_in_a_fresh_interpreter_without_hf_medbeit(tmp_path):
    """What a user of the wheel, or of the Hub copy, has: the folder with evaluate, numpy and
    scikit-learn; no hf_medbeit import, no network, an empty Hugging Face cache."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "wheel"), str(REPO)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("hf_medbeit-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"), str(wheel)],
                   check=True, capture_output=True)
    folder = tmp_path / "site" / "hf_medbeit" / "medmnist_metric"
    assert sorted(path.name for path in folder.iterdir() if path.is_file()) == ["README.md", "medmnist_metric.py"]
    y, scores = random_predictions(MULTI_LABEL, n=80, seed=11, decimals=2)
    np.savez(tmp_path / "inputs.npz", y=y, scores=scores)
    script = f"""
import json, sys
import evaluate, numpy as np
inputs = np.load({str(tmp_path / "inputs.npz")!r})
metric = evaluate.load({str(folder)!r}, {MULTI_LABEL!r})
metric.add_batch(predictions=inputs["scores"][:30], references=inputs["y"][:30])
metric.add_batch(predictions=inputs["scores"][30:], references=inputs["y"][30:])
result = metric.compute()
assert "hf_medbeit" not in sys.modules, "the module must not need hf_medbeit"
print(json.dumps(result))
"""
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
    }
    env.pop("HF_MODULES_CACHE", None)
    env.pop("HF_METRICS_CACHE", None)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # json round-trips floats exactly, so this is equality to the last bit.
    assert result == {"auc": medmnist_auc(y, scores, MULTI_LABEL), "acc": medmnist_acc(y, scores, MULTI_LABEL)}
    # evaluate read the script from the empty cache given, not from one warmed by earlier runs.
    assert list((tmp_path / "hf_home" / "modules").rglob("medmnist_metric.py"))
