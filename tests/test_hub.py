"""Pushing to and loading from the Hub, against the Hub double on 127.0.0.1 (no network needed).

The commands run in subprocesses with ``HF_ENDPOINT`` pointing at the double, as a user's would;
the failure cases call ``hub.push_run`` in-process with huggingface_hub's constants patched.
"""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard, constants

from conftest import DATA, TINY_BEIT, run_cli
from hf_medbeit import hub, outputs
from hf_medbeit.errors import UserError
from hub_double import HubDouble
from tiny_run import copy_run, trained_run

TOKEN = "hf_TESTtokenThatMustNeverBeWritten0123456789"
N_IMAGES = 8
ATOL = 2e-5


@pytest.fixture(scope="module")
def double():
    with HubDouble(TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory)


def hub_env(double: HubDouble, home: Path, token: str | None = TOKEN) -> dict:
    env = {
        "HF_ENDPOINT": double.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HOME": str(home),  # empty cache and no saved login
        "HF_TOKEN": token or "",
    }
    return env


def user_env(double: HubDouble, tmp_path: Path, token: str | None = TOKEN) -> tuple[dict, Path]:
    """A user whose home, Hugging Face home, temporary folder and working folder all lie in
    ``tmp_path``, so that a test can look at every file the command wrote. Returns the
    environment and the working folder."""
    home, work, temporary = tmp_path / "user_home", tmp_path / "cwd", tmp_path / "tmp"
    for folder in (home, work, temporary):
        folder.mkdir(exist_ok=True)
    env = hub_env(double, home / ".cache" / "huggingface", token)  # where HF_HOME is by default
    env.update(HOME=str(home), TMPDIR=str(temporary), XDG_CACHE_HOME=str(home / ".cache"),
               XDG_CONFIG_HOME=str(home / ".config"))
    return env, work


def assert_no_file_holds_the_token(folder: Path) -> None:
    """Not the run folder, not $HF_HOME/token nor huggingface_hub's stored tokens, not HOME or
    the working folder: the token lives in memory only."""
    secret = TOKEN.encode()
    files = [path for path in folder.rglob("*") if path.is_file()]
    assert files, f"nothing was written under {folder}"
    written = [str(path) for path in files if secret in path.read_bytes()]
    assert not written, f"token written to {written}"


@pytest.fixture
def in_process_hub(double, monkeypatch, tmp_path):
    """Point this process's huggingface_hub at the double."""
    monkeypatch.setattr(constants, "ENDPOINT", double.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    return double


def snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_token_nowhere(folder: Path, double: HubDouble) -> None:
    secret = TOKEN.encode()
    for path in folder.rglob("*"):
        if path.is_file():
            assert secret not in path.read_bytes(), f"token written to {path}"
    for request in double.received:
        assert secret not in request.body, f"token sent in the body of {request.method} {request.path}"
        for key, value in request.headers.items():
            if key.lower() != "authorization":
                assert TOKEN not in value, f"token sent in header {key}"
    for repo in double.repos.values():
        for files in repo.commits.values():
            for name, stored in files.items():
                assert secret not in stored.content, f"token committed in {name}"


def expected_scores(run: Path, count: int = N_IMAGES) -> np.ndarray:
    with open(run / outputs.PREDICTIONS_FILE, newline="") as handle:
        rows = list(csv.DictReader(handle))[:count]
    return np.array([[float(value) for key, value in row.items() if key.startswith("score_")] for row in rows])


LOAD_SCRIPT = """
import json, sys
import numpy as np, torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline
repo, out = sys.argv[1], sys.argv[2]
images = [Image.fromarray(a, mode="L") for a in np.load(sys.argv[3])["test_images"][:int(sys.argv[4])]]
classifier = pipeline("image-classification", model=repo, device="cpu")
names = [classifier.model.config.id2label[i] for i in range(classifier.model.config.num_labels)]
by_pipeline = [[{r["label"]: r["score"] for r in classifier(image, top_k=None)}[n] for n in names] for image in images]
model = AutoModelForImageClassification.from_pretrained(repo).eval()
processor = AutoImageProcessor.from_pretrained(repo)
with torch.inference_mode():
    logits = model(**processor([i.convert("RGB") for i in images], return_tensors="pt")).logits
images[0].save(out + ".png")
from hf_medbeit.predict import main as predict
predict(["--model", repo, out + ".png", "--output", out + ".csv"])  # hf-medbeit predict with a Hub id
by_command = [float(v) for v in open(out + ".csv").read().splitlines()[1].split(",")[-len(names):]]
json.dump({"pipeline": by_pipeline, "from_pretrained": torch.softmax(logits, -1).tolist(), "command": by_command,
           "names": names}, open(out, "w"))
"""


def load_from_double(double: HubDouble, repo_id: str, tmp_path: Path) -> dict:
    out = tmp_path / "loaded.json"
    env = {**__import__("os").environ, **hub_env(double, tmp_path / "reader_home"), "HF_TOKEN": TOKEN}
    result = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, repo_id, str(out), str(DATA / "breastmnist.npz"), str(N_IMAGES)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_train_with_push_to_hub_round_trip(double, tmp_path):
    """--push_to_hub: one push of the finished run (no checkpoint pushes), token kept out of every
    file; the model loads back from the 'Hub' with pipeline and gives the run's own test scores."""
    run = tmp_path / "pushed_run"
    env, work = user_env(double, tmp_path, token=None)  # the token comes from --hub_token only
    result = run_cli(
        "train", "--dataset_name", "breastmnist", "--data_dir", str(DATA), "--dataset_cache_dir", str(tmp_path / "cache"),
        "--model_type", "beit", "--config_overrides", TINY_BEIT, "--output_dir", str(run), "--num_train_epochs", "2",
        "--learning_rate", "1e-3", "--balancing", "weighted_loss", "--report_to", "none", "--explain_per_class", "0",
        "--push_to_hub", "--hub_model_id", "user/tiny-beit-breastmnist", "--hub_token", TOKEN,
        env=env, cwd=work,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert TOKEN not in result.stdout + result.stderr  # not in the logs either
    assert (run / "checkpoint-18").is_dir()  # checkpoints exist locally...
    files = double.files("user/tiny-beit-breastmnist")
    assert double.commit_count("user/tiny-beit-breastmnist") == 1  # ...but were never pushed
    assert not [name for name in files if name.startswith("checkpoint-") or name.endswith((".bin", ".pt", ".pth"))]
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", outputs.RESULTS_FILE,
            outputs.ROC_PLOT, outputs.CONFUSION_PLOT, outputs.PREDICTIONS_FILE} <= set(files)
    assert files["model.safetensors"] == (run / "model.safetensors").read_bytes()  # went through LFS
    card = ModelCard(files["README.md"].decode())
    assert card.data.model_name == "user/tiny-beit-breastmnist"
    assert 'model="user/tiny-beit-breastmnist"' in card.content
    assert {r.metric_type for r in card.data.eval_results} == {"roc_auc", "accuracy"}
    assert_token_nowhere(run, double)

    loaded = load_from_double(double, "user/tiny-beit-breastmnist", tmp_path)
    expected = expected_scores(run)
    np.testing.assert_allclose(loaded["pipeline"], expected, atol=ATOL)
    np.testing.assert_allclose(loaded["from_pretrained"], expected, atol=ATOL)
    np.testing.assert_allclose(loaded["command"], expected[0], atol=ATOL)
    assert_no_file_holds_the_token(tmp_path)  # the run, the cache, HOME, HF_HOME, TMPDIR, the working folder


def test_push_command_uploads_run_and_leaves_it_untouched(double, run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / "run")
    before = snapshot(run)
    env, work = user_env(double, tmp_path)  # the token comes from HF_TOKEN
    result = run_cli("push", str(run), "--repo-id", "someone/pushed-later", "--private", "--revision", "v1",
                     env=env, cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pushed" in result.stdout
    assert snapshot(run) == before
    repo = double.repos["someone/pushed-later"]
    assert repo.private
    files = double.files("someone/pushed-later", "v1")
    assert "model.safetensors" in files and "training_args.bin" not in files
    assert not [name for name in files if "checkpoint-" in name or name.endswith((".pt", ".pth"))]
    assert double.files("someone/pushed-later", "main") == {}  # only the branch got the commit
    assert_token_nowhere(run, double)
    assert_no_file_holds_the_token(tmp_path)  # the run, HOME, HF_HOME, TMPDIR, the working folder


def test_push_with_wrong_token_fails_in_one_line(double, run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / "run")
    before = snapshot(run)
    env = hub_env(double, tmp_path / "home", token="hf_wrongTokenXXXXXXXXXXXXXXXXXXXXXXXX")
    result = run_cli("push", str(run), "--repo-id", "someone/never-created", env=env)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("hf-medbeit: error: push of") and "401" in last and "run folder is unchanged" in last
    assert "Traceback" not in result.stderr
    assert "someone/never-created" not in double.repos
    assert snapshot(run) == before


def test_failed_commit_then_rerun_completes(in_process_hub, run_dir, tmp_path):
    double = in_process_hub
    run = copy_run(run_dir, tmp_path / "run")
    before = snapshot(run)
    double.fail_next[r"POST /api/models/.*/commit/"] = 500
    with pytest.raises(UserError, match="server error") as failure:
        hub.push_run(run, "someone/flaky")
    assert "\n" not in str(failure.value)
    assert snapshot(run) == before
    assert double.files("someone/flaky") == {}  # nothing committed; LFS objects were uploaded
    hub.push_run(run, "someone/flaky")  # running it again completes the push
    assert double.files("someone/flaky")["model.safetensors"] == (run / "model.safetensors").read_bytes()
    # Pushing an unchanged run again is harmless (no new files, no error).
    hub.push_run(run, "someone/flaky")
    assert snapshot(run) == before


def test_push_without_network_or_token_is_a_one_line_error(in_process_hub, run_dir, monkeypatch, tmp_path):
    import socket

    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed}")
    with pytest.raises(UserError, match="could not reach the Hub"):
        hub.push_run(run_dir, "someone/offline")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        hub.push_run(run_dir, "someone/offline")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(UserError, match="no Hugging Face token"):
        hub.push_run(run_dir, "someone/offline")
    with pytest.raises(UserError, match="USER/NAME"):
        hub.push_run(run_dir, "no-namespace", token=TOKEN)
    with pytest.raises(UserError, match="not a finished run"):
        hub.push_run(tmp_path, "someone/empty", token=TOKEN)


def test_take_push_settings_strips_the_token():
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir="x", push_to_hub=True, hub_model_id="user/model", hub_token=TOKEN, report_to="none")
    settings = hub.take_push_settings(args)
    assert settings.repo_id == "user/model" and settings.token == TOKEN
    assert args.push_to_hub is False and args.hub_token is None
    assert TOKEN not in repr(settings)
    args = TrainingArguments(output_dir="x", push_to_hub=True, report_to="none")
    with pytest.raises(UserError, match="--hub_model_id"):
        hub.take_push_settings(args)


def test_files_to_push_leaves_out_training_state(run_dir):
    names = hub.files_to_push(run_dir)
    assert "model.safetensors" in names and "config.json" in names
    assert not [n for n in names if n.startswith("checkpoint-") or n in ("training_args.bin",) or n.startswith(".")]


def test_a_pretraining_run_is_pushed_with_its_codebook_and_card_and_fine_tuned_from_its_hub_id(in_process_hub, tmp_path):
    """hf-medbeit push publishes a pretrain folder (weights, codebook, its own card); fine-tuning
    from the Hub id then names that id as the base model."""
    from hf_medbeit import pretrain

    run = tmp_path / "pretrained"
    pretrain.main(["--sources", "breastmnist", "--data_dir", str(DATA), "--dataset_cache_dir", str(tmp_path / "cache"),
                   "--config_overrides", TINY_BEIT.replace(",image_size=28", "") + ",use_relative_position_bias=true",
                   "--codebook_size", "16", "--codebook_fit_images", "100", "--max_steps", "2", "--output_dir", str(run),
                   "--report_to", "none", "--disable_tqdm", "true"])
    before = snapshot(run)
    hub.push_run(run, "user/beit-mim-tiny")
    assert snapshot(run) == before  # the folder is only read
    files = in_process_hub.files("user/beit-mim-tiny")
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "codebook.safetensors", "README.md",
            outputs.RESULTS_FILE, "pretraining_loss.png"} <= set(files)
    assert not [name for name in files if name.startswith("checkpoint-") or name.endswith(".bin")]
    card = ModelCard(files["README.md"].decode())
    assert card.data.pipeline_tag == "image-feature-extraction"
    assert "hf-medbeit train --model_name_or_path user/beit-mim-tiny" in card.content

    # Fine-tuning from the Hub id, as a user would (a subprocess pointed at the double).
    env, work = user_env(in_process_hub, tmp_path)
    result = run_cli(
        "train", "--model_name_or_path", "user/beit-mim-tiny", "--dataset_name", "breastmnist", "--data_dir", str(DATA),
        "--dataset_cache_dir", str(tmp_path / "cache"), "--max_steps", "2", "--output_dir", str(tmp_path / "ft"),
        "--report_to", "none", "--explain_per_class", "0", "--disable_tqdm", "true", env=env, cwd=work,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "ft" / outputs.RESULTS_FILE).read_text())
    assert results["base_model"] == "user/beit-mim-tiny"
    assert "base_model: user/beit-mim-tiny" in (tmp_path / "ft" / "README.md").read_text()
