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
from hf_medbeit.modeling import (
    build_config, count_parameters, freeze_all_but_top_layers, load_image_processor, load_model, parse_config_overrides,
)
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
    # Evaluation stays on (--eval_strategy no is refused), so it gets a one-image split it never uses.
    args = MedMNISTTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    fresh = BeitForImageClassification(BeitConfig(**SMALL))
    trainer = WeightedLossTrainer(model=fresh, args=args, eval_dataset=[{"pixel_values": torch.zeros(3, 28, 28), "labels": 0}])
    trainer._load_from_checkpoint(str(tmp_path / "checkpoint-1"))
    for (name, expected), actual in zip(model.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(actual, expected, msg=name)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "checkpoint-1")
    torch.testing.assert_close(reloaded.classifier.weight, model.classifier.weight)


def test_attention_implementation_is_selectable():
    args = ModelArguments(model_type="beit", config_overrides=TINY_BEIT, attn_implementation="eager")
    assert load_model(args, get_spec("breastmnist")).config._attn_implementation == "eager"


# ---------------------------------------------------------------------------------------------
# Models built from a config: list-valued overrides, --config_name, the input size
# ---------------------------------------------------------------------------------------------

RESNET18 = "depths=[2,2,2,2],hidden_sizes=[64,128,256,512],layer_type=basic"


def test_list_overrides_build_resnet18_with_torchvisions_parameter_count():
    import torchvision

    model = load_model(ModelArguments(model_type="resnet", config_overrides=RESNET18), get_spec("breastmnist"))
    assert model.config.depths == [2, 2, 2, 2] and model.config.hidden_sizes == [64, 128, 256, 512]
    assert model.config.layer_type == "basic"
    # Derived fields follow the new depth (the config is built once from all its values).
    assert model.config.stage_names == ["stem", "stage1", "stage2", "stage3", "stage4"]
    expected = sum(p.numel() for p in torchvision.models.resnet18(num_classes=2).parameters())
    assert count_parameters(model)[1] == expected == 11_177_538


def test_overrides_parse_lists_mappings_numbers_and_words():
    assert parse_config_overrides('depths=[2,2],model_args={"drop_rate": 0.1, "zero_init_last": false},eps=1e-3,act=relu') == {
        "depths": ("[2,2]", [2, 2]),
        "model_args": ('{"drop_rate": 0.1, "zero_init_last": false}', {"drop_rate": 0.1, "zero_init_last": False}),
        "eps": ("1e-3", 1e-3),
        "act": ("relu", "relu"),
    }


@pytest.mark.parametrize("overrides,fragments", [
    ("depth=[2,2,2,2]", ("unknown --config_overrides key 'depth'", "ResNetConfig")),
    ("depths=2", ("depths=2", "ResNetConfig.depths takes a list")),
    ("depths=[2,2", ("bad --config_overrides value depths=[2,2",)),
    ("layer_type=wide", ("ResNetConfig", "layer_type")),
    ("depths", ("bad --config_overrides item 'depths'",)),
])
def test_bad_overrides_name_the_key_and_the_config_class(overrides, fragments):
    with pytest.raises(UserError) as raised:
        build_config(ModelArguments(model_type="resnet", config_overrides=overrides), get_spec("breastmnist"))
    assert "\n" not in str(raised.value)
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_config_name_file_or_folder_with_overrides(tmp_path):
    ResNetConfig(depths=[3, 4, 6, 3], hidden_sizes=[8, 8, 8, 8], embedding_size=8, num_labels=5).save_pretrained(tmp_path / "cfg")
    spec = get_spec("breastmnist")
    for name in (tmp_path / "cfg", tmp_path / "cfg" / "config.json"):
        model = load_model(ModelArguments(config_name=str(name), config_overrides="depths=[1,1]"), spec)
        assert model.config.depths == [1, 1] and model.config.hidden_sizes == [8, 8, 8, 8]
        assert model.config.stage_names == ["stem", "stage1", "stage2"]  # derived again, not the file's five
        assert model.config.id2label == {0: "malignant", 1: "normal, benign"}  # the data set's, not the file's 5
    with pytest.raises(UserError, match="could not read --config_name"):
        build_config(ModelArguments(config_name=str(tmp_path / "missing.json")), spec)


def test_timm_models_built_from_a_config_keep_timms_own_initialisation():
    """transformers' generic init would draw the convolutions from N(0, 0.02) and set every norm to 1."""
    args = ModelArguments(model_type="timm_wrapper", config_overrides='architecture=resnet18,model_args={"drop_rate": 0.1}')
    model = load_model(args, get_spec("breastmnist"))
    assert model.config.model_args == {"drop_rate": 0.1} and model.num_labels == 2
    assert torch.count_nonzero(model.timm_model.layer1[0].bn2.weight) == 0  # timm zero-inits each branch's last norm
    conv = model.timm_model.layer1[0].conv1.weight  # Kaiming normal, fan_out: std sqrt(2 / (64 * 9)) = 0.059
    assert conv.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.1)


def test_input_size_is_native_unless_asked():
    spec = get_spec("breastmnist")  # 28x28
    native = ModelArguments(model_type="resnet", config_overrides=RESNET18)
    assert build_config(native, spec).image_size == 28
    resized = ModelArguments(model_type="resnet", config_overrides=RESNET18, image_size=64, resample="nearest")
    model = load_model(resized, spec)
    processor = load_image_processor(resized, model)
    assert model.config.image_size == 64 and (processor.size.height, processor.size.width) == (64, 64)
    assert processor.resample == 0 and not getattr(processor, "do_center_crop", False)  # PIL's NEAREST, no crop
    # A ViT/BEiT config's own image_size (its position embeddings) is the size when none is asked.
    assert build_config(ModelArguments(model_type="beit", config_overrides=TINY_BEIT), get_spec("breastmnist", 64)).image_size == 28
    with pytest.raises(UserError, match="--image_size 56 disagrees with image_size=28"):
        build_config(ModelArguments(model_type="beit", config_overrides=TINY_BEIT, image_size=56), spec)
