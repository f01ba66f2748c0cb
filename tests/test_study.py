"""`hf-medbeit study GRID.yaml`: grid expansion, cell states, shards, running cells in their own
processes, the results table beside the quoted references, and the paired bootstrap."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from hf_medbeit import study
from hf_medbeit.errors import UserError
from hf_medbeit.metrics import medmnist_auc, medmnist_acc
from hf_medbeit.outputs import write_json, write_predictions

from conftest import DATA, REPO, TINY_BEIT, assert_one_line_error, run_cli

BREAST_LABELS = ["malignant", "normal, benign"]


def write_grid(folder: Path, grid: dict | str, name: str = "grid.yaml") -> Path:
    path = folder / name
    path.write_text(grid if isinstance(grid, str) else yaml.safe_dump(grid, sort_keys=False))
    return path


def tiny_grid(root: Path, **axes) -> dict:
    return {
        "output_dir": str(root),
        "base": {"dataset_name": "breastmnist", "model_type": "beit", "config_overrides": TINY_BEIT,
                 "report_to": "none", "max_steps": 1},
        "axes": axes or {"seed": [0, 1, 2]},
    }


def fake_run(folder: Path, y_true: np.ndarray, scores: np.ndarray, ci=(0.6, 0.9), task="binary-class",
             label_names=BREAST_LABELS, dataset="breastmnist", size=28) -> dict:
    """A finished run folder as finetune.py leaves it: all_results.json (written last) and
    test_predictions.csv, with the metrics computed from the predictions."""
    folder.mkdir(parents=True)
    write_predictions(folder / "test_predictions.csv", y_true, scores, label_names, task)
    results = {"dataset": dataset, "size": size, "task": task, "label_names": label_names,
               "test_auc": medmnist_auc(y_true, scores, task), "test_acc": medmnist_acc(y_true, scores, task),
               "test_auc_ci95": list(ci), "model_type": "beit", "balancing": "none",
               # A validation AUC that differs from run to run (a function of the folder's name).
               "eval_auc": 0.5 + (sum(map(ord, folder.name)) % 40) / 100}
    write_json(folder / "all_results.json", results)
    return results


def binary_scores(y_true: np.ndarray, signal: float, rng) -> np.ndarray:
    """Softmax-like 2-column scores whose positive column separates the classes by ``signal``."""
    positive = 1 / (1 + np.exp(-(signal * (y_true - 0.5) + rng.normal(size=len(y_true)))))
    return np.stack([1 - positive, positive], axis=1)


def breast_test_labels() -> np.ndarray:
    return np.load(DATA / "breastmnist.npz")["test_labels"][:, 0].astype(int)


# --- expansion and naming ---------------------------------------------------------------------

def test_a_grid_expands_to_the_product_of_its_axes_with_every_value_in_each_cell_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # include paths are relative to where the command runs, like data_dir
    Path("presets").mkdir()
    Path("presets/wide.yaml").write_text("model_type: beit\nconfig_overrides: hidden_size=64\nlearning_rate: 1e-3\n")
    grid = tiny_grid(tmp_path / "root", model={"wide": {"include": "presets/wide.yaml", "learning_rate": "5e-4"},
                                               "narrow": {"config_overrides": "hidden_size=16"}},
                     balancing=["none", "weighted_loss"], seed=[0, 1, 2])
    grid["overrides"] = [{"when": {"model": "narrow", "balancing": "weighted_loss"}, "set": {"weight_decay": 0.1}}]
    loaded = study.load_grid(write_grid(tmp_path, grid))

    assert len(loaded.cells) == 2 * 2 * 3
    names = [cell.name for cell in loaded.cells]
    assert names[:4] == ["wide_balancing-none_seed-0", "wide_balancing-none_seed-1", "wide_balancing-none_seed-2",
                         "wide_balancing-weighted-loss_seed-0"]
    assert len(set(names)) == len(names)
    wide, narrow = loaded.cells[0].arguments, loaded.cells[-1].arguments
    # base < included file < the axis value's own keys < overrides; the study sets folder and name.
    assert (wide["config_overrides"], wide["learning_rate"], wide["max_steps"]) == ("hidden_size=64", "5e-4", 1)
    assert (wide["output_dir"], wide["run_name"]) == (str(tmp_path / "root" / names[0]), names[0])
    assert (narrow["config_overrides"], narrow["balancing"], narrow["seed"], narrow["weight_decay"]) == (
        "hidden_size=16", "weighted_loss", 2, 0.1)
    assert "weight_decay" not in loaded.cells[6].arguments  # narrow, balancing none: the override does not apply
    # The table's rows: every axis but the seed.
    assert {cell.method for cell in loaded.cells} == {"wide_balancing-none", "wide_balancing-weighted-loss",
                                                      "narrow_balancing-none", "narrow_balancing-weighted-loss"}


def test_the_seed_study_grid_reproduces_its_eight_hand_written_configs(tmp_path):
    from hf_medbeit.arguments import parse_args

    grid = study.load_grid(REPO / "configs/study/grid.yaml")
    hand_written = sorted((REPO / "configs/study").glob("beit-large-*.yaml"))
    assert len(grid.cells) == len(hand_written) == 8

    def meaning(path):
        model_args, data_args, training_args = parse_args([str(path)])
        training = {key: value for key, value in training_args.to_dict().items()
                    if key not in ("output_dir", "run_name", "logging_dir")}
        return dataclasses.asdict(model_args), dataclasses.asdict(data_args), training

    cells = {(cell.arguments["dataset_name"], cell.arguments["size"], cell.arguments["balancing"]): cell
             for cell in grid.cells}
    for path in hand_written:
        config = yaml.safe_load(path.read_text())
        cell = cells.pop((config["dataset_name"], config["size"], config["balancing"]))
        cell_file = tmp_path / f"{cell.name}.yaml"
        cell_file.write_text(study.cell_config_text(grid, cell))
        assert meaning(cell_file) == meaning(path), (cell.name, path.name)


def test_two_cells_that_would_share_a_run_folder_are_refused_before_anything_is_written(tmp_path):
    root = tmp_path / "root"
    grid = write_grid(tmp_path, tiny_grid(root, model={"tiny beit": {}, "tiny-beit": {}}))
    result = run_cli("study", str(grid))
    assert_one_line_error(result, "cells 0 and 1 would share the run folder tiny-beit", "distinct names")
    assert not root.exists()


@pytest.mark.parametrize("case, text, fragments", [
    ("bad YAML", "output_dir: x\naxes: {seed: [0, 1}\n", ["is not valid YAML", "fix its syntax"]),
    ("empty axes", "output_dir: x\nbase: {seed: 1}\naxes: {}\n", ["axes must be a non-empty mapping"]),
    ("an axis without values", "output_dir: x\naxes: {seed: []}\n", ["axis seed has no values"]),
    ("no output_dir", "axes: {seed: [0, 1]}\n", ["output_dir must name the study's root folder"]),
    ("a train config", "dataset_name: breastmnist\nseed: 1\n", ["looks like a train config", "hf-medbeit train"]),
    ("two axes setting one argument", "output_dir: x\naxes: {seed: [0], other: {a: {seed: 1}}}\n",
     ["axes seed and other both set seed", "overrides"]),
    ("a baseline value the axis lacks", "output_dir: x\naxes: {seed: [0], m: {a: {}}}\nbaseline: {m: b}\n",
     ["baseline: axis m has no value 'b'"]),
])
def test_a_bad_grid_is_one_line_and_nothing_runs(tmp_path, case, text, fragments):
    grid = write_grid(tmp_path, text)
    result = run_cli("study", str(grid), cwd=tmp_path)
    assert_one_line_error(result, str(grid) if case != "bad YAML" else "grid.yaml", *fragments)
    assert sorted(os.listdir(tmp_path)) == ["grid.yaml"]


def test_an_unknown_argument_in_one_cell_is_refused_before_any_cell_runs(tmp_path):
    root = tmp_path / "root"
    grid = tiny_grid(root, model={"good": {}, "typo": {"lerning_rate": 0.1}}, seed=[0, 1])
    result = run_cli("study", str(write_grid(tmp_path, grid)))
    assert_one_line_error(result, "cell typo_seed-0", "unknown key 'lerning_rate'", "did you mean --learning_rate")
    assert not root.exists()


# --- states, shards, stale cells ---------------------------------------------------------------

def test_list_shows_each_cells_state_and_writes_nothing(tmp_path):
    root = tmp_path / "root"
    grid = study.load_grid(write_grid(tmp_path, tiny_grid(root, seed=[0, 1, 2, 3])))
    labels = breast_test_labels()
    fake_run(grid.cells[0].folder, labels, binary_scores(labels, 2.0, np.random.default_rng(0)))
    (grid.cells[1].folder / "checkpoint-1").mkdir(parents=True)  # a run killed after its first checkpoint
    (grid.cells[1].folder / ".hf_medbeit_run.json").write_text("{}")
    grid.cells[2].folder.mkdir()  # an empty folder is as good as none
    grid.cells[3].folder.mkdir()
    (grid.cells[3].folder / "all_results.json").write_text('{"test_auc": 0.')
    before = sorted(str(path) for path in tmp_path.rglob("*"))

    result = run_cli("study", str(grid.path), "--list")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert "4 of 4 cells" in lines[0] and "1 finished, 1 unfinished, 1 damaged, 1 new" in lines[0]
    assert [line.split() for line in lines[1:]] == [["0", "finished", "seed-0"], ["1", "unfinished", "seed-1"],
                                                    ["2", "new", "seed-2"], ["3", "damaged", "seed-3"]]
    assert sorted(str(path) for path in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("count", [1, 2, 3, 5, 13])
def test_shards_cover_every_cell_exactly_once(tmp_path, count):
    grid = study.load_grid(write_grid(tmp_path, tiny_grid(tmp_path / "r", model={"a": {}, "b": {}}, seed=[0, 1, 2])))
    shards = [study.shard_cells(grid.cells, index, count) for index in range(count)]
    indices = sorted(cell.index for shard in shards for cell in shard)
    assert indices == list(range(len(grid.cells)))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced


def test_a_shard_outside_its_count_is_one_line(tmp_path):
    grid = write_grid(tmp_path, tiny_grid(tmp_path / "root"))
    assert_one_line_error(run_cli("study", str(grid), "--shard", "2/2"), "--shard 2/2 must be I/N with 0 <= I < N")


def test_a_cell_started_under_another_config_is_refused_not_skipped(tmp_path):
    root = tmp_path / "root"
    path = write_grid(tmp_path, tiny_grid(root, seed=[0]))
    grid = study.load_grid(path)
    cell = grid.cells[0]
    labels = breast_test_labels()
    fake_run(cell.folder, labels, binary_scores(labels, 2.0, np.random.default_rng(0)))
    cell.config_path.write_text(study.cell_config_text(grid, cell))
    study.check_not_stale(grid)  # the same grid: fine

    edited = tiny_grid(root, seed=[0])
    edited["base"]["max_steps"] = 2
    with pytest.raises(UserError, match=r"cell seed-0 was started with max_steps: 1, the grid now gives 2"):
        study.check_not_stale(study.load_grid(write_grid(tmp_path, edited)))


# --- running cells -------------------------------------------------------------------------------

def stub_commands(monkeypatch, template: Path, broken=("broken",), slow=()):
    """Cells run by tiny stand-in processes instead of training: a broken cell prints a train-style
    error and exits 2; a slow one waits for a signal; the others copy a finished run into their
    folder (after checking that the study wrote their config first)."""
    def command(cell, launcher, accelerate_config):
        if cell.name in broken:
            code = "print('hf-medbeit: error: no data here; fix it'); raise SystemExit(2)"
        elif cell.name in slow:
            code = ("import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(143)); "
                    f"pathlib.Path({str(cell.root / 'ready')!r}).touch(); time.sleep(60)")
        else:
            code = (f"import pathlib, shutil; assert pathlib.Path({str(cell.config_path)!r}).is_file(); "
                    f"shutil.copytree({str(template)!r}, {str(cell.folder)!r}, dirs_exist_ok=True)")
        return [sys.executable, "-c", code]

    monkeypatch.setattr(study, "cell_command", command)


def template_run(tmp_path) -> Path:
    labels = breast_test_labels()
    template = tmp_path / "template"
    fake_run(template, labels, binary_scores(labels, 2.0, np.random.default_rng(0)))
    return template


def test_a_failed_cell_is_reported_the_rest_still_run_and_an_unfinished_one_is_resumed(tmp_path, monkeypatch, capsys):
    root = tmp_path / "root"
    grid = tiny_grid(root, variant={"broken": {"seed": 1}, "killed": {"seed": 2}, "fresh": {"seed": 3}})
    path = write_grid(tmp_path, grid)
    killed = root / "killed"
    (killed / "checkpoint-1").mkdir(parents=True)  # what a kill after the first checkpoint leaves
    (killed / ".hf_medbeit_run.json").write_text("{}")
    stub_commands(monkeypatch, template_run(tmp_path))

    with pytest.raises(study.StudyFailed) as failure:
        study.main([str(path), "--resamples", "200"])
    assert failure.value.exit_code == 1
    assert str(failure.value).startswith("1 of 3 cells failed: broken (exit status 2: hf-medbeit: error: no data here")
    out = capsys.readouterr().out
    assert "[1/3] broken: FAILED (exit status 2)" in out
    assert "[2/3] killed: resuming" in out and "[2/3] killed: finished in" in out
    assert "[3/3] fresh: starting" in out and "[3/3] fresh: finished in" in out
    assert "hf-medbeit: error: no data here" in (root / "broken.log").read_text()
    assert (root / "results.md").is_file()  # the table of what finished, despite the failure


def test_a_signal_to_the_study_reaches_the_running_cell_and_stops_the_study(tmp_path, monkeypatch):
    root = tmp_path / "root"
    grid = study.load_grid(write_grid(tmp_path, tiny_grid(root, variant={"slow": {"seed": 1}, "next": {"seed": 2}})))
    stub_commands(monkeypatch, template_run(tmp_path), slow=("slow",))

    def signal_when_ready():
        deadline = time.time() + 30
        while not (root / "ready").exists() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # to the study only: it passes it on to the cell

    handler = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=signal_when_ready, daemon=True).start()
    started = time.time()
    with pytest.raises(study.StudyInterrupted) as stopped:
        study.run_study(grid, grid.cells, "python", None)
    assert time.time() - started < 30  # the cell stopped on the forwarded signal, not after its 60 s sleep
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert "interrupted in cell slow" in str(stopped.value) and "run the same command again" in str(stopped.value)
    assert not (root / "next").exists()  # the study stopped instead of starting the next cell
    assert signal.getsignal(signal.SIGTERM) is handler  # the study's handler is gone again


@pytest.mark.e2e
def test_a_real_study_of_two_tiny_cells_runs_each_in_its_own_process_and_a_rerun_skips_both(tmp_path):
    root = tmp_path / "study"
    grid = tiny_grid(root, variant={"a": {"seed": 1}, "b": {"seed": 2}})
    grid["base"].update(data_dir=str(DATA), dataset_cache_dir=str(tmp_path / "cache"), max_train_samples=16,
                        max_eval_samples=16, per_device_train_batch_size=8, per_device_eval_batch_size=64,
                        save_total_limit=1)
    grid["baseline"] = {"variant": "a"}
    path = write_grid(tmp_path, grid)

    first = run_cli("study", str(path), "--resamples", "200")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stdout.count(": finished in") == 2, first.stdout
    for name in ("a", "b"):
        assert (root / name / "all_results.json").is_file()
        # The cell's config, beside its folder, reruns it alone.
        assert yaml.safe_load((root / f"{name}.yaml").read_text())["output_dir"] == str(root / name)
        assert "hf-medbeit train" in (root / f"{name}.yaml").read_text()
    table = (root / "results.md").read_text()
    assert "| `a` | 1 |" in table and "| `b` | 1 |" in table and "*(quoted)*" in table
    assert "| `b` | `a` |" in table  # the paired test on the two runs' real test predictions
    assert (root / "results_auc.png").is_file() and (root / "results.csv").is_file()

    second = run_cli("study", str(path), "--resamples", "200")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "[1/2] a: finished, skipped" in second.stdout and "[2/2] b: finished, skipped" in second.stdout


# --- the results table ------------------------------------------------------------------------------

def fake_study(tmp_path, baseline=True) -> study.Grid:
    """2 models x 3 seeds of faked finished runs on BreastMNIST's real test labels: 'good' separates
    the classes, 'weak' barely."""
    grid = tiny_grid(tmp_path / "root", model={"good": {}, "weak": {}}, seed=[0, 1, 2])
    if baseline:
        grid["baseline"] = {"model": "weak"}
    loaded = study.load_grid(write_grid(tmp_path, grid))
    labels = breast_test_labels()
    rng = np.random.default_rng(0)
    for cell in loaded.cells:
        signal = 3.0 if cell.values["model"].label == "good" else 0.3
        ci = (0.5 + 0.01 * cell.index, 0.9 + 0.005 * cell.index)
        fake_run(cell.folder, labels, binary_scores(labels, signal, rng), ci=ci)
    return loaded


def test_the_table_gives_mean_and_sample_std_over_seeds_beside_the_quoted_rows(tmp_path):
    from hf_medbeit.results_table import write_results

    grid = fake_study(tmp_path)
    markdown, table, figure = write_results(grid, n_resamples=300)
    rows = list(csv.DictReader(table.open()))
    ours = {row["method"]: row for row in rows if row["kind"] == "ours"}
    assert set(ours) == {"good", "weak"}
    for method in ("good", "weak"):
        runs = [json.loads((cell.folder / "all_results.json").read_text()) for cell in grid.cells
                if cell.method == method]
        auc = np.array([run["test_auc"] for run in runs])
        acc = np.array([run["test_acc"] for run in runs])
        ci = np.array([run["test_auc_ci95"] for run in runs])
        row = ours[method]
        assert row["n_runs"] == "3" and row["seeds"] == "0 1 2"
        assert float(row["test_auc_mean"]) == pytest.approx(np.mean(auc), abs=1e-6)
        assert float(row["test_auc_std"]) == pytest.approx(np.std(auc, ddof=1), abs=1e-6)
        assert float(row["test_acc_mean"]) == pytest.approx(np.mean(acc), abs=1e-6)
        assert float(row["test_acc_std"]) == pytest.approx(np.std(acc, ddof=1), abs=1e-6)
        assert float(row["test_auc_ci95_low_mean"]) == pytest.approx(ci[:, 0].mean(), abs=1e-6)
        assert float(row["test_auc_ci95_high_mean"]) == pytest.approx(ci[:, 1].mean(), abs=1e-6)
        validation = np.array([run["eval_auc"] for run in runs])
        assert float(row["val_auc_mean"]) == pytest.approx(np.mean(validation), abs=1e-6)
        assert float(row["val_auc_std"]) == pytest.approx(np.std(validation, ddof=1), abs=1e-6)
    assert ours["good"]["baseline"] == "weak" and float(ours["good"]["auc_diff_ci95_low"]) > 0
    assert ours["weak"]["baseline"] == ""  # the baseline is not compared with itself

    quoted = [row for row in rows if row["kind"] == "quoted"]
    resnet18 = next(row for row in quoted if row["method"] == "ResNet-18 (28)")
    assert resnet18["source"].startswith("quoted: MedMNIST v2") and resnet18["test_auc_mean"] == "0.901"
    assert any(row["method"] == "BEiT-large (28)" and row["source"] == "quoted: the seed study" for row in quoted)
    assert all(row["n_runs"] == "" for row in quoted)

    text = markdown.read_text()
    assert "| ResNet-18 (28) *(quoted)* | - | - | 0.901 | 0.863 | - | quoted: MedMNIST v2" in text
    good = ours["good"]
    assert (f"| `good` | 3 | {float(good['val_auc_mean']):.3f} ± {float(good['val_auc_std']):.3f} | "
            f"{float(good['test_auc_mean']):.3f} ± {float(good['test_auc_std']):.3f} |") in text
    assert "| `good` | `weak` | +" in text  # the paired test against the baseline
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000


def test_compare_names_the_methods_of_the_table_and_refuses_unknown_ones(tmp_path, capsys):
    from hf_medbeit.results_table import compare_command

    grid = fake_study(tmp_path, baseline=False)
    comparison = compare_command(grid, "good", "weak", n_resamples=300)
    assert "good - weak: test AUC difference +" in capsys.readouterr().out
    aucs = {method: np.mean([json.loads((cell.folder / "all_results.json").read_text())["test_auc"]
                             for cell in grid.cells if cell.method == method]) for method in ("good", "weak")}
    assert comparison.difference == pytest.approx(aucs["good"] - aucs["weak"], abs=1e-6)
    assert comparison.runs_a == comparison.runs_b == 3 and comparison.images == 156

    result = run_cli("study", str(grid.path), "--compare", "good", "resnet")
    assert_one_line_error(result, "no finished method 'resnet'", "good, weak")


def test_runs_with_other_test_labels_are_not_compared(tmp_path):
    from hf_medbeit.results_table import collect, compare

    grid = fake_study(tmp_path, baseline=False)
    folder = grid.cells[-1].folder
    predictions = (folder / "test_predictions.csv").read_text().splitlines()
    first = predictions[1].split(",")
    first[1] = str(1 - int(first[1]))  # one test label flipped: another test set, or another order
    (folder / "test_predictions.csv").write_text("\n".join([predictions[0], ",".join(first), *predictions[2:]]) + "\n")
    methods = {method.name: method for method in collect(grid)[0]}
    with pytest.raises(UserError, match="different test labels"):
        compare(methods["good"], methods["weak"], n_resamples=200)


# --- the paired bootstrap ---------------------------------------------------------------------------

@pytest.mark.parametrize("task, classes", [("binary-class", 2), ("multi-class", 4), ("multi-label, binary-class", 3)])
def test_the_vectorised_resampled_auc_is_medmnists_auc(task, classes):
    from hf_medbeit.results_table import positives_and_scores, resampled_auc

    rng = np.random.default_rng(1)
    n = 120
    if task == "multi-label, binary-class":
        labels = rng.integers(0, 2, size=(n, classes))
    else:
        labels = rng.integers(0, classes, size=n)
    scores = np.round(rng.random((n, classes)), 1)  # rounded: many ties, which count one half
    if task != "multi-label, binary-class":
        scores = scores / scores.sum(axis=1, keepdims=True)
    positives, columns = positives_and_scores(labels, scores, task)
    draws = rng.integers(0, n, size=(5, n))
    expected = [medmnist_auc(labels[draw], scores[draw], task) for draw in draws]
    assert resampled_auc(positives, columns, draws) == pytest.approx(expected, abs=1e-12)


def test_identical_methods_differ_by_zero_with_p_one():
    from hf_medbeit.results_table import paired_bootstrap

    labels = breast_test_labels()
    rng = np.random.default_rng(2)
    runs = [binary_scores(labels, 1.0, rng) for _ in range(3)]
    result = paired_bootstrap(labels, "binary-class", runs, list(runs), n_resamples=500)
    assert result["difference"] == 0 and result["low"] == 0 and result["high"] == 0
    assert result["p_value"] == pytest.approx(1.0)


def test_a_clearly_better_method_has_an_interval_above_zero_and_a_small_p():
    from hf_medbeit.results_table import paired_bootstrap

    labels = breast_test_labels()
    rng = np.random.default_rng(3)
    better = [binary_scores(labels, 3.0, rng) for _ in range(3)]
    worse = [binary_scores(labels, 0.3, rng) for _ in range(3)]
    result = paired_bootstrap(labels, "binary-class", better, worse, n_resamples=1000)
    assert result["low"] > 0 and result["p_value"] < 0.01
    assert result["low"] < result["difference"] < result["high"]
    flipped = paired_bootstrap(labels, "binary-class", worse, better, n_resamples=1000)
    assert flipped["difference"] == pytest.approx(-result["difference"]) and flipped["high"] < 0
    # Seeded: the same call gives the same interval.
    assert paired_bootstrap(labels, "binary-class", better, worse, n_resamples=1000) == result


# A study grid is a file with axes (as tests/test_configs.py tells them from train configs).
STUDY_GRIDS = [path for path in sorted((REPO / "configs" / "study").glob("*.yaml")) if "axes" in yaml.safe_load(path.read_text())]


@pytest.mark.parametrize("path", STUDY_GRIDS, ids=lambda path: path.name)
def test_every_committed_grid_expands_and_every_cell_parses(path, monkeypatch):
    monkeypatch.chdir(REPO)  # the study runs from the repository root: include and data_dir paths are relative to it
    grid = study.load_grid(path.relative_to(REPO))
    study.validate_cells(grid)
    assert len(grid.cells) >= 8 and len({cell.name for cell in grid.cells}) == len(grid.cells)
