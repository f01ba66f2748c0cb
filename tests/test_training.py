"""The weighted loss (hand-computed, and invariant to gradient accumulation) and layer decay."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import BeitConfig, BeitForImageClassification

from hf_medbeit.training import MedMNISTTrainingArguments, WeightedLossTrainer


def tiny_beit(num_labels=2, problem_type="single_label_classification", seed=0):
    torch.manual_seed(seed)
    config = BeitConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=28,
        patch_size=7, num_labels=num_labels, problem_type=problem_type,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0,
    )
    return BeitForImageClassification(config)


class TensorDataset(torch.utils.data.Dataset):
    def __init__(self, pixel_values, labels):
        self.pixel_values, self.labels = pixel_values, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


def make_trainer(tmp_path, model, dataset=None, **kwargs):
    trainer_kwargs = {key: kwargs.pop(key) for key in ("class_weights", "multi_label", "layer_decay") if key in kwargs}
    args = MedMNISTTrainingArguments(
        output_dir=str(tmp_path / "out"), report_to="none", save_strategy="no", eval_strategy="no",
        load_best_model_at_end=False, disable_tqdm=True, use_cpu=True, **kwargs,
    )
    return WeightedLossTrainer(model=model, args=args, train_dataset=dataset, **trainer_kwargs)


def test_weighted_cross_entropy_equals_hand_computation(tmp_path):
    model = tiny_beit()
    weights = np.array([1.857, 0.684])
    trainer = make_trainer(tmp_path, model, class_weights=weights)
    pixel_values = torch.randn(6, 3, 28, 28)
    labels = torch.tensor([0, 1, 1, 0, 1, 1])
    inputs = {"pixel_values": pixel_values, "labels": labels}
    loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=torch.tensor(6))
    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits
    log_probs = torch.log_softmax(logits, dim=-1)
    by_hand = sum(-weights[y] * log_probs[i, y].item() for i, y in enumerate(labels.tolist())) / 6
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    # Without a count (evaluation) it is the mean of the weighted per-example losses: the same here.
    assert trainer.compute_loss(model, dict(inputs)).item() == pytest.approx(by_hand, rel=1e-5)


def test_weighted_bce_for_multilabel(tmp_path):
    model = tiny_beit(num_labels=3, problem_type="multi_label_classification")
    pos_weight = np.array([4.0, 1.0, 0.5])
    trainer = make_trainer(tmp_path, model, class_weights=pos_weight, multi_label=True)
    pixel_values = torch.randn(4, 3, 28, 28)
    labels = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 1]], dtype=torch.float32)
    loss = trainer.compute_loss(model, {"pixel_values": pixel_values, "labels": labels}, num_items_in_batch=torch.tensor(12))
    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits
    p = torch.sigmoid(logits)
    by_hand = -(torch.tensor(pos_weight) * labels * torch.log(p) + (1 - labels) * torch.log(1 - p)).sum() / 12
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """4 x 2 accumulated steps update the weights exactly as one batch of 8 does."""
    torch.manual_seed(1)
    dataset = TensorDataset(torch.randn(8, 3, 28, 28), torch.tensor([0, 0, 0, 1, 1, 1, 1, 1]))
    weights = np.array([8 / (2 * 3), 8 / (2 * 5)])
    updated = []
    for batch_size, accumulation in ((8, 1), (4, 2), (2, 4)):
        model = tiny_beit(seed=0)
        trainer = make_trainer(
            tmp_path / f"b{batch_size}", model, dataset, class_weights=weights,
            per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
            max_steps=1, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
        )
        trainer.train()
        updated.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    initial = torch.cat([p.detach().flatten() for p in tiny_beit(seed=0).parameters()])
    assert not torch.allclose(updated[0], initial), "the step must change the weights"
    torch.testing.assert_close(updated[1], updated[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(updated[2], updated[0], rtol=1e-4, atol=1e-6)


def test_layer_decay_parameter_groups(tmp_path):
    model = tiny_beit()
    trainer = make_trainer(tmp_path, model, layer_decay=0.5, learning_rate=1e-3, weight_decay=0.05)
    optimizer = trainer.create_optimizer()
    lr_of = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            lr_of[id(parameter)] = (group["lr"], group["weight_decay"])
    named = dict(model.named_parameters())
    # 2 blocks: embeddings get 0.5^3, block 0 0.5^2, block 1 0.5^1, head and pooler 0.5^0.
    assert lr_of[id(named["beit.embeddings.patch_embeddings.projection.weight"])] == (pytest.approx(1e-3 * 0.125), 0.05)
    assert lr_of[id(named["beit.embeddings.cls_token"])] == (pytest.approx(1e-3 * 0.125), 0.0)
    block0 = [n for n in named if n.startswith("beit.layers.0.") and n.endswith("fc1.weight")][0]
    assert lr_of[id(named[block0])] == (pytest.approx(1e-3 * 0.25), 0.05)
    assert lr_of[id(named["classifier.weight"])] == (pytest.approx(1e-3), 0.05)
    assert lr_of[id(named["classifier.bias"])] == (pytest.approx(1e-3), 0.0)
    assert len(lr_of) == len(named)


def test_training_args_defaults_are_the_study():
    args = MedMNISTTrainingArguments(output_dir="x", report_to="none")
    assert (args.num_train_epochs, args.learning_rate, args.per_device_train_batch_size, args.seed) == (5, 3e-4, 32, 42)
    assert args.metric_for_best_model == "auc" and args.load_best_model_at_end and args.greater_is_better
