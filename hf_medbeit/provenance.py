"""How a model was made, for its model card and results: hardware, code version, library versions,
the resolved arguments. Shared by every recipe (fine-tuning, pre-training); never the Hub token
(the recipes take it out of the arguments before anything is recorded, see hub.take_push_settings).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

from . import __version__


def describe_hardware(training_args) -> str:
    import torch

    device = training_args.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        name = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    else:
        name = device.type.upper()
    return f"{training_args.world_size} x {name}"


def git_commit() -> str | None:
    """The commit of the hf_medbeit checkout that ran, with "-dirty" if it had local changes."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None  # not a git checkout, or no git: an installed package
    return commit.stdout.strip() + ("-dirty" if dirty else "")


def resolved_config(*argument_objects) -> dict:
    """Every argument of the run, flat, as ``hf-medbeit train|pretrain CONFIG.json`` reads it back."""
    config = {}
    for arguments in argument_objects:
        config.update(arguments.to_dict() if hasattr(arguments, "to_dict") else dataclasses.asdict(arguments))
    return config


def recorded_hyperparameters(training_args, names) -> dict:
    """The training arguments a card shows (enums as their values), plus the derived world size and
    total batch size."""
    hyperparameters = {}
    for name in names:
        value = getattr(training_args, name, None)
        if hasattr(value, "value"):  # enums (optimizer, scheduler, strategies)
            value = value.value
        if value is not None:
            hyperparameters[name] = value
    hyperparameters["world_size"] = training_args.world_size
    hyperparameters["total_train_batch_size"] = (
        training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * training_args.world_size
    )
    return hyperparameters


def framework_versions() -> dict:
    import datasets
    import huggingface_hub
    import numpy as np
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "hf_medbeit": __version__,
        "medmnist": importlib.metadata.version("medmnist"),
        "accelerate": importlib.metadata.version("accelerate"),
        "numpy": np.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "datasets": datasets.__version__,
        "huggingface_hub": huggingface_hub.__version__,
    }
