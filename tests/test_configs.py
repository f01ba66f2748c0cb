"""Every config file in configs/ parses into the argument dataclasses, with no unknown key."""

from __future__ import annotations

import pytest
import yaml

from hf_medbeit.arguments import parse_args, parse_pretrain_args
from hf_medbeit.data import get_spec

from conftest import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "configs" / "study").glob("*.yaml"))
# Study grids (base: + axes:) are not train configs; tests/test_study.py expands them and parses every cell.
CONFIGS = [path for path in CONFIGS if "axes" not in yaml.safe_load(path.read_text())]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path):
    model_args, data_args, training_args = parse_args([str(path)])
    get_spec(data_args.dataset_name, data_args.size)  # a real data set at a real size
    assert training_args.metric_for_best_model == "auc"


def test_study_configs_follow_the_paper():
    _, data_args, training_args = parse_args([str(REPO / "configs/study/beit-large-breastmnist-28-balanced.yaml")])
    model_args, _, _ = parse_args([str(REPO / "configs/study/beit-large-pneumoniamnist-224-balanced.yaml")])
    assert (training_args.per_device_train_batch_size, training_args.weight_decay) == (16, 0.1)
    assert (data_args.balancing, data_args.balance_ratio) == ("undersample", 0.6)
    assert model_args.trainable_top_layers == 5 and "beit-large" in model_args.model_name_or_path


def test_command_line_and_config_agree(tmp_path):
    config = tmp_path / "c.json"
    config.write_text('{"dataset_name": "pneumoniamnist", "size": 64, "learning_rate": 0.001, "output_dir": "x"}')
    from_file = parse_args([str(config)])
    from_cli = parse_args(["--dataset_name", "pneumoniamnist", "--size", "64", "--learning_rate", "0.001", "--output_dir", "x"])
    assert from_file[1] == from_cli[1]
    assert from_file[2].learning_rate == from_cli[2].learning_rate == 0.001


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "pretrain").glob("*.yaml")), ids=lambda p: p.name)
def test_pretrain_config_parses(path, monkeypatch):
    """Every committed pre-training config parses and passes the checks made before any data is
    loaded (its sources are MedMNIST flags or files that exist, relative to the repository root)."""
    monkeypatch.chdir(REPO)
    model_args, data_args, mim_args, training_args = parse_pretrain_args([str(path.relative_to(REPO))])
    assert data_args.sources and training_args.output_dir.startswith("runs/pretrain/")
    assert mim_args.mim_target in {"tokens", "pixels"}
