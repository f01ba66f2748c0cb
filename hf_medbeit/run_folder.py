"""A run folder: where a run's files go, and whether a command may start, resume or must refuse.

The rule is "decide first, touch later": ``resolve`` only reads the folder and decides; nothing
is created or deleted until ``claim``, which the recipe calls once its data and model have
loaded. A folder is this project's when it holds the marker file that ``claim`` writes. Only in
such a folder is anything ever deleted (a checkpoint whose save a kill cut short); a folder the
user made, with files of their own, is refused, whatever it holds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import UserError
from .outputs import RESULTS_FILE, write_json
from .resilience import WRITE_PROBE_PREFIX, is_complete_checkpoint, last_complete_checkpoint

logger = logging.getLogger(__name__)

MARKER_FILE = ".hf_medbeit_run.json"
# What Trainer writes into output_dir during training, besides checkpoints; a folder of only
# these (and checkpoint-*) is a run of an hf_medbeit version from before the marker file.
TRAINER_FILES = {"runs"}
# The arguments that make a run what it is: resuming with any of them changed would mix two
# experiments in one folder (and one model card).
IDENTITY_ARGUMENTS = (
    "model_name_or_path", "model_type", "config_name", "config_overrides", "image_size", "resample",
    "trainable_top_layers", "dataset_name", "size",
    "balancing", "balance_ratio", "max_train_samples", "augment", "seed",
)


@dataclass
class RunFolder:
    path: str
    resume_from: str | None  # the checkpoint to resume from, or None for a new run
    existed: bool  # the folder was there before this command


def resolve(output_dir: str, identity: dict, explicit_checkpoint: str | None = None, kind: str = "train") -> RunFolder:
    """Decide what to do with ``output_dir`` without touching it.

    New (absent or empty) -> start; a finished run -> refuse; this project's unfinished run ->
    resume from its last complete checkpoint (or start again if it has none), provided it was
    started with the same ``identity`` arguments by the same command (``kind``: train, pretrain);
    anything else -> refuse.
    """
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--output_dir {output_dir} is a file, not a folder; choose another --output_dir")
    if explicit_checkpoint:
        return RunFolder(output_dir, explicit_checkpoint, folder.exists())
    if not folder.exists():
        return RunFolder(output_dir, None, False)
    entries = sorted(entry.name for entry in folder.iterdir())
    if not entries:
        return RunFolder(output_dir, None, True)
    if RESULTS_FILE in entries:
        raise UserError(f"{output_dir} already holds a finished run ({RESULTS_FILE}); pass another --output_dir or delete it")
    checkpoints = [name for name in entries if name.startswith("checkpoint-")]
    if MARKER_FILE in entries:
        _check_same_run(folder, identity, kind)
    else:
        foreign = [name for name in entries if name not in checkpoints and name not in TRAINER_FILES]
        incomplete = [name for name in checkpoints if not is_complete_checkpoint(str(folder / name))]
        if foreign or not checkpoints:
            shown = ", ".join(foreign[:3] or entries[:3])
            raise UserError(f"{output_dir} is not empty ({shown}) and is not an hf-medbeit run folder; "
                            "pass another --output_dir, or empty it yourself")
        if incomplete:
            raise UserError(f"{output_dir} has an incomplete checkpoint ({incomplete[0]}: no trainer_state.json) "
                            "and no hf-medbeit marker, so it is left as it is; delete that checkpoint yourself "
                            "to resume, or pass another --output_dir")
    last = last_complete_checkpoint(output_dir)
    if last is not None:
        logger.info("Resuming from %s (delete %s to start over)", last, output_dir)
    return RunFolder(output_dir, last, True)


def claim(run: RunFolder, identity: dict, kind: str = "train") -> None:
    """Create the folder (if new), mark it as this project's, and remove checkpoints of this
    project's that a kill cut short (they would mislead Trainer's resume and rotation)."""
    marker = Path(run.path) / MARKER_FILE
    try:
        os.makedirs(run.path, exist_ok=True)
        if not marker.exists():
            write_json(marker, {"kind": kind, "hf_medbeit_version": __version__, "identity": identity})
    except OSError as error:
        raise UserError(f"cannot write to --output_dir {run.path} ({error.strerror or error}); "
                        "choose a writable folder") from error
    last_complete_checkpoint(run.path, remove_incomplete=True)


@contextlib.contextmanager
def in_use(run: RunFolder, identity: dict, is_main_process: bool = True, kind: str = "train"):
    """The folder is this run's for the block: claimed at the start; if the block fails before
    anything of value was written, a folder this command created is removed again."""
    try:
        if is_main_process:
            claim(run, identity, kind)
        yield run
    except BaseException:
        if is_main_process:
            release_if_unused(run)
        raise


def release_if_unused(run: RunFolder) -> None:
    """After a failure before the first checkpoint: remove a folder this command created and that
    holds nothing of value (only the marker and Trainer's log folder), so no empty run is left."""
    folder = Path(run.path)
    if run.existed or not folder.is_dir():
        return
    if all(entry.name in {MARKER_FILE, *TRAINER_FILES} or entry.name.startswith(WRITE_PROBE_PREFIX)
           for entry in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)


def _check_same_run(folder: Path, identity: dict, kind: str = "train") -> None:
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
        recorded = marker.get("identity", {})
        recorded_kind = marker.get("kind", "train")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{folder / MARKER_FILE} is damaged; pass another --output_dir") from None
    if recorded_kind != kind:
        raise UserError(f"{folder} holds an unfinished `hf-medbeit {recorded_kind}` run, not a {kind} run; resume it with "
                        f"hf-medbeit {recorded_kind}, or pass another --output_dir")
    changed = [name for name in recorded if recorded[name] != identity.get(name)]
    if changed:
        details = ", ".join(f"--{name} {recorded[name]!r} then, {identity.get(name)!r} now" for name in changed)
        raise UserError(f"{folder} holds an unfinished run with other arguments ({details}); resume it with the same "
                        "arguments, or pass another --output_dir")


def check_checkpoint_fits(model, checkpoint: str) -> None:
    """Refuse to resume from a checkpoint whose weights do not fit ``model`` (another config),
    instead of failing deep inside Trainer with a ``size mismatch`` traceback."""
    from safetensors import safe_open
    from transformers.utils import SAFE_WEIGHTS_NAME

    weights = Path(checkpoint) / SAFE_WEIGHTS_NAME
    if not weights.is_file():
        return  # not ours to judge (sharded or another format): Trainer reports it
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    with safe_open(str(weights), framework="pt") as handle:
        saved = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    mismatched = [name for name in saved if name in expected and saved[name] != expected[name]]
    # Names alone may differ a little (tied or non-persistent tensors); none in common is another model.
    unrelated = not set(saved) & set(expected)
    if mismatched or unrelated:
        what = (f"{mismatched[0]} is {saved[mismatched[0]]} there but {expected[mismatched[0]]} in this model"
                if mismatched else "none of its weight names are this model's")
        raise UserError(f"cannot resume from {checkpoint}: it was saved by a model with another config ({what}); "
                        "resume with the model arguments of that run, or pass another --output_dir")


def identity_of(*argument_objects, names=IDENTITY_ARGUMENTS) -> dict:
    """The ``names`` arguments' values, from the argument dataclasses (the last one wins)."""
    values = {}
    for arguments in argument_objects:
        values.update(vars(arguments))
    return {name: values.get(name) for name in names}
