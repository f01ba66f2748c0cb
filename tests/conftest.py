"""Shared fixtures: the official BreastMNIST file, synthetic MedMNIST files, a tiny BEiT."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from medmnist import INFO

# Never reach for the network in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"  # breastmnist.npz: the official file (see BREASTMNIST_ATTRIBUTION.md)
BREASTMNIST_MD5 = "750601b1f35ba3300ea97c75c52ff8f6"
# A BEiT small enough to train on 2 CPU cores in seconds: 28x28 input, 4x4 patches.
TINY_BEIT = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,image_size=28,patch_size=4"


def two_cpu_processes(*train_args: str, script: str = "train.py") -> tuple[list[str], dict]:
    """``accelerate launch`` of scripts/train.py in 2 CPU processes (configs/accelerate/cpu_2proc.yaml):
    the command and its environment. accelerate starts them through torchrun, so nothing outside
    Python is needed (no MPI)."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"),
        str(REPO / "scripts" / script), *train_args,
    ]
    return command, {**os.environ, "PYTHONUNBUFFERED": "1"}


def write_medmnist_npz(path: Path, flag: str, size: int = 28, counts=(40, 10, 20), seed: int = 0) -> Path:
    """A synthetic file in MedMNIST's exact format: uint8 images (N, S, S[, 3]), uint8 labels (N, K)."""
    info = INFO[flag]
    rng = np.random.default_rng(seed)
    num_labels = len(info["label"])
    multi_label = info["task"] == "multi-label, binary-class"
    arrays = {}
    for prefix, count in zip(("train", "val", "test"), counts):
        shape = (count, size, size) if info["n_channels"] == 1 else (count, size, size, 3)
        arrays[f"{prefix}_images"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        if multi_label:
            labels = rng.integers(0, 2, size=(count, num_labels)).astype(np.uint8)
            labels[:2] = 1  # every finding has positives and negatives
            labels[2:4] = 0
        else:
            labels = (np.arange(count) % num_labels).reshape(count, 1).astype(np.uint8)
            rng.shuffle(labels)
        arrays[f"{prefix}_labels"] = labels
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def npz_name(flag: str, size: int) -> str:
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


@pytest.fixture
def synthetic_root(tmp_path):
    """A function (flag, size, **kw) -> data root holding a synthetic file for that data set."""

    def make(flag: str, size: int = 28, **kwargs) -> Path:
        root = tmp_path / "medmnist"
        write_medmnist_npz(root / npz_name(flag, size), flag, size, **kwargs)
        return root

    return make


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "dataset_cache"


@pytest.fixture
def breast_root(tmp_path):
    """A data root with a copy of the official BreastMNIST file (tests may damage their copy)."""
    root = tmp_path / "medmnist_official"
    root.mkdir()
    shutil.copy(DATA / "breastmnist.npz", root / "breastmnist.npz")
    return root


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `hf-medbeit ...` as a user would, in a subprocess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "hf_medbeit.cli", *args],
        cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def assert_one_line_error(result, *fragments):
    """One ``hf-medbeit: error:`` line holding every fragment, exit status 2 (bad input), no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("hf-medbeit: error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def assert_nothing_written(out, cache):
    assert not out.exists(), f"{out} must not be created"
    if cache.exists():
        assert not any(cache.iterdir()), f"no cache entry for bad data: {list(cache.iterdir())}"
