"""One tiny BEiT trained on the official BreastMNIST file, shared by the publishing tests.

Training takes seconds, but the card, predict and Hub tests all need a finished run folder, so it
is trained once per test session (through the real command, in a subprocess) and then only read.
Tests that change a run folder copy it first (``copy_run``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import DATA, TINY_BEIT, run_cli

_CACHE: dict[str, Path] = {}


def trained_run(tmp_path_factory) -> Path:
    if "run" not in _CACHE:
        base = tmp_path_factory.mktemp("tiny_breast_run")
        run_dir = base / "run"
        result = run_cli(
            "train", "--dataset_name", "breastmnist", "--data_dir", str(DATA),
            "--dataset_cache_dir", str(base / "cache"), "--model_type", "beit", "--config_overrides", TINY_BEIT,
            "--output_dir", str(run_dir), "--num_train_epochs", "2", "--learning_rate", "1e-3",
            "--balancing", "weighted_loss", "--report_to", "none", "--explain_per_class", "0",
            env={"HF_HUB_OFFLINE": "1"},
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        _CACHE["run"] = run_dir
    return _CACHE["run"]


def copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest
