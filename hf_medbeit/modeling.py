"""Model and image processor: from a Hub checkpoint or folder, or built from a config.

* ``load_model``: any ``AutoModelForImageClassification`` checkpoint with the data set's class
  names in ``id2label``/``label2id`` (so the Hub widget and ``pipeline`` show them) and a new head
  (``ignore_mismatched_sizes``); or a randomly initialised model built from a config:
  ``--model_type`` (transformers' default config for that type) or ``--config_name`` (a
  ``config.json`` file or folder, or a Hub id, as in Hugging Face's example scripts), either one
  changed by ``--config_overrides``, whose values may be lists or mappings
  (``depths=[2,2,2,2],layer_type=basic``). A BEiT gets the fast relative position bias
  (``relative_position.py``: same outputs and gradients; ``--no_fast_relative_position_bias``).
* ``load_image_processor``: the checkpoint's own processor; for a model built from a config, one
  built here: resize to the input size (the data set's own by default, or ``--image_size``) with
  ``--resample``, no crop, mean and std 0.5 as MedMNIST v2 normalises. It is saved with the model,
  so ``from_pretrained`` and ``pipeline`` see the inputs the model was trained on.
* ``freeze_all_but_top_layers``: the study's partial fine-tuning (BEiT-large, top 5 blocks).
* ``layer_decay_parameter_groups``: BEiT's layer-wise learning-rate decay.
"""

from __future__ import annotations

import json
import logging

import torch
import yaml
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, PretrainedConfig, PreTrainedModel
from transformers.image_utils import PILImageResampling
from transformers.models.auto.image_processing_auto import (
    IMAGE_PROCESSOR_MAPPING_NAMES,
    get_image_processor_class_from_name,
)

from .data import MedMNISTSpec
from .errors import UserError
from .relative_position import use_fast_relative_position_bias

logger = logging.getLogger(__name__)

# Fields a config derives from others (backbone stage names from the depth): dropped from a
# config file before it is rebuilt with overrides, so that they follow the new values.
_DERIVED_FIELDS = ("stage_names", "out_features", "out_indices", "_out_features", "_out_indices")
# What a config file holds that is not an argument of its class's constructor.
_NOT_ARGUMENTS = ("model_type", "transformers_version", "architectures")
# MedMNIST v2 normalises every image with mean 0.5 and std 0.5 (its train_and_eval_pytorch.py).
MEDMNIST_MEAN_STD = [0.5, 0.5, 0.5]
RESAMPLE_MODES = ("nearest", "bilinear", "bicubic")


def label_config(spec: MedMNISTSpec) -> dict:
    """Config fields that make the checkpoint speak the data set's language."""
    return {
        "num_labels": spec.num_labels,
        "id2label": dict(enumerate(spec.label_names)),
        "label2id": {name: index for index, name in enumerate(spec.label_names)},
        # `pipeline` picks softmax or sigmoid from this, so multi-label models score each finding alone.
        "problem_type": "multi_label_classification" if spec.is_multi_label else "single_label_classification",
    }


def builds_from_config(model_args) -> bool:
    """A randomly initialised model from ``--model_type`` or ``--config_name``, not a checkpoint."""
    return bool(model_args.model_type or model_args.config_name)


# ---------------------------------------------------------------------------------------------
# Configs: --model_type / --config_name, changed by --config_overrides
# ---------------------------------------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    """``a=1,b=[1,2],c={"x":1,"y":2}`` -> items split on the commas outside brackets and quotes."""
    items, depth, quote, start = [], 0, None, 0
    for index, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(text[start:index])
            start = index + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def parse_config_overrides(text: str | None) -> dict[str, tuple[str, object]]:
    """``key=value,key=value`` -> {key: (raw text, value)}. Values are read as JSON, else YAML
    (``[2,2,2,2]``, ``{"a": 1}``, ``true``, ``1e-3``, ``basic``); ``PretrainedConfig.update_from_string``
    reads no lists. Raises ``UserError`` on text that is not ``key=value``."""
    overrides = {}
    for item in _split_top_level(text or ""):
        key, equals, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not equals or not key or not raw:
            raise UserError(f"bad --config_overrides item {item!r}: write key=value,key=value, with lists as "
                            "depths=[2,2,2,2]")
        try:
            value = json.loads(raw)
        except ValueError:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as error:
                raise UserError(f"bad --config_overrides value {key}={raw} ({' '.join(str(error).split())[:80]}); "
                                "write lists as [2,2,2,2] and mappings as {\"key\": 1}") from error
        overrides[key] = (raw, value)
    return overrides


def _cast_override(config_class: type, default: PretrainedConfig, key: str, raw: str, value):
    """``value`` as the field's type: a str field keeps the text as written (``layer_type=basic``);
    a bool, number or list field must get one."""
    current = getattr(default, key)
    kind = None
    if isinstance(current, bool):
        kind = "true or false" if not isinstance(value, bool) else None
    elif isinstance(current, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            kind = "a number"
        elif isinstance(current, int) and isinstance(value, float):
            kind = "a whole number" if value != int(value) else None
            value = int(value)
    elif isinstance(current, (list, tuple)):
        kind = "a list such as [2,2,2,2]" if not isinstance(value, list) else None
    elif isinstance(current, str):
        return raw
    if kind:
        raise UserError(f"bad --config_overrides value {key}={raw}: {config_class.__name__}.{key} takes {kind}")
    return value


def _config_source(model_args) -> tuple[type, dict, str]:
    """(config class, the config file's fields, what to call it in messages)."""
    if model_args.model_type:
        try:
            config = AutoConfig.for_model(model_args.model_type)
        except ValueError as error:
            raise UserError(f"unknown --model_type {model_args.model_type!r}: use a transformers model type such as "
                            "beit, vit, resnet or timm_wrapper") from error
        return type(config), {}, f"--model_type {model_args.model_type}"
    name = model_args.config_name
    try:
        fields, _ = PretrainedConfig.get_config_dict(
            name, revision=model_args.model_revision, cache_dir=model_args.cache_dir,
        )
        config_class = type(AutoConfig.for_model(fields["model_type"]))
    except (OSError, ValueError, KeyError) as error:
        reason = "no model_type in it" if isinstance(error, KeyError) else str(error).splitlines()[0]
        raise UserError(f"could not read --config_name {name!r} ({reason}); pass a config.json file or a folder "
                        "holding one, or a reachable Hub id") from error
    return config_class, fields, f"--config_name {name}"


def build_config(model_args, spec: MedMNISTSpec) -> PretrainedConfig:
    """The config of a model built from ``--model_type``/``--config_name`` and ``--config_overrides``,
    with the data set's labels (``spec``) and the input size in ``image_size``."""
    return build_config_for(model_args, label_config(spec), spec.size)


def build_config_for(model_args, labels: dict, native_size: int) -> PretrainedConfig:
    """``build_config`` for any ``labels`` (``label_config``'s fields; none for pre-training) and
    data at ``native_size`` pixels per side.

    The config is built once from all its values, so fields derived from others (BEiT's and
    ResNet's backbone stage names, from the depth) follow the overrides. Every mistake is one
    ``UserError`` naming the key and the config class.
    """
    config_class, fields, source = _config_source(model_args)
    default = config_class()
    values = {key: value for key, value in fields.items() if key not in _NOT_ARGUMENTS + _DERIVED_FIELDS}
    overrides = parse_config_overrides(model_args.config_overrides)
    for key, (raw, value) in overrides.items():
        if not hasattr(default, key):
            raise UserError(f"unknown --config_overrides key {key!r} for {config_class.__name__} ({source}); "
                            f"use one of its fields (transformers' {config_class.__name__} documents them)")
        values[key] = _cast_override(config_class, default, key, raw, value)
    # A timm config file names its classes with num_classes/label_names: the data set's replace them.
    for key in ("num_classes", "label_names"):
        values.pop(key, None)
    values.update(labels)
    values["image_size"] = input_size(model_args, values, native_size, source)
    try:
        return config_class(**values)
    except (ValueError, TypeError, StrictDataclassError) as error:
        # transformers 5 configs are strict dataclasses: the validator's own message is the cause.
        raise UserError(f"bad --config_overrides for {config_class.__name__} ({_first_line(error.__cause__ or error)}); "
                        "fix the value it names") from error


def build_pretraining_config(model_args, native_size: int) -> PretrainedConfig:
    """A BEiT config for masked image modeling from ``--config_name``/``--config_overrides``
    (``hf-medbeit pretrain``): no labels, a mask token, input at ``--image_size`` or ``native_size``."""
    from types import SimpleNamespace

    source = SimpleNamespace(
        model_type=None if model_args.config_name else "beit", config_name=model_args.config_name,
        config_overrides=model_args.config_overrides, image_size=model_args.image_size,
        model_revision=model_args.model_revision, cache_dir=model_args.cache_dir,
    )
    config = build_config_for(source, {}, native_size)
    if config.model_type != "beit":
        raise UserError(f"--config_name {model_args.config_name} is a {config.model_type} config; pre-training "
                        "(masked image modeling) is for BEiT: pass a BEiT config")
    config.use_mask_token = True
    return config


def input_size(model_args, values: dict, native_size: int, source: str) -> int:
    """The side of the square images a config-built model gets: ``--image_size``; else an
    ``image_size`` written in the config file or the overrides (a ViT/BEiT whose position
    embeddings are sized to it); else the data set's own size (native: 28 for MedMNIST 28)."""
    written = values.get("image_size")
    written = written if isinstance(written, int) and not isinstance(written, bool) else None
    if model_args.image_size and written and model_args.image_size != written:
        raise UserError(f"--image_size {model_args.image_size} disagrees with image_size={written} of {source}; "
                        "drop one of them")
    return model_args.image_size or written or native_size


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0].rstrip(".") if lines else type(error).__name__


def _timm_own_initialisation(model: PreTrainedModel) -> None:
    """transformers' generic ``_init_weights`` re-draws a wrapped timm model's convolutions from
    N(0, 0.02) and resets every norm (undoing timm's Kaiming init and zero-init of each residual
    branch's last norm). A model trained from scratch gets timm's own initialisation back."""
    import timm

    config = model.config
    fresh = timm.create_model(config.architecture, pretrained=False, num_classes=config.num_labels,
                              **(config.model_args or {}))
    model.timm_model.load_state_dict(fresh.state_dict())


def load_model(model_args, spec: MedMNISTSpec) -> PreTrainedModel:
    model = _load_model(model_args, spec)
    if model_args.fast_relative_position_bias:
        use_fast_relative_position_bias(model)  # BEiT only; bit-identical, see relative_position.py
    return model


def _load_model(model_args, spec: MedMNISTSpec) -> PreTrainedModel:
    labels = label_config(spec)
    attention = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    if builds_from_config(model_args):
        config = build_config(model_args, spec)
        try:
            model = AutoModelForImageClassification.from_config(config, **attention)
        except (ValueError, TypeError, KeyError, RuntimeError, IndexError, AssertionError, ImportError) as error:
            raise UserError(f"cannot build {type(config).__name__} from these values ({_first_line(error)}); "
                            "check --config_overrides") from error
        if config.model_type == "timm_wrapper":
            _timm_own_initialisation(model)
        logger.info("Training %s from scratch at %dx%d input with config %s", config.model_type,
                    config.image_size, config.image_size, config.to_diff_dict())
        return model
    try:
        return AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path,
            revision=model_args.model_revision,
            cache_dir=model_args.cache_dir,
            trust_remote_code=model_args.trust_remote_code,
            ignore_mismatched_sizes=True,
            **labels,
            **attention,
        )
    except OSError as error:
        raise UserError(
            f"could not load model {model_args.model_name_or_path!r} ({str(error).splitlines()[0]}); pass a local folder "
            "or a reachable Hub id, or --model_type beit --config_overrides ... to train from a config"
        ) from error


def build_image_processor(image_size: int, resample: str = "bilinear"):
    """The processor of a model built from a config: resize to ``image_size`` squared (a no-op at
    the data set's own size), no crop (a centre crop would cut the border of every scan), rescale
    to [0, 1] and normalise with mean and std 0.5 as MedMNIST v2 does. The same for every
    architecture, so a comparison between them differs only in the model."""
    names = IMAGE_PROCESSOR_MAPPING_NAMES["vit"]
    processor_class = get_image_processor_class_from_name(names.get("torchvision") or names["pil"])
    return processor_class(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=PILImageResampling[resample.upper()],
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=MEDMNIST_MEAN_STD,
        image_std=MEDMNIST_MEAN_STD,
    )


def load_image_processor(model_args, model: PreTrainedModel):
    """The processor that goes with the checkpoint (or ``--image_processor_name``); for a model
    built from a config, ``build_image_processor`` at the model's input size."""
    name = model_args.image_processor_name or (None if builds_from_config(model_args) else model_args.model_name_or_path)
    if name:
        try:
            return AutoImageProcessor.from_pretrained(
                name, revision=model_args.model_revision, cache_dir=model_args.cache_dir,
                trust_remote_code=model_args.trust_remote_code,
            )
        except OSError as error:
            raise UserError(f"could not load the image processor of {name!r} ({str(error).splitlines()[0]}); pass --image_processor_name") from error
    return build_image_processor(model.config.image_size, model_args.resample)


# ---------------------------------------------------------------------------------------------
# Partial fine-tuning and layer-wise learning-rate decay
# ---------------------------------------------------------------------------------------------


def _block_stack(model: PreTrainedModel) -> tuple[str, torch.nn.ModuleList]:
    """(path under base_model, blocks): ``layers`` in transformers 5.x BEiT/ViT/DeiT,
    ``encoder.layer`` in older releases and other encoders."""
    for path in ("layers", "encoder.layer"):
        module = model.base_model
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, torch.nn.ModuleList):
            return path, module
    raise UserError(
        f"{type(model).__name__} has no stack of transformer blocks, so --trainable_top_layers and "
        "--layer_decay do not apply to it; drop them, or use BEiT, ViT or DeiT"
    )


def encoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The stack of transformer blocks of a BEiT, ViT, DeiT, Data2Vec-vision... model."""
    return _block_stack(model)[1]


def freeze_all_but_top_layers(model: PreTrainedModel, top_layers: int) -> None:
    """Train only the top ``top_layers`` blocks and what follows them (final norm, pooler, head)."""
    stack_path, layers = _block_stack(model)
    if not 0 <= top_layers <= len(layers):
        raise UserError(
            f"--trainable_top_layers {top_layers} is out of range: {type(model).__name__} has {len(layers)} "
            f"transformer blocks; pass 0..{len(layers)}"
        )
    model.requires_grad_(False)
    for layer in layers[len(layers) - top_layers:]:
        layer.requires_grad_(True)
    base = model.base_model
    stack_owner = stack_path.split(".")[0]
    for name, module in base.named_children():
        if name not in ("embeddings", stack_owner):
            module.requires_grad_(True)  # final layernorm and pooler come after the blocks
    base_ids = {id(parameter) for parameter in base.parameters()}
    for parameter in model.parameters():
        if id(parameter) not in base_ids:
            parameter.requires_grad_(True)  # the classification head


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def layer_id(parameter_name: str, base_prefix: str, stack_path: str, num_layers: int) -> int:
    """BEiT's layer numbering for decay: embeddings 0, block i -> i + 1, all that follows -> L + 1."""
    name = parameter_name.removeprefix(f"{base_prefix}.")
    if name.startswith("embeddings."):
        return 0
    if name.startswith(f"{stack_path}."):
        return int(name[len(stack_path) + 1:].split(".")[0]) + 1
    return num_layers + 1


# BEiT fine-tuning also exempts these from weight decay (besides biases and norms).
_NO_DECAY_MARKERS = ("relative_position_bias_table", "cls_token", "mask_token", "position_embeddings", "lambda_")


def layer_decay_parameter_groups(
    model: PreTrainedModel, decay_names: set[str], learning_rate: float, weight_decay: float, layer_decay: float
) -> list[dict]:
    """Optimizer parameter groups with lr * layer_decay ** (L + 1 - layer_id).

    ``decay_names`` are the parameters the Trainer would apply weight decay to
    (``Trainer.get_decay_parameter_names``).
    """
    stack_path, layers = _block_stack(model)
    num_layers = len(layers)
    groups: dict[tuple[int, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        layer = layer_id(name, model.base_model_prefix, stack_path, num_layers)
        decays = name in decay_names and not any(marker in name for marker in _NO_DECAY_MARKERS)
        group = groups.setdefault(
            (layer, decays),
            {
                "params": [],
                "lr": learning_rate * layer_decay ** (num_layers + 1 - layer),
                "weight_decay": weight_decay if decays else 0.0,
            },
        )
        group["params"].append(parameter)
    return [groups[key] for key in sorted(groups)]
