"""`hf-medbeit benchmark RUN_DIR...`: one results table from finished run folders.

A run folder counts only if its ``all_results.json`` (written last, atomically) is there, parses and
has the test metrics. Any other folder is reported on stderr and skipped, never half-read: an
unfinished or damaged run must not end up in a table beside real ones.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .errors import UserError
from .outputs import UnreadableResults, atomic_path, read_results
from .predict import check_output_file

def _number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def table_row(run_dir: str | Path, results: dict) -> dict:
    recalls = [value for key, value in results.items() if key.startswith("test_recall_") and value is not None]
    interval = results.get("test_auc_ci95") or [None, None]
    model = results.get("model_name_or_path") or (f"{results.get('model_type', '?')} (from config)")
    return {
        "run": Path(run_dir).name,
        "dataset": f"{results['dataset']} ({results['size']})",
        "model": model,
        "balancing": results.get("balancing", "-"),
        "trainable params": f"{results['trainable_parameters']:,}" if "trainable_parameters" in results else "-",
        "test AUC [95% CI]": f"{_number(results['test_auc'])} [{_number(interval[0])}, {_number(interval[1])}]",
        "test ACC": _number(results["test_acc"]),
        "balanced acc": _number(results.get("test_balanced_accuracy")),
        "min class recall": _number(min(recalls)) if recalls else "-",
    }


def markdown_table(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(str(row[column]) for column in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="hf-medbeit benchmark",
        description="Collect finished run folders into one Markdown table of test AUC (with its bootstrap CI), "
        "ACC, balanced accuracy and the lowest per-class recall. Unfinished or damaged runs are reported and skipped.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--output", help="Write the table to this .md file (atomically) instead of stdout.")
    args = parser.parse_args(argv)
    if args.output:
        check_output_file(args.output, example="results.md")  # before any run is read

    rows = []
    for run_dir in args.run_dirs:
        try:
            rows.append(table_row(run_dir, read_results(run_dir)))
        except UnreadableResults as error:
            print(f"hf-medbeit: skipped {run_dir}: {error.reason}", file=sys.stderr)
    if not rows:
        raise UserError(f"none of the {len(args.run_dirs)} folders holds a finished run; nothing to tabulate")
    table = markdown_table(rows)
    if args.output:
        with atomic_path(args.output) as temporary:
            temporary.write_text(table)
    else:
        sys.stdout.write(table)
