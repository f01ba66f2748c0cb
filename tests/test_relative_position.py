"""The fast BEiT relative position bias (hf_medbeit/relative_position.py) changes nothing but speed:
the same logits and the same gradient of every parameter, bit for bit, for BEiT's real flag
combinations; no new checkpoint keys; only BEiT is touched; and it can be switched off."""

from __future__ import annotations

import copy
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    BeitConfig, BeitForImageClassification, ResNetConfig, ResNetForImageClassification, ViTConfig,
    ViTForImageClassification,
)
from transformers.models.beit import modeling_beit

from hf_medbeit.arguments import ModelArguments, parse_args
from hf_medbeit.data import get_spec
from hf_medbeit.modeling import load_model
from hf_medbeit.relative_position import (
    FastBeitRelativePositionBias, restore_relative_position_bias, use_fast_relative_position_bias,
)

from conftest import TINY_BEIT

SMALL = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=2,
             drop_path_rate=0.1)
# The two ways BEiT checkpoints use the bias: microsoft/beit-base-* one table per layer (with layer
# scale), microsoft/beit-large-* one table shared by all layers.
BIAS_FLAGS = {
    "per-layer": dict(use_relative_position_bias=True, layer_scale_init_value=0.1),
    "shared": dict(use_shared_relative_position_bias=True, layer_scale_init_value=0.1),
}
# (model image size, patch size) -> input resolutions: the native window, and another one.
SHAPES = {(28, 4): (28, 56), (224, 16): (224, 112)}


def beit(flags: str, image_size: int, patch_size: int) -> BeitForImageClassification:
    torch.manual_seed(0)
    model = BeitForImageClassification(BeitConfig(image_size=image_size, patch_size=patch_size, **SMALL,
                                                  **BIAS_FLAGS[flags]))
    with torch.no_grad():  # a fresh table is all zeros, which would hide a wrong gather
        for name, parameter in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                parameter.normal_()
    return model.train()  # drop path on: the RNG is reset before each pass


def forward_backward(model, pixel_values, interpolate_pos_encoding: bool, autocast: bool = False):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding).logits
    (logits.float() * torch.arange(1, 3)).sum().backward()  # a gradient that differs per class
    return logits.detach(), {name: parameter.grad for name, parameter in model.named_parameters()}


def assert_bit_identical(reference, candidate):
    (logits_a, grads_a), (logits_b, grads_b) = reference, candidate
    assert logits_a.dtype == logits_b.dtype and torch.equal(logits_a, logits_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert grads_a[name] is not None, name
        assert torch.equal(grads_a[name], grads_b[name]), name


@pytest.mark.parametrize("flags", sorted(BIAS_FLAGS))
@pytest.mark.parametrize("image_size,patch_size", sorted(SHAPES))
@pytest.mark.parametrize("interpolate_pos_encoding", [False, True])
def test_logits_and_every_gradient_are_bit_identical_with_the_fast_bias(flags, image_size, patch_size,
                                                                        interpolate_pos_encoding):
    model = beit(flags, image_size, patch_size)
    fast = copy.deepcopy(model)
    assert use_fast_relative_position_bias(fast) == (2 if flags == "per-layer" else 1)
    for resolution in SHAPES[(image_size, patch_size)]:  # the native window (fast path), then another one
        pixel_values = torch.randn(2, 3, resolution, resolution, generator=torch.Generator().manual_seed(resolution))
        assert_bit_identical(forward_backward(model, pixel_values, interpolate_pos_encoding),
                             forward_backward(fast, pixel_values, interpolate_pos_encoding))


def test_bit_identical_under_bf16_autocast_as_the_trainer_runs_it():
    model = beit("per-layer", 28, 4)
    fast = copy.deepcopy(model)
    use_fast_relative_position_bias(fast)
    pixel_values = torch.randn(2, 3, 28, 28)
    reference = forward_backward(model, pixel_values, False, autocast=True)
    assert reference[0].dtype == torch.bfloat16  # autocast really ran
    assert_bit_identical(reference, forward_backward(fast, pixel_values, False, autocast=True))


def test_the_fast_path_runs_at_the_native_window_and_transformers_code_elsewhere(monkeypatch):
    model = beit("shared", 28, 4)
    use_fast_relative_position_bias(model)
    upstream_calls = []
    original = modeling_beit.BeitRelativePositionBias.forward
    monkeypatch.setattr(modeling_beit.BeitRelativePositionBias, "forward",
                        lambda self, *args, **kwargs: upstream_calls.append(args[0]) or original(self, *args, **kwargs))
    model(pixel_values=torch.randn(1, 3, 28, 28))
    assert upstream_calls == []
    model(pixel_values=torch.randn(1, 3, 56, 56))
    assert upstream_calls == [(14, 14)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_a_same_size_bilinear_resize_returns_its_input_and_gradient_unchanged(dtype):
    # What the fast path relies on to skip transformers' resize of the table and of the bias.
    for shape in [(1, 12, 27, 27), (12, 1, 197, 197), (1, 2, 13, 7)]:
        values = (torch.randn(shape, dtype=torch.float64) * 100).to(dtype).requires_grad_()
        resized = torch.nn.functional.interpolate(values, size=shape[2:], mode="bilinear", align_corners=False)
        gradient = torch.randn(shape, dtype=torch.float64).to(dtype)
        resized.backward(gradient)
        assert resized.dtype == dtype and torch.equal(resized, values) and torch.equal(values.grad, gradient)


def test_saved_checkpoint_and_state_dict_have_no_new_keys(tmp_path):
    model = beit("per-layer", 28, 4)
    fast = copy.deepcopy(model)
    use_fast_relative_position_bias(fast)
    assert list(fast.state_dict()) == list(model.state_dict())
    assert dict(fast.named_buffers()).keys() == dict(model.named_buffers()).keys()
    model.save_pretrained(tmp_path / "plain")
    fast.save_pretrained(tmp_path / "fast")
    plain_weights, fast_weights = (load_file(tmp_path / name / "model.safetensors") for name in ("plain", "fast"))
    assert plain_weights.keys() == fast_weights.keys()
    assert all(torch.equal(plain_weights[key], fast_weights[key]) for key in plain_weights)
    reloaded = BeitForImageClassification.from_pretrained(tmp_path / "fast")
    assert not any(isinstance(module, FastBeitRelativePositionBias) for module in reloaded.modules())


def tiny_beit_with_bias(*flags: str):
    return parse_args(["--model_type", "beit", "--config_overrides", f"{TINY_BEIT},use_relative_position_bias=true",
                       "--output_dir", "unused", *flags])[0]


def test_load_model_gives_beit_the_fast_bias_and_the_switch_turns_it_off():
    spec = get_spec("breastmnist")
    on = load_model(tiny_beit_with_bias(), spec)
    assert [type(layer.relative_position_bias) for layer in on.beit.layers] == [FastBeitRelativePositionBias] * 2
    model_args = tiny_beit_with_bias("--no_fast_relative_position_bias")
    assert model_args.fast_relative_position_bias is False
    off = load_model(model_args, spec)
    for layer in off.beit.layers:
        assert type(layer.relative_position_bias) is modeling_beit.BeitRelativePositionBias
        assert not [name for name in vars(layer.relative_position_bias) if "hf_medbeit" in name]


@pytest.mark.parametrize("model", [
    ViTForImageClassification(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=32, image_size=28, patch_size=7)),
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])),
], ids=["vit", "resnet"])
def test_other_architectures_are_left_untouched(model):
    before = {name: type(module) for name, module in model.named_modules()}
    attributes = {name: set(vars(module)) for name, module in model.named_modules()}
    assert use_fast_relative_position_bias(model) == 0
    assert {name: type(module) for name, module in model.named_modules()} == before
    assert {name: set(vars(module)) for name, module in model.named_modules()} == attributes


def test_restore_gives_back_transformers_module():
    model = beit("per-layer", 28, 4)
    use_fast_relative_position_bias(model)
    assert restore_relative_position_bias(model) == 2
    for layer in model.beit.layers:
        assert type(layer.relative_position_bias) is modeling_beit.BeitRelativePositionBias
        assert not [name for name in vars(layer.relative_position_bias) if "hf_medbeit" in name]


def test_a_module_that_is_not_as_expected_is_left_alone_with_a_warning(caplog):
    model = beit("per-layer", 28, 4)
    model.beit.layers[1].relative_position_bias.window_size = [7, 7]  # a list: not what 5.24 builds
    with caplog.at_level(logging.WARNING, logger="hf_medbeit.relative_position"):
        assert use_fast_relative_position_bias(model) == 0
    assert "window_size is [7, 7]" in caplog.text
    for layer in model.beit.layers:  # all or none: the first layer, which was fine, is untouched too
        assert type(layer.relative_position_bias) is modeling_beit.BeitRelativePositionBias
        assert not [name for name in vars(layer.relative_position_bias) if "hf_medbeit" in name]


def test_an_upstream_forward_that_computes_something_else_is_caught_by_the_probe(monkeypatch, caplog):
    # A future transformers whose bias differs at the native window (here: transposed) must keep
    # its own code, even with the same attributes and signature.
    original = modeling_beit.BeitRelativePositionBias.forward

    def transposed(self, window_size, interpolate_pos_encoding: bool = False, dim_size=None):
        return original(self, window_size, interpolate_pos_encoding, dim_size).transpose(-1, -2)

    monkeypatch.setattr(modeling_beit.BeitRelativePositionBias, "forward", transposed)
    model = beit("shared", 28, 4)
    with caplog.at_level(logging.WARNING, logger="hf_medbeit.relative_position"):
        assert use_fast_relative_position_bias(model) == 0
    assert "output differs from the fast path" in caplog.text
    assert type(model.beit.shared_position_bias) is modeling_beit.BeitRelativePositionBias


def test_the_benchmark_checks_identity_profiles_the_bias_and_writes_its_json(tmp_path):
    # The script part 2 of issue 13 runs on a GPU: rehearsed here on the tiny shape.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import relative_position_bias

    out = tmp_path / "bias.json"
    assert relative_position_bias.main(["--models", "tiny", "--batch_size", "1", "--repeats", "1", "--steps", "1",
                                        "--warmup", "0", "--profile_steps", "1", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["identity"] == {"logits_equal": True, "grads_equal": True, "parameters_compared": 43,
                               "differing_grads": []}
    assert row["profile"]["transformers"]["bias_calls_per_step"] == 2
    assert 0 < row["profile"]["fast"]["bias_share"] < 1
    ops = row["profile"]["transformers"]["bias_ms_by_op"]
    assert "aten::upsample_bilinear2d" in ops and "aten::upsample_bilinear2d" not in row["profile"]["fast"]["bias_ms_by_op"]
    assert row["fast_median_ms"] > 0 and row["bias_module_alone_ratio"] > 0
