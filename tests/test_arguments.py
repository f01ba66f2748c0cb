"""Config files and flags as people write them: a file plus overriding flags, values as papers
write them, and one clear line (exit 2, nothing written) for every mistake, before any data or
model is loaded."""

from __future__ import annotations

import json

import pytest
import yaml

from hf_medbeit.arguments import parse_args
from hf_medbeit.errors import UserError

from conftest import DATA, REPO, TINY_BEIT, assert_one_line_error, run_cli

QUICK = ("--data_dir", str(DATA), "--model_type", "beit", "--config_overrides", TINY_BEIT, "--report_to", "none")


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_flags_after_a_config_file_override_it():
    model_args, data_args, training_args = parse_args([str(REPO / "configs" / "quickstart.yaml"),
                                                       "--num_train_epochs", "60", "--seed", "7"])
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    assert training_args.num_train_epochs == 60 and training_args.seed == 7
    # everything else still comes from the file
    assert data_args.dataset_name == config["dataset_name"]
    assert training_args.learning_rate == pytest.approx(float(config["learning_rate"]))


@pytest.mark.parametrize("written, expected", [("1e-3", 1e-3), ("3e-4", 3e-4), ("1.0e-3", 1e-3), ("0.01", 0.01), ("2", 2.0)])
def test_learning_rate_written_as_papers_write_it_is_a_float(tmp_path, written, expected):
    config = write(tmp_path, "run.yaml", f"learning_rate: {written}\nweight_decay: {written}\n")
    _, _, training_args = parse_args([str(config)])
    assert isinstance(training_args.learning_rate, float) and training_args.learning_rate == pytest.approx(expected)
    assert isinstance(training_args.weight_decay, float)


def test_yaml_no_for_a_strategy_is_the_word_no_not_false(tmp_path):
    config = write(tmp_path, "run.yaml", "eval_strategy: no\n")  # YAML 1.1 reads `no` as False
    with pytest.raises(UserError, match="--eval_strategy no: the best checkpoint is chosen by validation AUC"):
        parse_args([str(config)])


def test_booleans_and_choices_in_a_file_are_checked(tmp_path):
    _, data_args, _ = parse_args([str(write(tmp_path, "a.yaml", "augment: 'true'\nbalancing: weighted_loss\n"))])
    assert data_args.augment is True and data_args.balancing == "weighted_loss"
    with pytest.raises(UserError, match="balancing: 'equal' is not one of none, weighted_loss"):
        parse_args([str(write(tmp_path, "b.yaml", "balancing: equal\n"))])
    with pytest.raises(UserError, match="per_device_train_batch_size: 2.5 must be a whole number"):
        parse_args([str(write(tmp_path, "c.yaml", "per_device_train_batch_size: 2.5\n"))])


def test_masked_token_in_a_saved_run_config_is_not_read_as_a_token(tmp_path):
    config = write(tmp_path, "run_config.json", json.dumps({"hub_token": "<HUB_TOKEN>", "seed": 3}))
    _, _, training_args = parse_args([str(config)])
    assert training_args.hub_token is None and training_args.seed == 3


# --- The mistakes, as the user meets them: the real command, in a subprocess -----------------

BAD_FILES = {
    "empty.yaml": ("", "is empty"),
    "list.yaml": ("- dataset_name\n- breastmnist\n", "holds a list, not a mapping"),
    "scalar.yaml": ("breastmnist\n", "holds a single value, not a mapping"),
    "syntax.yaml": ("dataset_name: [breastmnist\n", "is not valid YAML"),
    "syntax.json": ('{"dataset_name": ', "is not valid JSON"),
    "misspelled.yaml": ("learnig_rate: 0.001\n", "unknown key 'learnig_rate' (did you mean --learning_rate?)"),
    "badvalue.yaml": ("learning_rate: fast\n", "learning_rate: 'fast' is not a valid value"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_broken_config_file_is_a_user_error_naming_the_file(tmp_path, name):
    text, fragment = BAD_FILES[name]
    config = write(tmp_path, name, text)
    with pytest.raises(UserError) as error:
        parse_args([str(config), "--output_dir", str(tmp_path / "out")])
    assert str(config) in str(error.value) and fragment in str(error.value)
    assert "\n" not in str(error.value)


# As the user meets them: one broken file of each kind through the real command (the others take
# the same path, checked in-process above, which costs no interpreter start each).
@pytest.mark.parametrize("name", ["syntax.yaml", "misspelled.yaml", "list.yaml"])
def test_a_broken_config_file_is_one_line_naming_the_file(tmp_path, name):
    text, fragment = BAD_FILES[name]
    config = write(tmp_path, name, text)
    result = run_cli("train", str(config), "--output_dir", str(tmp_path / "out"))
    assert_one_line_error(result, str(config), fragment)
    assert not (tmp_path / "out").exists()


BAD_FLAGS = {
    "misspelled flag": (("--learnig_rate", "1e-3"), "unknown argument --learnig_rate (did you mean --learning_rate?)"),
    "not a number": (("--learning_rate", "fast"), "invalid float value: 'fast'"),
    "zero epochs": (("--num_train_epochs", "0"), "--num_train_epochs 0 trains nothing"),
    "negative epochs": (("--num_train_epochs", "-1"), "--num_train_epochs -1 trains nothing"),
    "batch size 0": (("--per_device_train_batch_size", "0"), "--per_device_train_batch_size 0 must be 1 or more"),
    "eval batch size 0": (("--per_device_eval_batch_size", "0"), "--per_device_eval_batch_size 0 must be 1 or more"),
    "no training images": (("--max_train_samples", "0"), "--max_train_samples 0 leaves no images"),
    "no validation images": (("--max_eval_samples", "0"), "--max_eval_samples 0 leaves no images"),
    "negative learning rate": (("--learning_rate", "-0.001"), "--learning_rate -0.001 must be positive"),
    "no evaluation": (("--eval_strategy", "no"), "--eval_strategy no: the best checkpoint is chosen by validation AUC"),
    "ratio for many classes": (("--dataset_name", "bloodmnist", "--balancing", "undersample", "--balance_ratio", "0.6"),
                               "--balance_ratio applies to binary tasks; bloodmnist has 8 classes"),
    "ratio below half": (("--balancing", "undersample", "--balance_ratio", "0.3"), "--balance_ratio 0.3 must be"),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_a_bad_flag_is_a_user_error(tmp_path, case):
    flags, fragment = BAD_FLAGS[case]
    with pytest.raises(UserError) as error:
        parse_args([*QUICK, "--output_dir", str(tmp_path / "out"), *flags])
    assert fragment in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("case", ["misspelled flag", "not a number", "zero epochs", "no validation images", "no evaluation"])
def test_a_bad_flag_is_one_line_before_anything_is_loaded(tmp_path, case):
    flags, fragment = BAD_FLAGS[case]
    out, cache = tmp_path / "out", tmp_path / "cache"
    result = run_cli("train", *QUICK, "--dataset_cache_dir", str(cache), "--output_dir", str(out), *flags)
    assert_one_line_error(result, fragment)
    assert not out.exists() and not cache.exists()  # failed before the data was even read


def test_bad_flag_after_a_config_file_is_one_line(tmp_path):
    result = run_cli("train", str(REPO / "configs" / "quickstart.yaml"), "--num_train_epochs", "0",
                     "--output_dir", str(tmp_path / "out"))
    assert_one_line_error(result, "--num_train_epochs 0 trains nothing")
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_a_config_file_plus_flags_trains_and_its_run_config_reruns_it(tmp_path):
    """The quick-start way of working: a file as people write it (lr 1e-3), flags that override it,
    and the finished run's run_config.json rerun elsewhere, as the refusal message suggests."""
    config = write(tmp_path, "run.yaml", yaml.safe_dump({
        "dataset_name": "breastmnist", "data_dir": str(DATA), "dataset_cache_dir": str(tmp_path / "cache"),
        "model_type": "beit", "config_overrides": TINY_BEIT, "report_to": "none", "num_train_epochs": 5,
    }) + "learning_rate: 1e-3\n")
    first = tmp_path / "first"
    result = run_cli("train", str(config), "--max_steps", "2", "--output_dir", str(first))
    assert result.returncode == 0, result.stderr[-3000:]
    recorded = json.loads((first / "run_config.json").read_text())
    assert recorded["learning_rate"] == 1e-3 and recorded["max_steps"] == 2

    again = run_cli("train", str(config), "--max_steps", "2", "--output_dir", str(first))
    line = assert_one_line_error(again, "already holds a finished run")

    second = tmp_path / "second"
    rerun = run_cli("train", str(first / "run_config.json"), "--output_dir", str(second))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads((second / "all_results.json").read_text())["test_auc"] == pytest.approx(
        json.loads((first / "all_results.json").read_text())["test_auc"], abs=1e-9)
    assert line  # the refusal named what to do; the rerun did it
