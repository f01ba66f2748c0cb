"""Models from a config or a folder, with labels; partial fine-tuning; checkpoint reloading."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForImageClassification, BeitConfig, BeitForImageClassification, ResNetConfig, ResNetForImageClassification,
    ViTConfig, ViTForImageClassification,
)

from hf_medbeit.arguments import ModelArguments
from hf_medbeit.data import get_spec
from hf_medbeit.errors import UserError
from hf_medbeit.modeling import count_parameters, freeze_all_but_top_layers, load_image_processor, load_model
from hf_medbeit.training import MedMNISTTrainingArguments, WeightedLossTrainer

from conftest import TINY_BEIT

SMALL = dict(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, image_size=28, patch_size=7, num_labels=2)


def test_model_from_config_carries_the_class_names():
    spec = get_spec("breastmnist")
    model = load_model(ModelArguments(model_type="beit", config_overrides=TINY_BEIT), spec)
    assert model.config.id2label == {0: "malignant", 1: "normal, benign"}
    assert model.config.label2id["normal, benign"] == 1
    assert model.config.num_hidden_layers == 2 and model.config.image_size == 28
    assert model.config.problem_type == "single_label_classification"
    processor = load_image_processor(ModelArguments(model_type="beit", config_overrides=TINY_BEIT), model)
    assert processor.size == {"height": 28, "width": 28}


def test_multilabel_model_uses_sigmoid_problem_type():
    model = load_model(ModelArguments(model_type="beit", config_overrides=TINY_BEIT), get_spec("chestmnist"))
    assert model.config.num_labels == 14 and model.config.problem_type == "multi_label_classification"


def test_checkpoint_folder_gets_a_new_head(tmp_path):
    """A saved 5-class model fine-tuned on a 2-class set: head replaced, body kept."""
    source = BeitForImageClassification(BeitConfig(**{**SMALL, "num_labels": 5}))
    source.save_pretrained(tmp_path / "ckpt")
    model = load_model(ModelArguments(model_name_or_path=str(tmp_path / "ckpt")), get_spec("breastmnist"))
    assert model.classifier.out_features == 2
    source_weights = dict(source.named_parameters())
    for name, parameter in model.named_parameters():
        if not name.startswith("classifier"):
            torch.testing.assert_close(parameter, source_weights[name])


def test_missing_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="could not load model"):
        load_model(ModelArguments(model_name_or_path=str(tmp_path / "nothing-here")), get_spec("breastmnist"))


@pytest.mark.parametrize("model_class,config_class", [(BeitForImageClassification, BeitConfig), (ViTForImageClassification, ViTConfig)])
def test_freeze_all_but_top_layers(model_class, config_class):
    model = model_class(config_class(**SMALL))
    freeze_all_but_top_layers(model, 1)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    prefix = model.base_model_prefix
    assert trainable, "something must train"
    assert all(not n.startswith(f"{prefix}.embeddings") for n in trainable)
    blocks = {n.split(".")[2] for n in trainable if n.startswith(f"{prefix}.layers.")}
    assert blocks == {"3"}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    after_blocks = {n for n in trainable if not n.startswith((f"{prefix}.layers.", "classifier"))}
    assert after_blocks, "final norm / pooler must train"
    trainable_count, total = count_parameters(model)
    assert 0 < trainable_count < total


def test_top_layers_out_of_range_and_unsupported_models():
    model = BeitForImageClassification(BeitConfig(**SMALL))
    with pytest.raises(UserError, match="out of range.*has 4 transformer blocks"):
        freeze_all_but_top_layers(model, 5)
    resnet = ResNetForImageClassification(ResNetConfig(num_labels=2, hidden_sizes=[8, 8, 8, 8], embedding_size=8, depths=[1, 1, 1, 1]))
    with pytest.raises(UserError, match="no stack of transformer blocks"):
        freeze_all_but_top_layers(resnet, 1)


def test_reloading_a_checkpoint_restores_every_weight(tmp_path):
    """transformers 5.x saves BEiT under the Hub's key names; our Trainer reloads them strictly."""
    model = BeitForImageClassification(BeitConfig(**SMALL))
    model.save_pretrained(tmp_path / "checkpoint-1")
    args = MedMNISTTrainingArguments(
        output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, eval_strategy="no", save_strategy="no",
        load_best_model_at_end=False,
    )
    fresh = BeitForImageClassification(BeitConfig(**SMALL))
    trainer = WeightedLossTrainer(model=fresh, args=args)
    trainer._load_from_checkpoint(str(tmp_path / "checkpoint-1"))
    for (name, expected), actual in zip(model.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(actual, expected, msg=name)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "checkpoint-1")
    torch.testing.assert_close(reloaded.classifier.weight, model.classifier.weight)


def test_attention_implementation_is_selectable():
    args = ModelArguments(model_type="beit", config_overrides=TINY_BEIT, attn_implementation="eager")
    assert load_model(args, get_spec("breastmnist")).config._attn_implementation == "eager"
