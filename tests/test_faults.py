"""Faults injected for real: SIGKILL mid-run, Ctrl-C and SIGTERM, a full disk, a read-only disk,
a crash while writing results. Each run is a subprocess of the real command."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import numpy as np
from transformers.trainer_utils import PredictionOutput

from hf_medbeit import outputs
from hf_medbeit.arguments import ARGUMENT_CLASSES
from hf_medbeit.data import get_spec
from hf_medbeit.finetune import write_run_outputs
from hf_medbeit.outputs import atomic_path, write_json

from conftest import DATA, REPO, TINY_BEIT, run_cli, two_cpu_processes

pytestmark = pytest.mark.e2e

# 40 optimizer steps, evaluated and saved every 10: slow enough to be killed mid-run, fast enough for CI.
RUN = (
    "--dataset_name", "breastmnist", "--data_dir", str(DATA), "--model_type", "beit", "--config_overrides", TINY_BEIT,
    "--max_steps", "40", "--per_device_train_batch_size", "16", "--learning_rate", "1e-3",
    "--eval_strategy", "steps", "--eval_steps", "10", "--save_strategy", "steps", "--save_steps", "10",
    "--save_total_limit", "2", "--report_to", "none", "--explain_per_class", "0", "--disable_tqdm", "true",
    # One log line per step on stdout: the tests inject each fault at a chosen step.
    "--logging_steps", "1",
)
VOLATILE = ("runtime", "per_second", "wall_time", "best_model_checkpoint", "total_flos", "git_commit")
# Trainer's summary `train_loss` averages only the steps run since the last (re)start; the model,
# the metrics and the predictions are what must match.
RESUME_VOLATILE = VOLATILE + ("train_loss",)


def fault_step(low: int, high: int) -> int:
    """A step in [low, high] at which to inject a fault, drawn from a fresh seed that is printed
    (pytest shows it with a failure); HF_MEDBEIT_FAULT_SEED=<seed> draws the same step again."""
    seed = int(os.environ.get("HF_MEDBEIT_FAULT_SEED") or random.SystemRandom().randrange(2**32))
    step = random.Random(seed).randint(low, high)
    print(f"fault at step {step}: replay with HF_MEDBEIT_FAULT_SEED={seed}")
    return step


def train_command(out: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hf_medbeit.cli", "train", *RUN, "--output_dir", str(out),
            "--dataset_cache_dir", str(cache), *extra]


def start(out: Path, cache: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(train_command(out, cache, *extra), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def finish(out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(train_command(out, cache, *extra), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_until_step(process: subprocess.Popen, step: int, timeout: float = 300) -> None:
    """Read the run's per-step log lines until optimizer step ``step`` has been logged."""
    deadline = time.time() + timeout
    logged = 0
    for line in process.stdout:
        if line.startswith("{'loss'"):
            logged += 1
            if logged >= step:
                return
        if time.time() > deadline:
            break
    process.kill()
    raise AssertionError(f"the run ended or stalled after {logged} logged steps, before step {step}: "
                         f"exit {process.wait()}, {process.stderr.read()[-3000:]}")


def comparable(results: dict, volatile=VOLATILE) -> dict:
    return {key: value for key, value in results.items() if not any(mark in key for mark in volatile)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run with the seed: what every resumed run must end with."""
    root = tmp_path_factory.mktemp("reference")
    finish(root / "run", root / "cache")
    return root / "run"


def assert_same_run(run: Path, reference: Path, resumed: bool = True) -> None:
    assert (run / "test_predictions.csv").read_bytes() == (reference / "test_predictions.csv").read_bytes()
    volatile = RESUME_VOLATILE if resumed else VOLATILE
    ours = comparable(json.loads((run / "all_results.json").read_text()), volatile)
    theirs = comparable(json.loads((reference / "all_results.json").read_text()), volatile)
    assert ours == theirs


def test_same_seed_gives_identical_numbers(tmp_path, reference):
    finish(tmp_path / "run", tmp_path / "cache")
    assert_same_run(tmp_path / "run", reference, resumed=False)


def test_run_folder_records_how_to_repeat_it(reference):
    from transformers import HfArgumentParser

    config = json.loads((reference / "run_config.json").read_text())
    model_args, data_args, training_args = HfArgumentParser(ARGUMENT_CLASSES).parse_dict(config, allow_extra_keys=False)
    assert (data_args.dataset_name, model_args.config_overrides, training_args.max_steps) == ("breastmnist", TINY_BEIT, 40)
    assert training_args.seed == 42 and training_args.output_dir == str(reference)
    results = json.loads((reference / "all_results.json").read_text())
    assert results["data_md5"] == "750601b1f35ba3300ea97c75c52ff8f6"
    assert {"torch", "transformers", "datasets", "medmnist", "numpy", "python"} <= set(results["framework_versions"])
    assert "git_commit" in results  # None outside a git checkout


def test_sigkill_then_same_command_resumes_to_the_same_result(tmp_path, reference):
    out, cache = tmp_path / "run", tmp_path / "cache"
    process = start(out, cache)
    step = fault_step(12, 38)  # after the first checkpoint (step 10), before the end (40)
    run_until_step(process, step)
    process.kill()  # SIGKILL: no handler runs
    process.wait()
    assert not (out / "all_results.json").exists(), f"the kill at step {step} came too late to test anything"
    print(f"killed at step {step}; left: {sorted(p.name for p in out.iterdir())}")
    result = finish(out, cache)
    assert "Resuming from" in result.stdout
    assert_same_run(out, reference)


def test_interrupted_save_is_not_resumed_from(tmp_path, reference):
    """A checkpoint cut short by a kill (no trainer_state.json) is removed; the run resumes from the one before."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    process = start(out, cache)
    run_until_step(process, 22)
    process.kill()
    process.wait()
    broken = out / "checkpoint-30"
    broken.mkdir(exist_ok=True)
    (broken / "model.safetensors").write_bytes(b"half a file")
    (broken / "trainer_state.json").unlink(missing_ok=True)
    result = finish(out, cache)
    assert "Resuming from" in result.stdout and "checkpoint-20" in result.stdout
    assert_same_run(out, reference)


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_saves_a_checkpoint_and_says_how_to_resume(tmp_path, reference, signum, code):
    out, cache = tmp_path / "run", tmp_path / "cache"
    process = start(out, cache)
    run_until_step(process, fault_step(12, 38))
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == code, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("hf-medbeit:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert lines[0].startswith("hf-medbeit: stopped: interrupted at step") and "run the same command again to resume" in lines[0]
    step = int(lines[0].split("interrupted at step ")[1].split(";")[0])
    assert f"checkpoint-{step}" in lines[0]
    assert (out / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert not (out / "all_results.json").exists()
    finish(out, cache)
    assert_same_run(out, reference)


def _mount_tmpfs(path: Path, size: str, read_only: bool = False) -> None:
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True, capture_output=True)


@pytest.fixture
def tmpfs(tmp_path):
    """Small real file systems (root only, as CI runs): a full disk is a real ENOSPC, not a mock."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; CI runs as root")
    mounts = []

    def mount(name: str, size: str, read_only: bool = False) -> Path:
        path = tmp_path / name
        _mount_tmpfs(path, size, read_only)
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_disk_too_small_is_found_before_training(tmp_path, tmpfs):
    disk = tmpfs("small", "300k")
    result = run_cli("train", *RUN, "--output_dir", str(disk / "run"), "--dataset_cache_dir", str(tmp_path / "cache"))
    assert result.returncode == 2
    line = [l for l in result.stderr.splitlines() if l.startswith("hf-medbeit:")][0]
    assert "GiB free but this run needs about" in line and "--save_total_limit" in line
    assert not list((disk / "run").glob("checkpoint-*"))


def test_read_only_output_dir_is_found_before_training(tmp_path, tmpfs):
    disk = tmpfs("readonly", "1m", read_only=True)
    result = run_cli("train", *RUN, "--output_dir", str(disk / "run"), "--dataset_cache_dir", str(tmp_path / "cache"))
    assert result.returncode == 2
    assert "cannot write to --output_dir" in result.stderr and "Read-only file system" in result.stderr


def test_disk_filling_up_mid_run_names_the_last_good_checkpoint(tmp_path, tmpfs, reference):
    disk = tmpfs("disk", "24m")
    out, cache = disk / "run", tmp_path / "cache"
    process = start(out, cache)
    run_until_step(process, 12)
    filler = disk / "filler"
    with open(filler, "wb") as handle:  # another job takes the rest of the disk
        try:
            while True:
                handle.write(b"\0" * (1 << 16))
                handle.flush()
        except OSError:
            pass
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr[-3000:]
    line = [l for l in stderr.splitlines() if l.startswith("hf-medbeit:")][-1]
    assert line.startswith(f"hf-medbeit: error: could not write to {out}")
    assert "the last good checkpoint is" in line and "run the same command again to resume" in line
    named = Path(line.split("the last good checkpoint is ")[1].split(";")[0])
    assert (named / "trainer_state.json").is_file()
    filler.unlink()
    finish(out, cache)
    assert_same_run(out, reference)


def test_a_crash_while_writing_leaves_the_old_file_or_none(tmp_path):
    target = tmp_path / "all_results.json"
    with pytest.raises(TypeError):
        write_json(target, {"test_auc": object()})  # not serialisable: fails mid-write
    assert not target.exists() and not list(tmp_path.iterdir())
    write_json(target, {"test_auc": 0.9})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text('{"test_auc": 0.')
            raise RuntimeError("killed here")
    assert json.loads(target.read_text()) == {"test_auc": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["all_results.json"]


RUN_OUTPUTS = (outputs.RUN_CONFIG_FILE, outputs.PREDICTIONS_FILE, outputs.CONFUSION_FILE, outputs.CONFUSION_PLOT,
               outputs.ROC_PLOT, outputs.RESULTS_FILE)


def write_test_outputs(folder: Path) -> None:
    """``write_run_outputs`` as the recipe calls it at the end of a run: 40 test images of BreastMNIST."""
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    logits = rng.normal(size=(40, 2))
    logits[np.arange(40), labels] += 1.0
    write_run_outputs(str(folder), get_spec("breastmnist", 28), PredictionOutput(logits, labels, {}),
                      {"test_auc": 0.75, "test_acc": 0.7}, {"seed": 42})


class Killed(BaseException):
    """The process dying mid-write: no ``except Exception`` clean-up (Pillow's, for one) sees it."""


class FailingFile:
    """An open file whose first write gets half its data to the disk, then fails with ``fault``."""

    def __init__(self, file, fault: str):
        self._file, self._fault = file, fault

    def write(self, data):
        self._file.write(data[: len(data) // 2])
        self._file.flush()
        if self._fault == "killed":
            raise Killed(self._file.name)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._file.name)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._file.close()


@pytest.fixture(scope="module")
def complete_outputs(tmp_path_factory):
    """The run outputs written without a fault (they are deterministic, PNGs included)."""
    complete = tmp_path_factory.mktemp("complete_outputs")
    write_test_outputs(complete)
    assert sorted(path.name for path in complete.iterdir()) == sorted(RUN_OUTPUTS)
    return complete


@pytest.mark.parametrize("fault", ["disk full", "killed"])
@pytest.mark.parametrize("failing", RUN_OUTPUTS)
def test_a_result_file_cut_short_leaves_no_half_file_and_no_all_results(tmp_path, monkeypatch, complete_outputs,
                                                                        failing, fault):
    """The disk fills up, or the process dies, while one result file is being written. Whatever
    writes it (json, csv, matplotlib through Pillow), what is left must be whole files only, byte
    for byte those of a complete write, and no all_results.json (which would mark the run finished)."""
    real_open = io.open

    def open_that_fails(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        writing = any(flag in mode for flag in "wax+")
        return FailingFile(handle, fault) if writing and failing in os.fspath(file) else handle

    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setattr(builtins, "open", open_that_fails)
    monkeypatch.setattr(io, "open", open_that_fails)  # pathlib's write_text opens through io.open
    with pytest.raises((OSError, Killed)) as failure:
        write_test_outputs(run)
    monkeypatch.undo()
    assert failure.type is (Killed if fault == "killed" else OSError), failure.value
    left = sorted(path.name for path in run.iterdir())
    assert failing not in left and outputs.RESULTS_FILE not in left, left
    temporaries = [name for name in left if name not in RUN_OUTPUTS]
    if fault == "disk full":
        assert not temporaries, "a failed write must clean up after itself"
    assert all(name.startswith(".") for name in temporaries), "a kill may leave a hidden temporary, nothing else"
    for name in set(left) & set(RUN_OUTPUTS):
        assert (run / name).read_bytes() == (complete_outputs / name).read_bytes(), f"{name} is not whole"


def test_benchmark_skips_missing_and_corrupt_runs(tmp_path, reference):
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoint-10").mkdir(parents=True)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "all_results.json").write_text('{"test_auc": 0.')
    result = run_cli("benchmark", str(reference), str(unfinished), str(corrupt), "--output", str(tmp_path / "table.md"))
    assert result.returncode == 0, result.stderr
    assert f"skipped {unfinished}: no all_results.json" in result.stderr
    assert f"skipped {corrupt}: all_results.json is corrupt" in result.stderr
    table = (tmp_path / "table.md").read_text().splitlines()
    assert len(table) == 3 and "breastmnist (28)" in table[2]
    nothing = run_cli("benchmark", str(unfinished), str(corrupt))
    assert nothing.returncode == 2 and "nothing to tabulate" in nothing.stderr


def _pid_of_rank(rank: int, marker: str, timeout: float = 120) -> int:
    """The process of rank ``rank`` (torchrun's RANK) whose command line holds ``marker`` (found through /proc)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if marker.encode() not in (entry / "cmdline").read_bytes():
                    continue
                environment = (entry / "environ").read_bytes().split(b"\0")
            except OSError:  # gone, or not ours to read
                continue
            if f"RANK={rank}".encode() in environment:
                return int(entry.name)
        time.sleep(0.5)
    raise AssertionError(f"no process of rank {rank} running {marker}")


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    """Under accelerate launch, a signal that reaches one process only must not leave the other
    waiting forever in the next collective: both stop at the same step, after one checkpoint."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    command, env = two_cpu_processes(*RUN, "--output_dir", str(out), "--dataset_cache_dir", str(cache))
    # Its own session, so that a failed test can kill the launcher, torchrun and both ranks at once.
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        run_until_step(process, fault_step(12, 30))
        os.kill(_pid_of_rank(1, str(out)), signal.SIGTERM)  # rank 1 only; rank 0 logs the steps
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        raise AssertionError("the run hung after one of its two processes got SIGTERM") from None
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    output = stdout + stderr
    assert process.returncode != 0, output[-3000:]
    assert "Another process received SIGTERM" in output, output[-3000:]  # rank 0 learnt it from rank 1
    steps = {int(line.split("interrupted at step ")[1].split(";")[0])
             for line in output.splitlines() if line.startswith("hf-medbeit: stopped: interrupted at step")}
    assert len(steps) == 1, output[-3000:]  # one step, whichever process said it
    (step,) = steps
    assert (out / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert not (out / "all_results.json").exists()

    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "Resuming from" in result.stdout + result.stderr
    results = json.loads((out / "all_results.json").read_text())
    assert results["hyperparameters"]["world_size"] == 2
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 40
