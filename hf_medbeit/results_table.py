"""A study's results: one table (Markdown and CSV) and one figure, beside the quoted references.

Rows are methods: the grid's cells grouped by every axis except ``seed``. For each, over its
finished runs (seeds): mean and sample standard deviation (ddof=1, as MedMNIST+ reports) of the
test AUC and ACC, n, and the mean of the runs' own bootstrap 95% intervals of the test AUC (each
run's ``test_auc_ci95``: test images resampled, the model fixed).

Beside them, quoted and marked as such, never rerun here: MedMNIST v2's rows
(``model_cards/medmnist_v2_reference.json``) and the seed study's and MedMNIST+'s
(``model_cards/study_reference.json``), each with its source.

"Is A better than B here?": a paired bootstrap over the test images. Both methods' runs scored the
same test images in the same order (``test_predictions.csv``; their labels are checked to match).
Each resample draws test images with replacement, stratified by class (as pROC does, so every
resample has every class), and the same draw is applied to every run of both methods. The
statistic is the difference of the methods' mean AUC over their runs, the very numbers the table
shows. Scores are not averaged over seeds (that would test a seed ensemble, a model nobody
reported), and runs are not paired by seed (seed i of one architecture has nothing in common with
seed i of another; the mean of matched differences equals the difference of means anyway). So the
interval covers the test set's sampling; the spread between seeds is the table's std column.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from .data import MULTI_LABEL_TASK
from .errors import UserError
from .outputs import PREDICTIONS_FILE, UnreadableResults, atomic_path, read_results
from .study import SEED_AXIS, Cell, Grid

MODEL_CARDS_DIR = Path(__file__).resolve().parent / "model_cards"
MEDMNIST_V2_TABLE = MODEL_CARDS_DIR / "medmnist_v2_reference.json"
STUDY_REFERENCE_TABLE = MODEL_CARDS_DIR / "study_reference.json"
TABLE_MARKDOWN = "results.md"
TABLE_CSV = "results.csv"
FIGURE = "results_auc.png"
BOOTSTRAP_SEED = 0
QUOTED = "quoted"  # the CSV's kind of a reference row; ours are "ours"


@dataclass
class Run:
    cell: Cell
    results: dict


@dataclass
class Method:
    name: str
    values: dict  # non-seed axis name -> AxisValue
    runs: list[Run]

    @property
    def dataset(self) -> str:
        return self.runs[0].results["dataset"]

    @property
    def size(self) -> int:
        return self.runs[0].results["size"]

    @property
    def seeds(self) -> list[str]:
        return [run.cell.seed_label or "-" for run in self.runs]


@dataclass
class Comparison:
    method_a: str
    method_b: str
    difference: float  # mean AUC of A's runs minus B's, on the full test set
    low: float
    high: float
    p_value: float
    runs_a: int
    runs_b: int
    images: int
    resamples: int  # those where every AUC was defined (all of them for single-label tasks)


# --- collecting finished cells ----------------------------------------------------------------

def collect(grid: Grid) -> tuple[list[Method], list[str]]:
    """The finished cells grouped into methods (grid order), and the names of the other cells."""
    methods: dict[str, Method] = {}
    missing = []
    for cell in grid.cells:
        try:
            results = read_results(cell.folder)
        except UnreadableResults:
            missing.append(cell.name)
            continue
        method = methods.setdefault(cell.method, Method(
            cell.method, {axis: value for axis, value in cell.values.items() if axis != SEED_AXIS}, []))
        method.runs.append(Run(cell, results))
    return list(methods.values()), missing


def _numbers(runs: list[Run], key: str) -> np.ndarray:
    return np.array([math.nan if run.results.get(key) is None else float(run.results[key]) for run in runs])


def summarise(method: Method) -> dict:
    """Mean, sample std (ddof=1; undefined for one run) and n of test AUC and ACC, and the mean of
    the runs' bootstrap 95% interval bounds of the test AUC."""
    summary = {"n": len(method.runs)}
    for metric in ("auc", "acc"):
        values = _numbers(method.runs, f"test_{metric}")
        summary[f"{metric}_mean"] = float(np.mean(values))
        summary[f"{metric}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
        summary[f"{metric}_runs"] = values.tolist()
    # Validation AUC of the selected checkpoint: what choices between methods may be made on (never test).
    validation = _numbers(method.runs, "eval_auc")
    summary["val_auc_mean"] = float(np.mean(validation))
    summary["val_auc_std"] = float(np.std(validation, ddof=1)) if len(validation) > 1 else math.nan
    intervals = np.array([run.results.get("test_auc_ci95") or [math.nan, math.nan] for run in method.runs], dtype=float)
    summary["ci_low_mean"], summary["ci_high_mean"] = (float(value) for value in np.mean(intervals, axis=0))
    return summary


def reference_rows(dataset: str) -> list[dict]:
    """Quoted rows for a data set: MedMNIST v2's, then the seed study's and MedMNIST+'s."""
    rows = []
    medmnist_v2 = json.loads(MEDMNIST_V2_TABLE.read_text())
    for row in medmnist_v2["datasets"].get(dataset, []):
        rows.append({**row, "source": "MedMNIST v2 (Yang et al., Sci. Data 2023)", "url": medmnist_v2["source_url"]})
    study = json.loads(STUDY_REFERENCE_TABLE.read_text())
    for row in study["datasets"].get(dataset, []):
        source = study["sources"][row["source"]]
        rows.append({**row, "source": source["name"], "citation": source["citation"]})
    return rows


# --- paired bootstrap on the same test images -------------------------------------------------

def read_predictions(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """``test_predictions.csv``: true labels ((n,) or (n, K) multi-hot) and scores (n, K)."""
    path = Path(folder) / PREDICTIONS_FILE
    try:
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle))
        header, body = rows[0], rows[1:]
        label_columns = [i for i, name in enumerate(header) if name == "label" or name.startswith("label_")]
        score_columns = [i for i, name in enumerate(header) if name.startswith("score_")]
        if not body or not label_columns or not score_columns:
            raise ValueError("no labels, scores or rows")
        labels = np.array([[int(float(row[i])) for i in label_columns] for row in body])
        scores = np.array([[float(row[i]) for i in score_columns] for row in body])
    except (OSError, IndexError, ValueError) as error:
        raise UserError(f"{path} cannot be read ({error}); that run's test predictions are needed for the paired "
                        "test: rerun the cell") from error
    return (labels[:, 0] if labels.shape[1] == 1 else labels), scores


def positives_and_scores(labels: np.ndarray, scores: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    """One column per AUC that MedMNIST averages: (n, C) positives and their scores."""
    if task == MULTI_LABEL_TASK:
        return labels.astype(bool), scores
    if task == "binary-class":
        return (labels == 1)[:, None], scores[:, -1:]
    return labels[:, None] == np.arange(scores.shape[1])[None, :], scores


def resampled_auc(positives: np.ndarray, scores: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """MedMNIST's AUC (mean over columns) for each row of ``indices`` (B, n), by the rank-sum
    (Mann-Whitney) formula, vectorised over resamples; ties count one half, as in roc_auc_score.
    NaN where a column has no positive or no negative."""
    aucs = []
    for column in range(positives.shape[1]):
        truth = positives[indices, column]
        ranks = rankdata(scores[indices, column], axis=1)
        n_pos = truth.sum(axis=1)
        n_neg = truth.shape[1] - n_pos
        with np.errstate(divide="ignore", invalid="ignore"):
            auc = (np.where(truth, ranks, 0).sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
        aucs.append(np.where((n_pos > 0) & (n_neg > 0), auc, np.nan))
    return np.mean(aucs, axis=0)  # NaN if any column is undefined, as MedMNIST's evaluator fails then


def stratified_indices(labels: np.ndarray, task: str, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(B, n) test-image indices drawn with replacement within each class (single-label tasks), so
    class counts and every AUC stay defined; plain resampling for multi-label."""
    if task == MULTI_LABEL_TASK:
        return rng.integers(0, len(labels), size=(n_resamples, len(labels)))
    blocks = [rng.choice(np.flatnonzero(labels == value), size=(n_resamples, int((labels == value).sum())))
              for value in np.unique(labels)]
    return np.concatenate(blocks, axis=1)


def paired_bootstrap(labels: np.ndarray, task: str, scores_a: list[np.ndarray], scores_b: list[np.ndarray],
                     n_resamples: int = 2000, seed: int = BOOTSTRAP_SEED) -> dict:
    """Mean-over-runs AUC of A minus that of B, its 95% percentile interval and a two-sided p-value
    from ``n_resamples`` paired resamples of the test images (the same indices for every run).

    p = (1 + #{|d* - d| >= |d|}) / (1 + B): the bootstrap distribution shifted to the null of no
    difference; identical methods give p = 1, and p is never reported as 0."""
    rng = np.random.default_rng(seed)
    indices = stratified_indices(labels, task, n_resamples, rng)
    everything = np.arange(len(labels))[None, :]
    differences = []
    # Resamples in chunks, so a large test set (ChestMNIST: 22,433 images) stays within memory.
    chunk = max(1, 4_000_000 // (len(labels) * (1 if labels.ndim == 1 else labels.shape[1])))
    columns_a = [positives_and_scores(labels, scores, task) for scores in scores_a]
    columns_b = [positives_and_scores(labels, scores, task) for scores in scores_b]

    def mean_auc(columns, rows):
        return np.mean([resampled_auc(positives, scores, rows) for positives, scores in columns], axis=0)

    difference = float(mean_auc(columns_a, everything)[0] - mean_auc(columns_b, everything)[0])
    for start in range(0, n_resamples, chunk):
        rows = indices[start:start + chunk]
        differences.append(mean_auc(columns_a, rows) - mean_auc(columns_b, rows))
    samples = np.concatenate(differences)
    samples = samples[~np.isnan(samples)]
    if not len(samples) or math.isnan(difference):
        raise UserError("the AUC is undefined on these test labels (a class without positives or negatives); "
                        "no paired test is possible")
    low, high = np.percentile(samples, [2.5, 97.5])
    p_value = (1 + np.sum(np.abs(samples - difference) >= abs(difference))) / (1 + len(samples))
    return {"difference": difference, "low": float(low), "high": float(high), "p_value": float(p_value),
            "resamples": int(len(samples))}


def compare(method_a: Method, method_b: Method, n_resamples: int = 2000) -> Comparison:
    """Paired bootstrap of A - B; both must have scored the same test images, in the same order."""
    if (method_a.dataset, method_a.size) != (method_b.dataset, method_b.size):
        raise UserError(f"{method_a.name} was tested on {method_a.dataset} ({method_a.size}) and {method_b.name} on "
                        f"{method_b.dataset} ({method_b.size}); a paired test needs the same test images")
    task = method_a.runs[0].results["task"]
    labels, scores = None, {"a": [], "b": []}
    for key, method in (("a", method_a), ("b", method_b)):
        for run in method.runs:
            run_labels, run_scores = read_predictions(run.cell.folder)
            if labels is None:
                labels, reference_run = run_labels, run
            elif run_labels.shape != labels.shape or not np.array_equal(run_labels, labels):
                raise UserError(f"{run.cell.folder} and {reference_run.cell.folder} list different test labels; a "
                                "paired test needs the same test images in the same order (same data file, no "
                                "--max_eval_samples on the test split)")
            scores[key].append(run_scores)
    result = paired_bootstrap(labels, task, scores["a"], scores["b"], n_resamples)
    return Comparison(method_a.name, method_b.name, result["difference"], result["low"], result["high"],
                      result["p_value"], len(method_a.runs), len(method_b.runs), len(labels), result["resamples"])


def baseline_of(method: Method, methods: list[Method], baseline: dict) -> Method | None:
    """The method with the baseline's values on the baseline's axes and ``method``'s on the others
    (same data set, size, ...); None for the baseline itself or when that method has no finished run."""
    wanted = {**{axis: value.label for axis, value in method.values.items()},
              **{axis: value.label for axis, value in baseline.items()}}
    if wanted == {axis: value.label for axis, value in method.values.items()}:
        return None
    for other in methods:
        if {axis: value.label for axis, value in other.values.items()} == wanted:
            return other
    return None


def baseline_comparisons(grid: Grid, methods: list[Method], n_resamples: int) -> tuple[list[Comparison], list[str]]:
    comparisons, problems = [], []
    if not grid.baseline:
        return comparisons, problems
    for method in methods:
        baseline = baseline_of(method, methods, grid.baseline)
        if baseline is None:
            continue
        try:
            comparisons.append(compare(method, baseline, n_resamples))
        except UserError as error:
            problems.append(f"{method.name} vs {baseline.name}: {error}")
    return comparisons, problems


# --- writing the table and the figure ---------------------------------------------------------

def _number(value, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _mean_std(mean: float, std: float) -> str:
    return _number(mean) if math.isnan(std) else f"{_number(mean)} ± {_number(std)}"


def _p(value: float) -> str:
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def sections(methods: list[Method]) -> dict[tuple[str, int], list[Method]]:
    """Methods by (data set, size), in grid order: one table and one panel each."""
    grouped: dict[tuple[str, int], list[Method]] = {}
    for method in methods:
        grouped.setdefault((method.dataset, method.size), []).append(method)
    return grouped


def csv_rows(grid: Grid, methods: list[Method], comparisons: list[Comparison]) -> list[dict]:
    axis_names = [axis.name for axis in grid.axes if axis.name != SEED_AXIS]
    by_method = {comparison.method_a: comparison for comparison in comparisons}
    rows = []
    for (dataset, size), members in sections(methods).items():
        for method in members:
            summary = summarise(method)
            comparison = by_method.get(method.name)
            rows.append({
                "dataset": dataset, "size": size, "method": method.name, "kind": "ours", "source": "this study",
                **{axis: method.values[axis].label for axis in axis_names},
                "n_runs": summary["n"], "seeds": " ".join(method.seeds),
                "val_auc_mean": summary["val_auc_mean"], "val_auc_std": summary["val_auc_std"],
                "test_auc_mean": summary["auc_mean"], "test_auc_std": summary["auc_std"],
                "test_acc_mean": summary["acc_mean"], "test_acc_std": summary["acc_std"],
                "test_auc_ci95_low_mean": summary["ci_low_mean"], "test_auc_ci95_high_mean": summary["ci_high_mean"],
                "baseline": comparison.method_b if comparison else "",
                "auc_diff_vs_baseline": comparison.difference if comparison else "",
                "auc_diff_ci95_low": comparison.low if comparison else "",
                "auc_diff_ci95_high": comparison.high if comparison else "",
                "auc_diff_p_value": comparison.p_value if comparison else "",
            })
        for row in reference_rows(dataset):
            rows.append({"dataset": dataset, "size": "", "method": row["method"], "kind": QUOTED,
                         "source": f"quoted: {row['source']}", **{axis: "" for axis in axis_names},
                         "n_runs": "", "seeds": "", "val_auc_mean": "", "val_auc_std": "", "test_auc_mean": row["auc"], "test_auc_std": "",
                         "test_acc_mean": "" if row["acc"] is None else row["acc"], "test_acc_std": "",
                         "test_auc_ci95_low_mean": "", "test_auc_ci95_high_mean": "", "baseline": "",
                         "auc_diff_vs_baseline": "", "auc_diff_ci95_low": "", "auc_diff_ci95_high": "",
                         "auc_diff_p_value": ""})
    return rows


def _csv_value(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: _csv_value(value) for key, value in row.items()} for row in rows)
    return buffer.getvalue()


def _markdown(columns: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def markdown_text(grid: Grid, methods: list[Method], missing: list[str], comparisons: list[Comparison],
                  problems: list[str], n_resamples: int) -> str:
    finished = len(grid.cells) - len(missing)
    lines = [f"# Study results: `{grid.path}`", ""]
    if grid.description:
        lines += [grid.description.strip(), ""]
    lines += [f"Made by `hf-medbeit study {grid.path}` ({finished} of {len(grid.cells)} cells finished"
              + (f"; not finished: {', '.join(missing)}" if missing else "") + "). Each cell's config is "
              f"`{grid.root}/<cell>.yaml` and its run folder `{grid.root}/<cell>/`.", ""]
    lines += ["Ours: mean ± sample std (ddof=1) over the n runs (seeds) of each method, test split, model "
              "selected by validation AUC (the val AUC column: the selected checkpoint's, the only column to choose "
              "between methods on). The CI column is the mean over runs of each run's bootstrap 95% "
              "interval of its test AUC (test images resampled). Rows marked *quoted* are published numbers, "
              "copied with their source, not rerun here.", ""]
    for (dataset, size), members in sections(methods).items():
        lines += [f"## {dataset} ({size}x{size})", ""]
        rows = []
        for method in members:
            summary = summarise(method)
            rows.append([f"`{method.name}`", summary["n"], _mean_std(summary["val_auc_mean"], summary["val_auc_std"]),
                         _mean_std(summary["auc_mean"], summary["auc_std"]),
                         _mean_std(summary["acc_mean"], summary["acc_std"]),
                         f"{_number(summary['ci_low_mean'])}-{_number(summary['ci_high_mean'])}", "ours"])
        for row in reference_rows(dataset):
            rows.append([f"{row['method']} *(quoted)*", "-", "-", _number(row["auc"]), _number(row["acc"]), "-",
                         f"quoted: {row['source']}"])
        lines += _markdown(["method", "n", "val AUC", "test AUC", "test ACC", "test AUC 95% CI (mean of runs)", "source"], rows)
        lines.append("")
        section_comparisons = [c for c in comparisons if any(m.name == c.method_a for m in members)]
        if section_comparisons:
            lines += [f"Paired bootstrap against the baseline ({', '.join(f'{axis}={value.label}' for axis, value in grid.baseline.items())}): "
                      f"difference of mean test AUC over runs, the same {n_resamples} stratified resamples of the "
                      "test images for every run of both methods; two-sided p.", ""]
            lines += _markdown(["method", "baseline", "ΔAUC", "95% CI", "p", "runs", "test images"], [
                [f"`{c.method_a}`", f"`{c.method_b}`", _signed(c.difference), f"{_signed(c.low)} to {_signed(c.high)}",
                 _p(c.p_value), f"{c.runs_a} vs {c.runs_b}", c.images] for c in section_comparisons])
            lines.append("")
    for problem in problems:
        lines.append(f"- No paired test for {problem}")
    if problems:
        lines.append("")
    if grid.notes:
        lines += ["## Notes", ""] + [f"- {' '.join(note.split())}" for note in grid.notes] + [""]
    lines += ["## Sources of the quoted rows", ""]
    medmnist_v2 = json.loads(MEDMNIST_V2_TABLE.read_text())
    study = json.loads(STUDY_REFERENCE_TABLE.read_text())
    lines.append(f"- MedMNIST v2: {medmnist_v2['source']}, {medmnist_v2['source_url']}. {medmnist_v2['protocol']}.")
    for source in study["sources"].values():
        lines.append(f"- {source['name']}: {source['citation']}. {source['protocol']}.")
    return "\n".join(lines) + "\n"


def plot(path: Path, methods: list[Method]) -> None:
    """Test AUC per method: mean ± std over seeds (error bar), each run (small dots), and the
    quoted references (grey diamonds) on their own rows; one panel per data set and size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = sections(methods)
    heights = [len(members) + len(reference_rows(dataset)) for (dataset, _), members in grouped.items()]
    figure, axes = plt.subplots(len(grouped), 1, figsize=(8, 0.32 * sum(heights) + 1.4 * len(grouped)),
                                gridspec_kw={"height_ratios": heights}, squeeze=False)
    for axis, ((dataset, size), members) in zip(axes[:, 0], grouped.items()):
        labels = []
        for position, method in enumerate(members):
            summary = summarise(method)
            std = 0.0 if math.isnan(summary["auc_std"]) else summary["auc_std"]
            axis.errorbar(summary["auc_mean"], position, xerr=std, fmt="o", color="tab:blue", capsize=4,
                          label="ours: mean ± std over seeds" if position == 0 else None)
            axis.scatter(summary["auc_runs"], [position] * summary["n"], s=12, color="tab:blue", alpha=0.35,
                         label="ours: single runs" if position == 0 else None)
            labels.append(f"{method.name} (n={summary['n']})")
        references = reference_rows(dataset)
        for offset, row in enumerate(references):
            axis.scatter(row["auc"], len(members) + offset, marker="D", color="grey",
                         label="quoted reference" if offset == 0 else None)
            labels.append(f"{row['method']} [quoted: {row['source'].split(' (')[0]}]")
        axis.set_yticks(range(len(labels)), labels, fontsize=8)
        axis.invert_yaxis()
        axis.axhline(len(members) - 0.5, color="lightgrey", linewidth=0.8)
        axis.grid(axis="x", alpha=0.3)
        axis.set_xlabel("test AUC")
        axis.set_title(f"{dataset} ({size}x{size}): test AUC", fontsize=10)
        axis.legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)


def write_results(grid: Grid, n_resamples: int = 2000) -> list[Path]:
    """results.md, results.csv and results_auc.png in the study's folder, from its finished cells."""
    methods, missing = collect(grid)
    if not methods:
        raise UserError(f"no cell of {grid.path} has finished yet (none of its {len(grid.cells)} run folders in "
                        f"{grid.root} holds all_results.json); run hf-medbeit study {grid.path} first")
    comparisons, problems = baseline_comparisons(grid, methods, n_resamples)
    for problem in problems:
        print(f"hf-medbeit: no paired test for {problem}", file=sys.stderr)
    paths = [grid.root / TABLE_MARKDOWN, grid.root / TABLE_CSV, grid.root / FIGURE]
    markdown = markdown_text(grid, methods, missing, comparisons, problems, n_resamples)
    table = csv_text(csv_rows(grid, methods, comparisons))
    plot(paths[2], methods)
    for path, text in zip(paths, (markdown, table)):
        with atomic_path(path) as temporary:
            temporary.write_text(text)
    return paths


def compare_command(grid: Grid, name_a: str, name_b: str, n_resamples: int = 2000) -> Comparison:
    methods, _ = collect(grid)
    by_name = {method.name: method for method in methods}
    for name in (name_a, name_b):
        if name not in by_name:
            known = ", ".join(by_name) or "none yet"
            raise UserError(f"no finished method {name!r} in {grid.path}; the methods with finished runs are: {known}")
    comparison = compare(by_name[name_a], by_name[name_b], n_resamples)
    print(f"{name_a} - {name_b}: test AUC difference {_signed(comparison.difference)} "
          f"(95% CI {_signed(comparison.low)} to {_signed(comparison.high)}), two-sided p = {_p(comparison.p_value)}")
    print(f"  mean AUC over {comparison.runs_a} vs {comparison.runs_b} runs; paired bootstrap over the same "
          f"{comparison.images} test images, {comparison.resamples} stratified resamples (seed {BOOTSTRAP_SEED})")
    return comparison
