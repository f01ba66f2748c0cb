"""Command-line and config-file arguments, parsed the Hugging Face way with ``HfArgumentParser``.

``hf-medbeit train --dataset_name breastmnist ...`` or ``hf-medbeit train configs/x.yaml``: the
same three dataclasses (model, data, ``TrainingArguments``) either way. Unknown keys in a config
file are an error, never silently ignored.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
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
    config_name: str | None = field(
        default=None,
        metadata={"help": "Train from scratch: a config.json file, a folder holding one, or a Hub id, as in Hugging Face's "
                  "example scripts (e.g. a TimmWrapperConfig naming any timm architecture)."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "With --model_type or --config_name: config fields as key=value,key=value; values may be lists "
                  "or JSON (e.g. depths=[2,2,2,2],hidden_sizes=[64,128,256,512],layer_type=basic)."},
    )
    image_size: int | None = field(
        default=None,
        metadata={"help": "Models built from a config: resize images to N x N (e.g. 224). Default: the data set's own "
                  "size (28 for MedMNIST 28), or the config's image_size. Never centre-cropped."},
    )
    resample: Literal["nearest", "bilinear", "bicubic"] = field(
        default="bilinear",
        metadata={"help": "Models built from a config: how images are resized to --image_size (MedMNIST v2's 224 rows: nearest)."},
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
    fast_relative_position_bias: bool = field(
        default=True,
        metadata={"help": "BEiT: compute the relative position bias without transformers' same-size resize and "
                  "per-layer host-to-device index copy (same outputs and gradients, bit for bit); "
                  "--no_fast_relative_position_bias runs transformers' code as it is."},
    )

    def __post_init__(self):
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise UserError(f"--layer_decay {self.layer_decay} must be in (0, 1]; the BEiT paper uses 0.65 to 0.9")
        if self.config_overrides and not (self.model_type or self.config_name):
            raise UserError("--config_overrides needs --model_type or --config_name (it builds a new model from a config)")


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
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


def parse_args(argv: list[str] | None = None):
    """Parse ``hf-medbeit train`` arguments into the three argument dataclasses, then check them
    all before any data or model is loaded.

    ``argv`` is flags, or a .json/.yaml config file first and flags after it that override the
    file (``hf-medbeit train configs/quickstart.yaml --num_train_epochs 60``). File values are cast
    to the fields' types, so ``learning_rate: 1e-3`` (a string to PyYAML) works as papers write it.
    Every mistake is a ``UserError`` that names the file or flag.
    """
    model_args, data_args, training_args = parse_command(argv, ARGUMENT_CLASSES, "hf-medbeit train")
    validate(model_args, data_args, training_args)
    return model_args, data_args, training_args


def parse_command(argv: list[str] | None, argument_classes, prog: str) -> list:
    """A config file and/or flags -> one instance per argument dataclass (see ``parse_args``);
    shared by every command that takes Hugging Face style arguments (train, pretrain)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(argument_classes, prog=prog)

    def one_line_error(message: str):  # argparse would print usage and exit; one line instead
        raise UserError(f"{message}; {prog} --help lists the arguments and their values")

    parser.error = one_line_error
    if argv and argv[0].endswith(CONFIG_SUFFIXES):
        config_file = argv.pop(0)
        parser.set_defaults(**_read_config_file(config_file, parser))
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except UserError:
        raise
    except (ValueError, TypeError) as error:  # a dataclass's __post_init__ (ours or TrainingArguments')
        raise UserError(f"{_first_line(error)}; fix that argument ({prog} --help lists them)") from error
    if unknown:
        raise UserError(f"unknown argument {unknown[0]}{_did_you_mean(unknown[0].lstrip('-'), parser)}; "
                        f"{prog} --help lists the valid ones")
    return parsed


def validate(model_args, data_args, training_args) -> None:
    """What would otherwise fail late (after data and model are loaded) or, worse, succeed with a
    meaningless run: an untrained model, an empty split, no model selection."""
    from .data import check_balance_ratio, get_spec

    spec = get_spec(data_args.dataset_name, data_args.size)  # an unknown data set or size, from INFO
    if training_args.max_steps <= 0 and training_args.num_train_epochs <= 0:
        raise UserError(f"--num_train_epochs {training_args.num_train_epochs:g} trains nothing; "
                        "give a positive number of epochs (or --max_steps)")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(training_args, name) < 1:
            raise UserError(f"--{name} {getattr(training_args, name)} must be 1 or more")
    for name in ("max_train_samples", "max_eval_samples"):
        value = getattr(data_args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} {value} leaves no images; give 1 or more, or leave it out for the whole split")
    if not training_args.learning_rate > 0:
        raise UserError(f"--learning_rate {training_args.learning_rate:g} must be positive (the study: 3e-4)")
    if training_args.weight_decay < 0:
        raise UserError(f"--weight_decay {training_args.weight_decay:g} must be 0 or more")
    if training_args.explain_per_class < 0:
        raise UserError(f"--explain_per_class {training_args.explain_per_class} must be 0 (none) or more")
    if model_args.trainable_top_layers is not None and model_args.trainable_top_layers < 0:
        raise UserError(f"--trainable_top_layers {model_args.trainable_top_layers} must be 0 or more")
    if model_args.model_type and model_args.config_name:
        raise UserError(f"--model_type {model_args.model_type} and --config_name {model_args.config_name} both say which "
                        "model to build; keep one of them")
    if model_args.image_size is not None:
        if model_args.image_size < 1:
            raise UserError(f"--image_size {model_args.image_size} must be 1 or more (pixels per side)")
        if not (model_args.model_type or model_args.config_name):
            raise UserError("--image_size applies to models built from a config (--model_type or --config_name); a "
                            "checkpoint keeps its own image processor: drop --image_size or pass --image_processor_name")
    if model_args.model_type or model_args.config_name:
        from .modeling import build_config

        build_config(model_args, spec)  # unknown keys, unreadable values or a missing config file, before any data
    check_balance_ratio(spec, data_args.balancing, data_args.balance_ratio)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0].rstrip(".") if lines else type(error).__name__


def _did_you_mean(name: str, parser) -> str:
    close = difflib.get_close_matches(name, _destinations(parser), n=1)
    return f" (did you mean --{close[0]}?)" if close else ""


def _destinations(parser) -> dict:
    return {action.dest: action for action in parser._actions if action.dest != "help"}


def _read_config_file(config_file: str, parser) -> dict:
    """The file's values as parser defaults: a mapping of known keys, cast to the fields' types."""
    path = Path(config_file)
    if not path.is_file():
        raise UserError(f"config file {config_file} does not exist; check the path")
    try:
        text = path.read_text()
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except OSError as error:
        raise UserError(f"cannot read config file {config_file} ({error.strerror or error})") from error
    except (ValueError, yaml.YAMLError) as error:  # JSONDecodeError is a ValueError
        raise UserError(f"{config_file} is not valid {'JSON' if path.suffix == '.json' else 'YAML'} "
                        f"({' '.join(_first_line(error).split())}); fix its syntax") from error
    if values is None:
        raise UserError(f"{config_file} is empty; write one 'argument: value' per line (see configs/quickstart.yaml)")
    if not isinstance(values, dict):
        kind = "a list" if isinstance(values, list) else "a single value"
        raise UserError(f"{config_file} holds {kind}, not a mapping; write one 'argument: value' "
                        "per line (see configs/quickstart.yaml)")
    actions = _destinations(parser)
    unknown = [key for key in values if key not in actions]
    if unknown:
        raise UserError(f"{config_file}: unknown key {unknown[0]!r}{_did_you_mean(str(unknown[0]), parser)}; "
                        f"fix or remove it ({parser.prog} --help lists the valid ones)")
    cast = {}
    for key, value in values.items():
        if isinstance(value, str) and value == f"<{key.upper()}>":
            continue  # a secret that TrainingArguments.to_dict() masked in run_config.json: not a value
        cast[key] = _cast(config_file, key, value, actions[key])
    return cast


def _cast(config_file: str, key: str, value, action):
    """A file value as the command line would have parsed it: strings through the field's own
    type (``"1e-3"`` -> 0.001, ``"true"`` -> True), other values checked against its choices."""
    if value is None:
        return None  # null in a file: the field's "not set" (run_config.json writes every unset field so)
    if isinstance(value, list) and action.nargs in ("+", "*"):
        return [_cast(config_file, key, item, action) for item in value]
    if isinstance(value, bool) and action.type is str:
        value = "yes" if value else "no"  # YAML 1.1 reads `eval_strategy: no` as False
    if isinstance(value, str) and action.type is not None:
        try:
            value = action.type(value)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
            raise UserError(f"{config_file}: {key}: {value!r} is not a valid value ({_first_line(error)}); "
                            "fix it in the file") from error
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and action.type in (int, float):
        if action.type is int and value != int(value):
            raise UserError(f"{config_file}: {key}: {value} must be a whole number; fix it in the file")
        value = action.type(value)
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{config_file}: {key}: {value!r} is not one of {', '.join(map(str, action.choices))}; "
                        "fix it in the file")
    return value


# ---------------------------------------------------------------------------------------------
# hf-medbeit pretrain
# ---------------------------------------------------------------------------------------------


@dataclass
class PretrainModelArguments:
    """The model pre-trained: always a BEiT (``BeitForMaskedImageModeling``)."""

    config_name: str | None = field(
        default=None, metadata={"help": "A BEiT config.json file or folder to build the model from (default: BeitConfig's defaults)."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "BEiT config fields as key=value,... (e.g. hidden_size=192,num_hidden_layers=6,"
                  "num_attention_heads=3,intermediate_size=768,patch_size=4,use_relative_position_bias=true)."},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Continue pre-training a BEiT masked-image-modeling checkpoint (a pretrain run folder or a Hub "
                  "id such as microsoft/beit-base-patch16-224-pt22k) instead of building one from a config."},
    )
    image_size: int | None = field(
        default=None, metadata={"help": "Resize images to N x N (default: the data's own --size)."}
    )
    resample: Literal["nearest", "bilinear", "bicubic"] = field(
        default="bilinear", metadata={"help": "How images are resized to --image_size."}
    )
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of --model_name_or_path."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache checkpoints from the Hub."})
    attn_implementation: Literal["sdpa", "eager"] | None = field(
        default=None, metadata={"help": "Attention kernel: transformers' default (sdpa) or eager."}
    )
    fast_relative_position_bias: bool = field(
        default=True, metadata={"help": "BEiT: the bit-identical fast relative position bias (see hf-medbeit train --help)."}
    )
    layer_decay: float | None = field(default=None, metadata={"help": "Layer-wise learning-rate decay (off by default)."})

    def __post_init__(self):
        if self.model_name_or_path and (self.config_name or self.config_overrides):
            raise UserError("--model_name_or_path continues a checkpoint; --config_name/--config_overrides build a new "
                            "model: keep one of them")


@dataclass
class PretrainDataArguments:
    sources: list[str] = field(
        default_factory=lambda: ["breastmnist"],
        metadata={"help": "Unlabelled images: MedMNIST 2D flags (their training split only, labels dropped), .npz/.npy "
                  "arrays of images, or folders of image files; several are mixed."},
    )
    source_repeats: list[float] | None = field(
        default=None,
        metadata={"help": "How often each source's images appear per epoch, one number per source (e.g. 4 1: the "
                  "first source 4x, fractions take a random subset). Default: 1 each."},
    )
    size: int = field(default=28, metadata={"help": "MedMNIST image size to read (28, 64, 128, 224); other sources are resized to it."})
    data_dir: str | None = field(
        default=None, metadata={"help": "Folder with MedMNIST's .npz files (default: medmnist's own root, ~/.medmnist)."}
    )
    download: bool = field(default=False, metadata={"help": "Download missing MedMNIST files with medmnist's URL and MD5."})
    skip_md5_check: bool = field(default=False, metadata={"help": "Accept MedMNIST files whose MD5 differs from medmnist.INFO."})
    dataset_cache_dir: str | None = field(default=None, metadata={"help": "Where converted data sets are cached."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for the first conversion."})


@dataclass
class MaskedImageModelingArguments:
    mim_target: Literal["tokens", "pixels"] = field(
        default="tokens",
        metadata={"help": "What masked patches are predicted from: tokens = BEiT's cross-entropy over visual tokens of a "
                  "k-means codebook fitted on the pre-training images; pixels = SimMIM/MAE-style L1 regression of the "
                  "(per-patch normalised) pixels."},
    )
    codebook_size: int = field(default=512, metadata={"help": "tokens: visual vocabulary size (k-means centroids)."})
    codebook_fit_images: int = field(default=20000, metadata={"help": "tokens: images whose patches fit the codebook."})
    normalize_target: bool = field(
        default=True, metadata={"help": "Normalise each patch to zero mean, unit variance before clustering (tokens) or as the regression target (pixels)."}
    )
    masking: Literal["block", "random"] = field(
        default="block", metadata={"help": "block: BEiT's block-wise masking; random: uniformly random patches."}
    )
    mask_ratio: float = field(default=0.4, metadata={"help": "Share of patches masked (BEiT: 75 of 196, about 0.4)."})
    augment: bool = field(default=True, metadata={"help": "Random resized crop and horizontal flip on the device."})
    crop_min_scale: float = field(default=0.5, metadata={"help": "Smallest crop, as a share of the image area."})

    def __post_init__(self):
        if not 0 < self.mask_ratio < 1:
            raise UserError(f"--mask_ratio {self.mask_ratio} must be between 0 and 1 (BEiT: 0.4)")
        if self.codebook_size < 2:
            raise UserError(f"--codebook_size {self.codebook_size} must be 2 or more (e.g. 512)")
        if self.codebook_fit_images < 1:
            raise UserError(f"--codebook_fit_images {self.codebook_fit_images} must be 1 or more")
        if not 0 < self.crop_min_scale <= 1:
            raise UserError(f"--crop_min_scale {self.crop_min_scale} must be in (0, 1]")


def parse_pretrain_args(argv: list[str] | None = None):
    """``hf-medbeit pretrain`` arguments (a config file and/or flags, as ``parse_args``), checked
    before any data or model is loaded."""
    from .training import PretrainingArguments

    model_args, data_args, mim_args, training_args = parse_command(
        argv, (PretrainModelArguments, PretrainDataArguments, MaskedImageModelingArguments, PretrainingArguments),
        "hf-medbeit pretrain",
    )
    validate_pretrain(model_args, data_args, mim_args, training_args)
    return model_args, data_args, mim_args, training_args


def validate_pretrain(model_args, data_args, mim_args, training_args) -> None:
    from .unlabeled import check_sources

    check_sources(data_args.sources, data_args.source_repeats)
    if training_args.max_steps <= 0 and training_args.num_train_epochs <= 0:
        raise UserError(f"--num_train_epochs {training_args.num_train_epochs:g} trains nothing; "
                        "give a positive number of epochs (or --max_steps)")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(training_args, name) < 1:
            raise UserError(f"--{name} {getattr(training_args, name)} must be 1 or more")
    if not training_args.learning_rate > 0:
        raise UserError(f"--learning_rate {training_args.learning_rate:g} must be positive (BEiT: 1.5e-3 at batch 2048)")
    if training_args.weight_decay < 0:
        raise UserError(f"--weight_decay {training_args.weight_decay:g} must be 0 or more")
    if model_args.image_size is not None and model_args.image_size < 1:
        raise UserError(f"--image_size {model_args.image_size} must be 1 or more (pixels per side)")
    if not model_args.model_name_or_path:
        from .modeling import build_pretraining_config

        config = build_pretraining_config(model_args, data_args.size)  # unknown keys or bad values, before any data
        if config.image_size % config.patch_size:
            raise UserError(f"image size {config.image_size} is not a multiple of patch_size={config.patch_size}; "
                            "change --image_size or patch_size in --config_overrides")
