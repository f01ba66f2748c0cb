"""Publishing a finished run folder to the Hugging Face Hub.

``push_run`` makes ONE commit holding the model, its image processor, the results, the plots and
a model card that names the repository: ``HfApi.create_repo`` (``exist_ok``), an optional branch for
``--revision``, then ``HfApi.create_commit``. Checkpoint folders, optimizer/scheduler/RNG states
and the pickled ``training_args.bin`` stay local. The run folder is only read, never written: a
push that fails (no network, bad token, server error) leaves it whole, and pushing again
completes the job (the Hub skips files it already holds).

The token comes from where ``huggingface_hub`` always looks (``HF_TOKEN``, ``hf auth login``) or,
for ``--push_to_hub`` during training, from ``--hub_token``; it is kept in memory only. Training
with ``--push_to_hub`` does not let ``Trainer`` push (it would create the repository at start-up
and push every checkpoint): ``take_push_settings`` switches that off and removes the token from
the ``TrainingArguments`` (which ``Trainer`` pickles into ``training_args.bin``); the finished run
is then pushed from the main process with ``push_run``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HFValidationError, HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

from . import outputs
from .errors import UserError

try:  # the HTTP client huggingface_hub uses: httpx2 in 2.x, httpx in 1.x
    import httpx2 as _http
except ImportError:  # pragma: no cover
    import httpx as _http

NETWORK_ERRORS = (_http.HTTPError, OfflineModeIsEnabled, OSError)

logger = logging.getLogger(__name__)

# What a pushed repository leaves out: resumable training state and the pickled arguments.
IGNORE_PATTERNS = [
    "checkpoint-*",
    "checkpoint-*/*",
    "*/checkpoint-*/*",
    "*.pt",
    "*.pth",
    "training_args.bin",  # the pickled TrainingArguments
    ".*",  # hidden files, including atomic-write temporaries
    "*/.*",
    "*.tmp",
    "runs/*",  # TensorBoard event files
]
REQUIRED_FILES = ("config.json", outputs.RESULTS_FILE)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class PushSettings:
    repo_id: str
    private: bool | None = None
    revision: str | None = None
    token: str | None = field(default=None, repr=False)  # never printed


def _check_repo_id(repo_id: str) -> str:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UserError(f"bad repository id {repo_id!r} ({str(error).splitlines()[0]}); use USER/NAME") from error
    if "/" not in repo_id:
        raise UserError(f"repository id {repo_id!r} has no namespace; use USER/NAME (or ORG/NAME)")
    return repo_id


def _resolve_token(token: str | None) -> str:
    token = token or get_token()
    if not token:
        raise UserError("no Hugging Face token found: set HF_TOKEN or run `hf auth login` (a write token is needed to push)")
    return token


def take_push_settings(training_args) -> PushSettings | None:
    """Turn ``Trainer``'s own pushing off and take the Hub settings (and token) out of the arguments.

    Returns what ``push_run`` needs at the end of training, or None without ``--push_to_hub``.
    Always clears ``hub_token``, so it can never reach ``training_args.bin``.
    """
    token = training_args.hub_token
    training_args.hub_token = None
    if not training_args.push_to_hub:
        return None
    training_args.push_to_hub = False
    if not training_args.hub_model_id:
        raise UserError("--push_to_hub needs --hub_model_id USER/NAME (the repository to create or update)")
    settings = PushSettings(
        repo_id=_check_repo_id(training_args.hub_model_id),
        private=training_args.hub_private_repo,
        revision=training_args.hub_revision,
        token=token,
    )
    # Fail before hours of training rather than after them.
    settings.token = _resolve_token(settings.token)
    return settings


def files_to_push(run_dir: Path) -> list[str]:
    """Paths (relative, POSIX) of the files a push uploads, checkpoints and states left out."""
    paths = sorted(path.relative_to(run_dir).as_posix() for path in run_dir.rglob("*") if path.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=IGNORE_PATTERNS))


def _describe_failure(error: Exception, repo_id: str) -> str:
    if isinstance(error, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set; unset it to push"
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        if status == 401:
            return "the Hub rejected the token (401 Unauthorized): set a valid write token in HF_TOKEN or run `hf auth login`"
        if status == 403:
            return f"the token may not write to {repo_id} (403 Forbidden): use a write token with access to that namespace"
        if status == 404:
            return f"{repo_id} or the revision was not found (404)"
        if status >= 500:
            return f"the Hub answered {status} (server error); try again later"
        return f"the Hub answered {status}: {str(error).splitlines()[0]}"
    return f"could not reach the Hub ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'})"


def push_run(
    run_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Push a finished run folder to ``repo_id`` in one commit; returns the commit URL."""
    from .cards import CARD_FILE, render_card

    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run folder {run} does not exist")
    missing = [name for name in REQUIRED_FILES if not (run / name).exists()]
    if missing:
        raise UserError(f"{run} is not a finished run ({', '.join(missing)} missing); train to completion first")
    if not any((run / name).exists() for name in WEIGHT_FILES):
        raise UserError(f"{run} has no model weights ({' or '.join(WEIGHT_FILES[:2])}); nothing to push")
    _check_repo_id(repo_id)
    token = _resolve_token(token)

    # The card names the repository in its snippet; it is rendered in memory, the folder stays as it is.
    card = str(render_card(run, repo_id=repo_id)).encode("utf-8")
    operations = [CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card)]
    operations += [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(run / name))
        for name in files_to_push(run)
        if name != CARD_FILE
    ]
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or f"Upload {run.name} (hf_medbeit run folder)",
            revision=revision,
        )
    except (*NETWORK_ERRORS, RuntimeError, ValueError) as error:
        # LFS uploads wrap their HTTP error in a RuntimeError; report the cause.
        cause = error.__cause__ if isinstance(error, RuntimeError) and isinstance(error.__cause__, NETWORK_ERRORS) else error
        raise UserError(
            f"push of {run} to {repo_id} failed: {_describe_failure(cause, repo_id)}; "
            "the run folder is unchanged, run the push again to complete it"
        ) from error
    logger.info("Pushed %s to %s (%s)", run, url, info.commit_url)
    return info.commit_url


def push_finished_run(run_dir: str, settings: PushSettings | None) -> None:
    """The end of a recipe run with ``--push_to_hub``: push the finished folder; a failed push
    leaves the folder complete and says how to retry."""
    if settings is None:
        return
    try:
        push_run(run_dir, settings.repo_id, private=settings.private, revision=settings.revision, token=settings.token)
    except UserError as error:
        raise UserError(
            f"training finished and {run_dir} is complete, but {error}; "
            f"retry with: hf-medbeit push {run_dir} --repo-id {settings.repo_id}"
        ) from error
