"""Several processes train as one big batch: the first step's gradient under 2 processes equals
the gradient of one process with the same global batch (class-weighted loss included)."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import DATA, TINY_BEIT, run_cli, two_cpu_processes

pytestmark = pytest.mark.e2e

# drop_path_rate=0: stochastic depth draws per process, which would make the gradients differ
# for a reason that has nothing to do with the loss scaling under test.
DETERMINISTIC_BEIT = TINY_BEIT + ",drop_path_rate=0.0"


def first_step(run_dir) -> dict:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return next(entry for entry in state["log_history"] if entry.get("step") == 1 and "grad_norm" in entry)


@pytest.mark.parametrize("balancing", ["weighted_loss", "none"])
def test_two_processes_take_the_same_first_step_as_one_process_with_the_whole_batch(tmp_path, balancing):
    common = (
        "--dataset_name", "breastmnist", "--data_dir", str(DATA), "--dataset_cache_dir", str(tmp_path / "cache"),
        "--model_type", "beit", "--config_overrides", DETERMINISTIC_BEIT, "--balancing", balancing,
        "--max_steps", "1", "--logging_steps", "1", "--eval_strategy", "steps", "--eval_steps", "1",
        "--save_strategy", "steps", "--save_steps", "1", "--report_to", "none", "--explain_per_class", "0", "--disable_tqdm", "true",
    )
    one = run_cli("train", *common, "--per_device_train_batch_size", "16", "--output_dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    command, env = two_cpu_processes(*common, "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "two"))
    two = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]

    single, double = first_step(tmp_path / "one"), first_step(tmp_path / "two")
    assert json.loads((tmp_path / "two" / "all_results.json").read_text())["hyperparameters"]["world_size"] == 2
    # Same 16 images, same weights: the gradient must not depend on how the batch was split. A loss
    # normalised per process instead of by the global count would change its norm.
    assert double["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-4), (single, double)
