"""The weighted loss (hand-computed, invariant to gradient accumulation, and really used by the
recipe), layer decay, and the reload of the best checkpoint at the end of training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import BeitConfig, BeitForImageClassification, TrainingArguments

from conftest import TINY_BEIT, write_medmnist_npz
from hf_medbeit import finetune
from hf_medbeit.training import MedMNISTTrainingArguments, WeightedLossTrainer


def tiny_beit(num_labels=2, problem_type="single_label_classification", seed=0, num_hidden_layers=2):
    torch.manual_seed(seed)
    config = BeitConfig(
        hidden_size=16, num_hidden_layers=num_hidden_layers, num_attention_heads=2, intermediate_size=32, image_size=28,
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
    # Plain TrainingArguments: the recipe's own arguments insist on evaluation (model selection by
    # validation AUC), which these tests of the loss and the optimizer do not need.
    args = TrainingArguments(
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


def test_label_smoothing_factor_is_applied_by_the_weighted_loss(tmp_path):
    """--label_smoothing_factor reaches the loss (Trainer's own smoother never runs under our loss)."""
    model = tiny_beit()
    trainer = make_trainer(tmp_path, model, class_weights=np.array([2.0, 0.5]), label_smoothing_factor=0.1)
    pixel_values, labels = torch.randn(4, 3, 28, 28), torch.tensor([0, 1, 1, 0])
    loss = trainer.compute_loss(model, {"pixel_values": pixel_values, "labels": labels}, num_items_in_batch=torch.tensor(4))
    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits
    log_probs = torch.log_softmax(logits, dim=-1)
    weights = torch.tensor([2.0, 0.5])
    # PyTorch's definition: (1 - e) * weighted NLL + e * mean over classes of the class-weighted -log p.
    smoothed = [(0.9 * -weights[y] * log_probs[i, y] - 0.1 * (weights * log_probs[i]).sum() / 2).item()
                for i, y in enumerate(labels.tolist())]
    assert loss.item() == pytest.approx(sum(smoothed) / 4, rel=1e-5)


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


def test_load_best_model_restores_the_checkpoint_weights_exactly(tmp_path):
    """transformers 5 renamed BEiT's modules in memory but saves the Hub's names; Trainer's own
    reload matches none of them and only warns. Ours must bring back every tensor."""
    model = tiny_beit(seed=0)
    trainer = make_trainer(tmp_path, model)
    checkpoint = tmp_path / "out" / "checkpoint-3"
    trainer.save_model(str(checkpoint))
    saved = {name: value.clone() for name, value in model.state_dict().items()}
    with torch.no_grad():  # training went on after the best checkpoint
        for parameter in model.parameters():
            parameter.add_(1.0)
    trainer.state.best_model_checkpoint = str(checkpoint)
    trainer._load_best_model()
    restored = model.state_dict()
    assert restored.keys() == saved.keys()
    for name, value in saved.items():
        assert torch.equal(restored[name], value), f"{name} was not restored from {checkpoint}"


def test_load_best_model_refuses_a_checkpoint_that_lacks_weights(tmp_path):
    """A checkpoint that does not cover the model (here one block of two) is an error, never a
    warning that leaves the missing weights as training left them."""
    tiny_beit(num_hidden_layers=1).save_pretrained(tmp_path / "checkpoint-other")
    trainer = make_trainer(tmp_path, tiny_beit(num_hidden_layers=2))
    trainer.state.best_model_checkpoint = str(tmp_path / "checkpoint-other")
    with pytest.raises(RuntimeError, match="Missing key"):
        trainer._load_best_model()


def imbalanced_breastmnist(root, train_labels):
    """A synthetic BreastMNIST file whose training labels are ``train_labels`` (MedMNIST's format)."""
    path = write_medmnist_npz(root / "breastmnist.npz", "breastmnist", counts=(len(train_labels), 16, 16))
    arrays = dict(np.load(path))
    arrays["train_labels"] = np.asarray(train_labels, dtype=np.uint8).reshape(-1, 1)
    np.savez_compressed(path, **arrays)
    return root


def recipe(tmp_path, data_root, *extra):
    return [
        "--dataset_name", "breastmnist", "--data_dir", str(data_root), "--skip_md5_check",
        "--dataset_cache_dir", str(tmp_path / "cache"), "--model_type", "beit", "--config_overrides", TINY_BEIT,
        "--output_dir", str(tmp_path / "run"), "--report_to", "none", "--explain_per_class", "0", "--use_cpu", "--disable_tqdm", "True", *extra,
    ]


@pytest.mark.e2e
def test_recipe_trains_with_the_class_weights_it_records(tmp_path, monkeypatch):
    """The card and all_results.json record the class weights whether the loss used them or not;
    the loss itself must get them. Every cross-entropy of the run (training and evaluation) is
    watched."""
    # 12 malignant, 36 benign: weights n / (k * count) = 2 and 2/3.
    root = imbalanced_breastmnist(tmp_path / "data", [0] * 12 + [1] * 36)
    used = []
    cross_entropy = F.cross_entropy

    def spy(logits, labels, weight=None, *args, **kwargs):
        used.append(None if weight is None else weight.detach().cpu().numpy().copy())
        return cross_entropy(logits, labels, weight, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", spy)
    results = finetune.main(recipe(tmp_path, root, "--balancing", "weighted_loss", "--max_steps", "1",
                                   "--per_device_train_batch_size", "16"))
    np.testing.assert_allclose(results["class_weights"], [2.0, 2 / 3], rtol=1e-12)
    assert used, "the loss was never computed"
    for weights in used:
        assert weights is not None, "the loss ran without the recorded class weights"
        np.testing.assert_allclose(weights, results["class_weights"], rtol=1e-6)


@pytest.mark.e2e
def test_saved_model_is_the_best_checkpoint_when_the_best_epoch_is_not_the_last(tmp_path, monkeypatch):
    """Validation AUC forced to 0.9, 0.6, 0.7 over three epochs of 2 steps: the best checkpoint is
    the first (checkpoint-2). The run folder's model must be it, not the last one (checkpoint-6)."""
    root = imbalanced_breastmnist(tmp_path / "data", [0, 1] * 16)
    forced = iter([0.9, 0.6, 0.7])  # the three evaluations during training; later ones are real
    make_compute_metrics = finetune.make_compute_metrics

    def scripted(task, label_names):
        compute = make_compute_metrics(task, label_names)

        def compute_metrics(eval_prediction):
            metrics = compute(eval_prediction)
            metrics["auc"] = next(forced, metrics["auc"])
            return metrics

        return compute_metrics

    monkeypatch.setattr(finetune, "make_compute_metrics", scripted)
    results = finetune.main(recipe(tmp_path, root, "--num_train_epochs", "3", "--per_device_train_batch_size", "16",
                                   "--learning_rate", "1e-3"))
    run = tmp_path / "run"
    state = json.loads((run / "trainer_state.json").read_text())
    assert [entry["eval_auc"] for entry in state["log_history"] if "eval_auc" in entry] == [0.9, 0.6, 0.7]
    assert state["global_step"] == 6 and results["best_model_checkpoint"] == str(run / "checkpoint-2")
    saved = load_file(run / "model.safetensors")
    best = load_file(run / "checkpoint-2" / "model.safetensors")
    last = load_file(run / "checkpoint-6" / "model.safetensors")
    assert saved.keys() == best.keys() == last.keys()
    for name in saved:
        assert torch.equal(saved[name], best[name]), f"{name} is not the best checkpoint's"
    assert any(not torch.equal(saved[name], last[name]) for name in saved), "the last checkpoint equals the best"
