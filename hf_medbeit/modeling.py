"""Model and image processor: from a Hub checkpoint or folder, or built from a config.

* ``load_model``: any ``AutoModelForImageClassification`` checkpoint with the data set's class
  names in ``id2label``/``label2id`` (so the Hub widget and ``pipeline`` show them) and a new head
  (``ignore_mismatched_sizes``); or a randomly initialised model from ``--model_type`` plus
  ``--config_overrides`` (how tests and offline runs make a small BEiT).
* ``freeze_all_but_top_layers``: the study's partial fine-tuning (BEiT-large, top 5 blocks).
* ``layer_decay_parameter_groups``: BEiT's layer-wise learning-rate decay.
"""

from __future__ import annotations

import logging

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, PreTrainedModel
from transformers.models.auto.image_processing_auto import (
    IMAGE_PROCESSOR_MAPPING_NAMES,
    get_image_processor_class_from_name,
)

from .data import MedMNISTSpec
from .errors import UserError

logger = logging.getLogger(__name__)


def label_config(spec: MedMNISTSpec) -> dict:
    """Config fields that make the checkpoint speak the data set's language."""
    return {
        "num_labels": spec.num_labels,
        "id2label": dict(enumerate(spec.label_names)),
        "label2id": {name: index for index, name in enumerate(spec.label_names)},
        # `pipeline` picks softmax or sigmoid from this, so multi-label models score each finding alone.
        "problem_type": "multi_label_classification" if spec.is_multi_label else "single_label_classification",
    }


def load_model(model_args, spec: MedMNISTSpec) -> PreTrainedModel:
    labels = label_config(spec)
    attention = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    if model_args.model_type:
        try:
            config = AutoConfig.for_model(model_args.model_type, **labels)
        except ValueError as error:
            raise UserError(f"unknown --model_type {model_args.model_type!r}: use a transformers model type such as beit or vit") from error
        if model_args.config_overrides:
            # update_from_string casts each value to the field's type; the config is then built
            # again from them, so derived fields (BEiT's backbone stage names) follow the new depth.
            try:
                config.update_from_string(model_args.config_overrides)
            except ValueError as error:
                raise UserError(f"bad --config_overrides ({error}); write them as key=value,key=value with keys of {type(config).__name__}") from error
            keys = [item.split("=", 1)[0] for item in model_args.config_overrides.split(",")]
            config = AutoConfig.for_model(model_args.model_type, **labels, **{key: getattr(config, key) for key in keys})
        logger.info("Training %s from scratch with config %s", model_args.model_type, config.to_diff_dict())
        return AutoModelForImageClassification.from_config(config, **attention)
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


def load_image_processor(model_args, model: PreTrainedModel):
    """The processor that goes with the checkpoint; for a model built from a config, the
    processor class transformers registers for its type, sized to the config's ``image_size``."""
    name = model_args.image_processor_name or (None if model_args.model_type else model_args.model_name_or_path)
    if name:
        try:
            return AutoImageProcessor.from_pretrained(
                name, revision=model_args.model_revision, cache_dir=model_args.cache_dir,
                trust_remote_code=model_args.trust_remote_code,
            )
        except OSError as error:
            raise UserError(f"could not load the image processor of {name!r} ({str(error).splitlines()[0]}); pass --image_processor_name") from error
    model_type = model.config.model_type
    if model_type not in IMAGE_PROCESSOR_MAPPING_NAMES:
        raise UserError(f"transformers has no image processor for model type {model_type!r}; pass --image_processor_name")
    names = IMAGE_PROCESSOR_MAPPING_NAMES[model_type]
    processor_class = get_image_processor_class_from_name(names.get("torchvision") or names["pil"])
    image_size = getattr(model.config, "image_size", 224)
    default_size = processor_class().size
    size = {"height": image_size, "width": image_size} if "height" in default_size else {"shortest_edge": image_size}
    return processor_class(size=size)


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
