"""Command-line and config-file arguments, parsed the Hugging Face way with ``HfArgumentParser``.

``hf-medbeit train --dataset_name breastmnist ...`` or ``hf-medbeit train configs/x.yaml``: the
same three dataclasses (model, data, ``TrainingArguments``) either way. Unknown keys in a config
file are an error, never silently ignored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from transformers import HfArgumentParser

from .data import BALANCING_METHODS
from .errors import UserError
from .training import MedMNISTTrainingArguments

DEFAULT_CHECKPOINT = "microsoft/beit-base-patch16-224-pt22k-ft22k"


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=DEFAULT_CHECKPOINT,
        metadata={"help": "Checkpoint to fine-tune: a Hub id or a local folder with an image-classification model."},
    )
    model_type: str | None = field(
        default=None,
        metadata={"help": "Train from scratch: a transformers model type (beit, vit, ...) built from its default config."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "With --model_type: config fields as key=value,key=value (e.g. hidden_size=64,num_hidden_layers=2,image_size=28,patch_size=4)."},
    )
    image_processor_name: str | None = field(
        default=None, metadata={"help": "Image processor to use, if not the checkpoint's own."}
    )
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the checkpoint."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache checkpoints from the Hub."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run model code from the Hub repository. Only for repositories you trust."}
    )
    attn_implementation: Literal["sdpa", "eager"] | None = field(
        default=None,
        metadata={"help": "Attention kernel: transformers' default (sdpa) or eager. On an H200 with torch 2.11, "
                  "BEiT-large's SDPA backward failed ('LSE is not correctly aligned'); eager works (benchmarks/README.md)."},
    )
    trainable_top_layers: int | None = field(
        default=None,
        metadata={"help": "Freeze all but the top K transformer blocks, the pooler and the head (the study: K=5 on BEiT-large)."},
    )
    layer_decay: float | None = field(
        default=None,
        metadata={"help": "BEiT's layer-wise learning-rate decay, e.g. 0.65-0.9; off by default."},
    )

    def __post_init__(self):
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise UserError(f"--layer_decay {self.layer_decay} must be in (0, 1]; the BEiT paper uses 0.65 to 0.9")
        if self.config_overrides and not self.model_type:
            raise UserError("--config_overrides needs --model_type (it builds a new model from a config)")


@dataclass
class DataArguments:
    dataset_name: str = field(
        default="breastmnist", metadata={"help": "MedMNIST 2D flag: breastmnist, pneumoniamnist, chestmnist, ..."}
    )
    size: int = field(default=28, metadata={"help": "MedMNIST image size: 28, 64, 128 or 224."})
    data_dir: str | None = field(
        default=None, metadata={"help": "Folder with MedMNIST's .npz files (default: medmnist's own root, ~/.medmnist)."}
    )
    download: bool = field(default=False, metadata={"help": "Download a missing .npz file with medmnist's URL and MD5."})
    skip_md5_check: bool = field(
        default=False, metadata={"help": "Accept a file whose MD5 differs from medmnist.INFO (your own file in MedMNIST's format)."}
    )
    dataset_cache_dir: str | None = field(
        default=None, metadata={"help": "Where the converted DatasetDict is cached (default: under the datasets cache)."}
    )
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={"help": "Processes that convert the .npz into the cached DatasetDict the first time (PNG encoding; "
                  "worth it for large sets at 224, e.g. ChestMNIST). Default: one."},
    )
    balancing: Literal["none", "weighted_loss", "undersample", "oversample"] = field(
        default="none", metadata={"help": "Class balancing of the training split."}
    )
    balance_ratio: float | None = field(
        default=None,
        metadata={"help": "Binary tasks: majority share after resampling (the study: 0.6 BreastMNIST, 0.5 PneumoniaMNIST). Default: equal classes."},
    )
    augment: bool = field(default=False, metadata={"help": "Random resized crop, flip and rotation on the training split."})
    data_path: Literal["fast", "processor"] = field(
        default="fast",
        metadata={"help": "fast: uint8 batches resized and normalised on the training device; processor: the image processor per PIL image in the data loader."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training split (for quick runs)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation split (for quick runs)."})

    def __post_init__(self):
        if self.balancing not in BALANCING_METHODS:
            raise UserError(f"--balancing {self.balancing!r} is not one of {', '.join(BALANCING_METHODS)}")
        if self.balance_ratio is not None and self.balancing not in ("undersample", "oversample"):
            raise UserError("--balance_ratio needs --balancing undersample or oversample")
        if self.preprocessing_num_workers is not None and self.preprocessing_num_workers < 1:
            raise UserError(f"--preprocessing_num_workers must be 1 or more, not {self.preprocessing_num_workers}")


ARGUMENT_CLASSES = (ModelArguments, DataArguments, MedMNISTTrainingArguments)


def parse_args(argv: list[str] | None = None):
    """Parse ``argv`` (or a single .json/.yaml config file) into the three argument dataclasses."""
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    if argv is not None and len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        path = os.path.abspath(argv[0])
        if not os.path.isfile(path):
            raise UserError(f"config file {argv[0]} does not exist; check the path")
        try:
            if path.endswith(".json"):
                return parser.parse_json_file(path, allow_extra_keys=False)
            return parser.parse_yaml_file(path, allow_extra_keys=False)
        except UserError:
            raise
        except (ValueError, TypeError) as error:
            message = str(error).splitlines()[0]
            raise UserError(f"{argv[0]}: {message}; fix or remove those keys (run with --help for the valid ones)") from error
    return parser.parse_args_into_dataclasses(args=argv)
