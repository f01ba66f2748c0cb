"""The run folder: decide first, touch later; never delete what this project did not create."""

from __future__ import annotations

import json
import shutil

import pytest

from hf_medbeit import run_folder
from hf_medbeit.errors import UserError

from conftest import DATA, TINY_BEIT, assert_one_line_error, run_cli

IDENTITY = {"model_type": "beit", "config_overrides": TINY_BEIT, "dataset_name": "breastmnist", "size": 28, "seed": 42}


def complete_checkpoint(folder, step: int):
    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return checkpoint


def half_saved_checkpoint(folder, step: int):
    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"half")  # no trainer_state.json: the save was cut short
    return checkpoint


def test_a_new_folder_is_decided_without_being_created(tmp_path):
    run = run_folder.resolve(str(tmp_path / "new"), IDENTITY)
    assert run.resume_from is None and not run.existed
    assert not (tmp_path / "new").exists()


def test_a_users_folder_with_a_half_checkpoint_is_refused_and_left_untouched(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    half_saved_checkpoint(out, 7)
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    with pytest.raises(UserError, match="is not an hf-medbeit run folder"):
        run_folder.resolve(str(out), IDENTITY)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before


def test_a_half_checkpoint_without_the_marker_is_not_deleted(tmp_path):
    out = tmp_path / "run"
    half_saved_checkpoint(out, 10)
    with pytest.raises(UserError, match="incomplete checkpoint .checkpoint-10.*delete that checkpoint yourself"):
        run_folder.resolve(str(out), IDENTITY)
    assert (out / "checkpoint-10" / "model.safetensors").read_bytes() == b"half"


def test_this_projects_run_killed_before_its_first_checkpoint_starts_again(tmp_path):
    out = tmp_path / "run"
    run_folder.claim(run_folder.resolve(str(out), IDENTITY), IDENTITY)  # as the killed command did
    half_saved_checkpoint(out, 10)
    run = run_folder.resolve(str(out), IDENTITY)
    assert run.resume_from is None
    assert (out / "checkpoint-10").exists()  # resolving touches nothing
    run_folder.claim(run, IDENTITY)
    assert not (out / "checkpoint-10").exists()  # claiming removes this project's half save


def test_this_projects_run_resumes_from_its_last_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    run_folder.claim(run_folder.resolve(str(out), IDENTITY), IDENTITY)
    complete_checkpoint(out, 10)
    half_saved_checkpoint(out, 20)
    run = run_folder.resolve(str(out), IDENTITY)
    assert run.resume_from == str(out / "checkpoint-10")


def test_resuming_with_other_identity_arguments_is_refused(tmp_path):
    out = tmp_path / "run"
    run_folder.claim(run_folder.resolve(str(out), IDENTITY), IDENTITY)
    complete_checkpoint(out, 10)
    other = {**IDENTITY, "dataset_name": "pneumoniamnist", "seed": 1}
    with pytest.raises(UserError, match="--dataset_name 'breastmnist' then, 'pneumoniamnist' now.*--seed 42 then, 1 now"):
        run_folder.resolve(str(out), other)


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        run_folder.resolve(str(path), IDENTITY)


def test_a_failure_before_the_first_checkpoint_removes_only_a_folder_this_command_created(tmp_path):
    new = run_folder.resolve(str(tmp_path / "new"), IDENTITY)
    with pytest.raises(RuntimeError), run_folder.in_use(new, IDENTITY):
        assert (tmp_path / "new" / run_folder.MARKER_FILE).is_file()
        raise RuntimeError("training failed")
    assert not (tmp_path / "new").exists()

    existing_dir = tmp_path / "existing"
    existing_dir.mkdir()
    existing = run_folder.resolve(str(existing_dir), IDENTITY)
    with pytest.raises(RuntimeError), run_folder.in_use(existing, IDENTITY):
        raise RuntimeError("training failed")
    assert existing_dir.is_dir()  # the user made it: it stays

    kept = run_folder.resolve(str(tmp_path / "kept"), IDENTITY)
    with pytest.raises(RuntimeError), run_folder.in_use(kept, IDENTITY):
        complete_checkpoint(tmp_path / "kept", 5)
        raise RuntimeError("failed after a checkpoint")
    assert (tmp_path / "kept" / "checkpoint-5").is_dir()  # something of value: kept for a resume


# --- As the user meets it ------------------------------------------------------------------------

def train(out, cache, *extra):
    return run_cli("train", "--data_dir", str(DATA), "--dataset_cache_dir", str(cache), "--output_dir", str(out),
                   "--model_type", "beit", "--config_overrides", TINY_BEIT, "--report_to", "none", "--explain_per_class", "0", *extra)


@pytest.mark.e2e
def test_the_command_never_deletes_a_users_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    half_saved_checkpoint(out, 7)
    result = train(out, tmp_path / "cache", "--max_steps", "1")
    assert_one_line_error(result, str(out), "is not an hf-medbeit run folder")
    assert "Removing" not in result.stdout + result.stderr
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoint-7" / "model.safetensors").exists()


@pytest.mark.e2e
def test_resuming_with_another_model_config_is_one_line(tmp_path):
    """An unfinished run resumed with other model arguments: refused by the marker's record and,
    for a folder without one (an older version's run), by the checkpoint's weight shapes."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    result = train(out, cache, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1",
                   "--eval_strategy", "steps", "--eval_steps", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copytree(out / "checkpoint-2", unfinished / "checkpoint-2")
    shutil.copy(out / run_folder.MARKER_FILE, unfinished / run_folder.MARKER_FILE)
    wider = TINY_BEIT.replace("hidden_size=32", "hidden_size=48")
    args = ("--data_dir", str(DATA), "--dataset_cache_dir", str(cache), "--model_type", "beit",
            "--config_overrides", wider, "--report_to", "none", "--explain_per_class", "0", "--max_steps", "4")

    marked = run_cli("train", "--output_dir", str(unfinished), *args)
    assert_one_line_error(marked, "holds an unfinished run with other arguments", "--config_overrides")

    (unfinished / run_folder.MARKER_FILE).unlink()
    unmarked = run_cli("train", "--output_dir", str(unfinished), *args)
    assert_one_line_error(unmarked, "cannot resume from", "checkpoint-2", "another config")
    assert sorted(p.name for p in unfinished.iterdir()) == ["checkpoint-2"]
