"""``hf-medbeit explain``: where a model looks, per image, with a check that the maps mean something.

    hf-medbeit explain --model runs/quickstart-breastmnist-tiny-beit scan1.png scans/
    hf-medbeit explain --model runs/quickstart-breastmnist-tiny-beit --split test            # into RUN/explanations
    hf-medbeit explain --model runs/x --split test --misclassified_first --num_images 12

For each image: the image as the model sees it (after its own image processor: resize, crop,
normalisation undone for display), one heat-map overlay per method and the class scores, as one
PNG per image plus one grid figure of all of them; ``explanations.json`` (scores, targets, the
sanity-check numbers) and ``maps.npz`` (the maps themselves, at input resolution).

Methods (the map explains the predicted class):

* ``gradcam``: Grad-CAM (Selvaraju et al. 2017) from the ``grad-cam`` package (pytorch_grad_cam).
  CNNs: on the last layer whose output is still a spatial map (at least 2x2). ViT/BEiT/DeiT: on the
  tokens entering the last block (its first layer norm), the patch tokens reshaped to their grid.
* ``rollout``: attention rollout (Abnar & Zuidema 2020): per layer, heads averaged, the identity
  added for the residual path, rows renormalised, multiplied through the layers.
* ``attention``: the last layer's attention, heads averaged.

For ``rollout`` and ``attention`` the row read is that of the token(s) the classifier reads: the
CLS token for ViT/DeiT, the mean of the patch tokens for BEiT and Data2Vec-vision with mean pooling
(their CLS token does not reach the head). Attention weights need eager attention (SDPA returns
none), so models are loaded with ``attn_implementation="eager"``; scores are unchanged.

Sanity checks, one number each per method, averaged over the explained images:

* ``randomisation_rank_correlation``: the model-randomisation test of Adebayo et al. 2018
  ("Sanity Checks for Saliency Maps"): Spearman rank correlation between each map of the trained
  model and the map of the same architecture with freshly initialised weights (``from_config``,
  seeded), for the same image and class. Near 1: the map does not depend on what the model learnt
  (it shows the image or the architecture, not the model). A constant map shares no ranking with
  any other and counts as 0.
* ``deletion_auc`` (Petsiuk et al. 2018): the score of the explained class as the most salient
  pixels are replaced by the processor's mean (0 after normalisation), in 10 steps of 10%, averaged
  over the steps; ``deletion_auc_random`` removes the pixels in random order. A map that finds the
  evidence the model uses has a deletion AUC well below the random one.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import outputs
from .errors import UserError
from .inference import IMAGE_ERRORS, Classifier, check_model_reference, load_classifier, load_image, resolve_device, find_images

METHODS = {
    "gradcam": "Grad-CAM (grad-cam package)",
    "rollout": "attention rollout",
    "attention": "last-layer attention",
}
TOKEN_METHODS = ("gradcam", "rollout", "attention")
CNN_METHODS = ("gradcam",)
EXPLANATIONS_DIR = "explanations"  # inside a run folder; the model card shows its grid
GRID_FILE = "grid.png"
SUMMARY_FILE = "explanations.json"
MAPS_FILE = "maps.npz"
DELETION_STEPS = 10
DEFAULT_PER_CLASS = 2
DEFAULT_NUM_IMAGES = 8
MAX_GRID_ROWS = 40  # a taller figure is unreadable; the per-image PNGs still cover every image


# ---------------------------------------------------------------------------------------------
# What part of the model to explain
# ---------------------------------------------------------------------------------------------


@dataclass
class Structure:
    """Where the maps come from: token models (ViT family) or CNNs."""

    kind: str  # "tokens" or "cnn"
    target_layer: object  # the module Grad-CAM hooks
    target_name: str
    grid: tuple[int, int] | None = None  # patch grid of token models
    reads_mean: bool = False  # the head reads the mean of the patch tokens, not the CLS token
    methods: tuple[str, ...] = field(default_factory=tuple)


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _logits_only(model):
    import torch

    class LogitsOnly(torch.nn.Module):
        """pytorch_grad_cam calls model(x) and expects the logits tensor."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values):
            return self.inner(pixel_values=pixel_values).logits

    return LogitsOnly(model)


def find_structure(model, pixel_values) -> Structure:
    """Token model (a stack of transformer blocks and a patch size) or CNN (a spatial feature map)."""
    import torch

    from .modeling import encoder_layers

    config = model.config
    try:
        blocks = encoder_layers(model)
    except UserError:
        blocks = None
    if blocks is not None and getattr(config, "patch_size", None) is not None:
        last = blocks[-1]
        for name in ("layernorm_before", "norm1"):
            if isinstance(getattr(last, name, None), torch.nn.Module):
                height, width = _pair(pixel_values.shape[-2]), _pair(pixel_values.shape[-1])
                patch = _pair(config.patch_size)
                grid = (height[0] // patch[0], width[0] // patch[1])
                prefix = next(n for n, m in model.named_modules() if m is last)
                return Structure("tokens", getattr(last, name), f"{prefix}.{name}", grid,
                                 bool(getattr(config, "use_mean_pooling", False)), TOKEN_METHODS)
    # A CNN: the module that finishes last with a spatial map of at least 2x2 (for a ResNet, its
    # last stage; at 28x28 input, where that stage is 1x1, the one before it).
    finished = []
    names = {module: name for name, module in model.named_modules()}
    hooks = [module.register_forward_hook(lambda module, args, output: finished.append((module, output)))
             for module in model.modules() if module is not model]
    try:
        with torch.no_grad():
            model(pixel_values=pixel_values[:1])
    finally:
        for hook in hooks:
            hook.remove()
    spatial = [module for module, output in finished
               if isinstance(output, torch.Tensor) and output.ndim == 4 and min(output.shape[-2:]) >= 2]
    if not spatial:
        raise UserError(
            f"{type(model).__name__} has neither transformer blocks with patches nor a spatial feature map of at "
            "least 2x2, so hf-medbeit explain has nothing to map; use a ViT/BEiT/DeiT or a CNN"
        )
    return Structure("cnn", spatial[-1], names[spatial[-1]], methods=CNN_METHODS)


# ---------------------------------------------------------------------------------------------
# Maps
# ---------------------------------------------------------------------------------------------


def _upsample(grid_maps, size: tuple[int, int]) -> np.ndarray:
    """(B, h, w) maps -> (B, H, W), bilinear over the patch geometry, each scaled to 0..1."""
    import torch

    tensor = torch.as_tensor(np.asarray(grid_maps, dtype=np.float32))[:, None]
    up = torch.nn.functional.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()
    return _scale(up)


def _scale(maps: np.ndarray) -> np.ndarray:
    low = maps.min(axis=(1, 2), keepdims=True)
    high = maps.max(axis=(1, 2), keepdims=True)
    return np.where(high > low, (maps - low) / np.maximum(high - low, 1e-12), 0.0).astype(np.float32)


def gradcam_maps(model, structure: Structure, pixel_values, targets) -> np.ndarray:
    """Grad-CAM of class ``targets[i]`` for each image, at input resolution, 0..1 (pytorch_grad_cam)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    reshape = None
    if structure.kind == "tokens":
        height, width = structure.grid

        def reshape(tokens):  # (B, prefix + h*w, D) -> (B, D, h, w): the patch tokens are the last h*w
            patches = tokens[:, -height * width:, :]
            return patches.reshape(tokens.shape[0], height, width, tokens.shape[2]).permute(0, 3, 1, 2)

    with GradCAM(model=_logits_only(model), target_layers=[structure.target_layer], reshape_transform=reshape) as cam:
        maps = cam(input_tensor=pixel_values, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    return np.asarray(maps, dtype=np.float32)


def _read_rows(structure: Structure, attention):
    """(B, T, T) -> (B, h*w): the attention of the token(s) the head reads, over the patch tokens."""
    height, width = structure.grid
    patches = height * width
    rows = attention[:, -patches:, :].mean(dim=1) if structure.reads_mean else attention[:, 0, :]
    return rows[:, -patches:]


def attention_maps(model, structure: Structure, pixel_values, method: str) -> np.ndarray:
    """Attention rollout or last-layer attention, (B, H, W) at input resolution, 0..1."""
    import torch

    if model.config._attn_implementation != "eager":
        raise RuntimeError("attention maps need the model loaded with attn_implementation='eager'")
    with torch.no_grad():
        attentions = model(pixel_values=pixel_values, output_attentions=True).attentions
    if not attentions:
        raise UserError(f"{type(model).__name__} returns no attention weights; use --methods gradcam")
    if method == "attention":
        relevance = _read_rows(structure, attentions[-1].float().mean(dim=1))
    else:
        tokens = attentions[0].shape[-1]
        identity = torch.eye(tokens, device=pixel_values.device)
        rollout = identity.expand(pixel_values.shape[0], tokens, tokens)
        for layer in attentions:
            mixed = 0.5 * layer.float().mean(dim=1) + 0.5 * identity
            mixed = mixed / mixed.sum(dim=-1, keepdim=True)
            rollout = mixed @ rollout
        relevance = _read_rows(structure, rollout)
    height, width = structure.grid
    grid = relevance.reshape(-1, height, width).cpu().numpy()
    return _upsample(grid, tuple(pixel_values.shape[-2:]))


def compute_maps(model, structure: Structure, pixel_values, targets, methods) -> dict[str, np.ndarray]:
    maps = {}
    for method in methods:
        if method == "gradcam":
            maps[method] = gradcam_maps(model, structure, pixel_values, targets)
        else:
            maps[method] = attention_maps(model, structure, pixel_values, method)
    return maps


# ---------------------------------------------------------------------------------------------
# Sanity checks
# ---------------------------------------------------------------------------------------------


def randomised_copy(model, seed: int = 0):
    """The same architecture with freshly initialised weights (as ``from_config`` builds it)."""
    import torch
    from transformers import AutoModelForImageClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = AutoModelForImageClassification.from_config(model.config, attn_implementation=model.config._attn_implementation)
    device = next(model.parameters()).device
    return fresh.eval().to(device)


def rank_correlation(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman's rho of two maps; 0 where either is constant (it shares no ranking)."""
    from scipy.stats import spearmanr

    first, second = np.ravel(first), np.ravel(second)
    if np.ptp(first) == 0 or np.ptp(second) == 0:
        return 0.0
    return float(spearmanr(first, second).statistic)


def _probability(logits, multi_label: bool):
    import torch

    return torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)


def deletion_curve(model, pixel_values, saliency: np.ndarray, target: int, multi_label: bool, order=None) -> np.ndarray:
    """Score of ``target`` as the most salient pixels (or ``order``) are set to 0, in 10% steps."""
    import torch

    channels, height, width = pixel_values.shape
    if order is None:
        # Most salient first; ties (flat regions) in a fixed random order, not in raster order.
        tie_break = np.random.default_rng(0).random(height * width)
        order = np.lexsort((tie_break, -np.ravel(saliency)))
    steps = []
    for step in range(DELETION_STEPS + 1):
        keep = torch.ones(height * width, device=pixel_values.device)
        keep[torch.as_tensor(order[: round(step * height * width / DELETION_STEPS)], device=pixel_values.device)] = 0
        steps.append(pixel_values * keep.reshape(1, height, width))
    with torch.no_grad():
        logits = model(pixel_values=torch.stack(steps)).logits.float()
    return _probability(logits, multi_label)[:, target].cpu().numpy()


def _area(curve: np.ndarray) -> float:
    return float(np.trapezoid(curve, dx=1.0 / (len(curve) - 1)))


def sanity_checks(model, structure: Structure, pixel_values, targets, maps: dict[str, np.ndarray],
                  multi_label: bool, seed: int = 0) -> dict[str, dict]:
    """Per method: the mean randomisation rank correlation and deletion AUCs (map order, random order)."""
    fresh = randomised_copy(model, seed)
    fresh_structure = find_structure(fresh, pixel_values)
    fresh_maps = compute_maps(fresh, fresh_structure, pixel_values, targets, maps)
    rng = np.random.default_rng(seed)
    pixels = pixel_values.shape[-2] * pixel_values.shape[-1]
    random_orders = [rng.permutation(pixels) for _ in range(len(targets))]
    random_auc = [_area(deletion_curve(model, pixel_values[i], None, int(t), multi_label, order=random_orders[i]))
                  for i, t in enumerate(targets)]
    report = {}
    for method, method_maps in maps.items():
        correlations = [rank_correlation(a, b) for a, b in zip(method_maps, fresh_maps[method])]
        deletion = [_area(deletion_curve(model, pixel_values[i], method_maps[i], int(t), multi_label))
                    for i, t in enumerate(targets)]
        report[method] = {
            "randomisation_rank_correlation": float(np.mean(correlations)),
            "deletion_auc": float(np.mean(deletion)),
            "deletion_auc_random": float(np.mean(random_auc)),
            "per_image": {"randomisation_rank_correlation": correlations, "deletion_auc": deletion,
                          "deletion_auc_random": random_auc},
        }
    return report


# ---------------------------------------------------------------------------------------------
# Explaining a set of images
# ---------------------------------------------------------------------------------------------


@dataclass
class Item:
    """One image to explain; ``truth`` (label names) is known for a data set's split."""

    name: str  # file stem for its PNG
    source: str  # a path, or "test[INDEX]"
    image: object  # PIL RGB
    truth: list[str] | None = None


@dataclass
class Explained:
    items: list[Item]
    label_names: list[str]
    scores: np.ndarray  # (N, K)
    targets: np.ndarray  # (N,) the explained class
    shown: np.ndarray  # (N, H, W, 3) the input as the model sees it, 0..1
    maps: dict[str, np.ndarray]  # method -> (N, H, W)
    structure: Structure
    multi_label: bool
    sanity: dict[str, dict] | None


def processor_inputs(classifier: Classifier, images):
    """The model's input for PIL images, through its own processor (as predict and pipeline do)."""
    inputs = classifier.processor(images, return_tensors="pt", **classifier.processor_options)
    return inputs["pixel_values"].to(classifier.device).float()


def _shown(classifier: Classifier, pixel_values) -> np.ndarray:
    """Undo the processor's normalisation: the image the model sees, aligned with its maps."""
    processor = classifier.processor
    channels = pixel_values.shape[1]
    mean = np.asarray(getattr(processor, "image_mean", None) or [0.0] * channels, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(getattr(processor, "image_std", None) or [1.0] * channels, dtype=np.float32).reshape(1, -1, 1, 1)
    if not getattr(processor, "do_normalize", True):
        mean, std = np.zeros_like(mean), np.ones_like(std)
    values = pixel_values.detach().cpu().numpy() * std + mean
    return np.clip(values.transpose(0, 2, 3, 1), 0.0, 1.0)


def check_methods(methods: list[str], structure: Structure) -> None:
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise UserError(f"--methods: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    unsupported = [method for method in methods if method not in structure.methods]
    if unsupported:
        raise UserError(
            f"--methods {unsupported[0]} needs attention weights, which a CNN has none of; use --methods "
            + ",".join(structure.methods)
        )


def explain_items(classifier: Classifier, items: list[Item], methods: list[str] | None = None,
                  sanity: bool = True, batch_size: int = 16, seed: int = 0) -> Explained:
    """Scores, maps (and sanity checks) for ``items``; ``methods`` None: every method that applies."""
    from .inference import score_images

    model = classifier.model
    pixel_values = processor_inputs(classifier, [item.image for item in items])
    structure = find_structure(model, pixel_values)
    methods = list(structure.methods) if methods is None else methods
    check_methods(methods, structure)
    scores = np.concatenate([score_images(classifier, [item.image for item in items[start:start + batch_size]])
                             for start in range(0, len(items), batch_size)])
    targets = scores.argmax(axis=1)
    maps: dict[str, list] = {method: [] for method in methods}
    for start in range(0, len(items), batch_size):
        batch = compute_maps(model, structure, pixel_values[start:start + batch_size], targets[start:start + batch_size], methods)
        for method in methods:
            maps[method].append(batch[method])
    maps = {method: np.concatenate(parts) for method, parts in maps.items()}
    report = sanity_checks(model, structure, pixel_values, targets, maps, classifier.multi_label, seed) if sanity else None
    return Explained(items, classifier.label_names, scores, targets, _shown(classifier, pixel_values), maps,
                     structure, classifier.multi_label, report)


# ---------------------------------------------------------------------------------------------
# Figures and files
# ---------------------------------------------------------------------------------------------


def _draw_row(axes, explained: Explained, index: int, methods: list[str]) -> None:
    item = explained.items[index]
    names = explained.label_names
    scores = explained.scores[index]
    target = names[int(explained.targets[index])]
    image = explained.shown[index]
    axes[0].imshow(image, interpolation="nearest")
    truth = f"true: {', '.join(item.truth) or 'none'}\n" if item.truth is not None else ""
    axes[0].set_title(f"{item.name}\n{truth}predicted: {target}", fontsize=8)
    for axis, method in zip(axes[1:], methods):
        axis.imshow(image, interpolation="nearest")
        axis.imshow(explained.maps[method][index], cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="nearest")
        axis.set_title(f"{METHODS[method]}\nfor {target}", fontsize=8)
    bars = axes[-1]
    positions = np.arange(len(names))
    colours = ["tab:red" if i == int(explained.targets[index]) else "tab:grey" for i in positions]
    bars.barh(positions, scores, color=colours)
    bars.set_yticks(positions, [f"{name[:18]} {score:.3f}" for name, score in zip(names, scores)], fontsize=7)
    bars.invert_yaxis()
    bars.set_xlim(0, 1)
    bars.tick_params(axis="x", labelsize=7)
    bars.set_title("sigmoid scores" if explained.multi_label else "class probabilities", fontsize=8)
    for axis in axes[:-1]:
        axis.set_xticks([])
        axis.set_yticks([])


def _figure(explained: Explained, rows: list[int], methods: list[str], title: str | None = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = len(methods) + 2
    figure, axes = plt.subplots(len(rows), columns, figsize=(2.1 * columns + 0.6, 2.35 * len(rows)), squeeze=False,
                                gridspec_kw={"width_ratios": [1] * (columns - 1) + [1.4]})
    for axis_row, index in zip(axes, rows):
        _draw_row(axis_row, explained, index, methods)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return figure


def _save(figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure.savefig(path, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)


def _sanity_caption(sanity: dict | None) -> str | None:
    if not sanity:
        return None
    return "Sanity checks (mean over these images):\n" + "\n".join(
        f"{METHODS[m]}: rank correlation with a randomised model {v['randomisation_rank_correlation']:.2f}, "
        f"deletion AUC {v['deletion_auc']:.2f} (random order {v['deletion_auc_random']:.2f})"
        for m, v in sanity.items())


@dataclass
class _NewFolder:
    path: Path
    staging: Path


def _check_output_dir(path: Path) -> None:
    """Refuse a folder that holds something other than an earlier explanation (it is replaced whole)."""
    if path.exists() and not path.is_dir():
        raise UserError(f"--output_dir {path} is a file; pass a folder name, e.g. --output_dir {path.with_suffix('')}_explained")
    if path.is_dir() and any(path.iterdir()) and not (path / SUMMARY_FILE).is_file():
        raise UserError(
            f"--output_dir {path} exists and holds other files (no {SUMMARY_FILE}); it would be replaced whole, "
            "so pass a new folder"
        )
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise UserError(f"--output_dir {path}: cannot write in {parent}; choose another location")


def write_explanations(explained: Explained, output_dir: str | os.PathLike, methods: list[str], about: dict) -> Path:
    """Per-image PNGs, the grid, maps.npz and explanations.json, built beside ``output_dir`` and
    renamed into place: an earlier explanation is replaced whole, a failure leaves it as it was."""
    target = Path(output_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        records = []
        for index, item in enumerate(explained.items):
            file_name = f"{index:03d}_{item.name}.png"
            _save(_figure(explained, [index], methods), staging / file_name)
            scores = explained.scores[index]
            predicted = _predicted_names(scores, explained.label_names, explained.multi_label)
            records.append({
                "file": file_name, "source": item.source, "true": item.truth, "predicted": predicted,
                "explained_class": explained.label_names[int(explained.targets[index])],
                "correct": None if item.truth is None else _is_correct(item.truth, predicted, explained, index),
                "scores": {name: float(value) for name, value in zip(explained.label_names, scores)},
            })
        rows = list(range(min(len(explained.items), MAX_GRID_ROWS)))
        _save(_figure(explained, rows, methods, _sanity_caption(explained.sanity)), staging / GRID_FILE)
        np.savez_compressed(staging / MAPS_FILE, **explained.maps, targets=explained.targets, scores=explained.scores)
        summary = {
            **about,
            "methods": {method: METHODS[method] for method in methods},
            "target_layer": explained.structure.target_name,
            "token_read": None if explained.structure.kind != "tokens"
            else ("mean of patch tokens" if explained.structure.reads_mean else "CLS token"),
            "sanity_checks": explained.sanity,
            "grid": GRID_FILE, "grid_rows": len(rows),
            "images": records,
        }
        outputs.write_json(staging / SUMMARY_FILE, summary)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / "previous")
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _predicted_names(scores: np.ndarray, names: list[str], multi_label: bool) -> list[str]:
    if multi_label:
        return [name for name, score in zip(names, scores) if score > 0.5]
    return [names[int(np.argmax(scores))]]


def _is_correct(truth: list[str], predicted: list[str], explained: Explained, index: int) -> bool:
    if explained.multi_label:  # the explained (top) finding is truly present
        return explained.label_names[int(explained.targets[index])] in truth
    return truth == predicted


# ---------------------------------------------------------------------------------------------
# A run's own test split
# ---------------------------------------------------------------------------------------------


def _test_predictions(run: Path, label_names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices, truth (N, K) 0/1, scores (N, K)) from the run's test_predictions.csv."""
    path = run / outputs.PREDICTIONS_FILE
    if not path.is_file():
        raise UserError(f"--split test: {run} has no {outputs.PREDICTIONS_FILE}, so it is not a finished run of "
                        "hf-medbeit train; pass a run folder, or image files instead of --split")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    indices = np.asarray([int(row["index"]) for row in rows])
    scores = np.asarray([[float(row[f"score_{name}"]) for name in label_names] for row in rows])
    if rows and "label" in rows[0]:
        truth = np.eye(len(label_names), dtype=int)[[int(row["label"]) for row in rows]]
    else:
        truth = np.asarray([[int(row[f"label_{name}"]) for name in label_names] for row in rows])
    return indices, truth, scores


def select_test_images(truth: np.ndarray, scores: np.ndarray, per_class: int | None, num_images: int | None,
                       misclassified_first: bool) -> list[int]:
    """Rows to explain. Default: per class (by true class; for multi-label, by the top finding)
    up to ``per_class`` wrongly and ``per_class`` rightly classified images, most confident first.
    ``misclassified_first``: ``num_images`` rows, the most confidently wrong first, then right ones."""
    top = scores.argmax(axis=1)
    confidence = scores.max(axis=1)
    correct = truth[np.arange(len(top)), top] == 1
    if truth.sum(axis=1).max(initial=0) <= 1:  # single-label: the true class
        group = truth.argmax(axis=1)
    else:
        group = top
    if misclassified_first:
        order = sorted(range(len(top)), key=lambda i: (bool(correct[i]), -confidence[i], i))
        return order[:num_images]
    chosen = []
    for label in range(scores.shape[1]):
        for want in (True, False):
            rows = [i for i in range(len(top)) if group[i] == label and correct[i] == want]
            chosen += sorted(rows, key=lambda i: (-confidence[i], i))[:per_class]
    return chosen


def _test_images(run: Path, results: dict, indices: list[int]) -> list:
    """The test split's images at ``indices``, read from the run's data file (checked by MD5)."""
    from PIL import Image

    from .data import _NpyMember, file_md5, get_spec

    config = json.loads((run / outputs.RUN_CONFIG_FILE).read_text()) if (run / outputs.RUN_CONFIG_FILE).is_file() else {}
    spec = get_spec(results["dataset"], results.get("size", 28))
    from medmnist.info import DEFAULT_ROOT

    root = Path(config.get("data_dir") or DEFAULT_ROOT).expanduser()
    path = root / spec.filename
    if not path.is_file():
        raise UserError(f"--split test: the run's data file {path} is not there; put {spec.filename} back in {root} "
                        "(the run reads its test images from it)")
    recorded = results.get("data_md5")
    if recorded and file_md5(path) != recorded:
        raise UserError(f"--split test: {path} is not the file this run was tested on (MD5 differs from the run's "
                        f"{recorded}); put that file back, or explain image files instead")
    images = []
    with zipfile.ZipFile(path) as archive:
        member = _NpyMember(archive, "test_images")
        for index in indices:
            row = next(member.iter_chunks(rows=1, start=index, stop=index + 1))[0]
            images.append(Image.fromarray(row).convert("RGB"))
    return images


def run_test_items(run: Path, per_class: int | None, num_images: int | None, misclassified_first: bool) -> list[Item]:
    results = outputs.read_results(run)
    names = list(results["label_names"])
    indices, truth, scores = _test_predictions(run, names)
    rows = select_test_images(truth, scores, per_class, num_images, misclassified_first)
    images = _test_images(run, results, [int(indices[row]) for row in rows])
    return [
        Item(name=f"test_{indices[row]}", source=f"test[{indices[row]}]", image=image,
             truth=[name for name, on in zip(names, truth[row]) if on])
        for row, image in zip(rows, images)
    ]


def write_run_explanations(run_dir: str | os.PathLike, per_class: int = DEFAULT_PER_CLASS, device: str | None = None) -> Path:
    """``RUN/explanations``: a few test images per class (right and wrong), explained; the model
    card shows its grid. What ``hf-medbeit explain --model RUN --split test`` writes; meant to be
    called at the end of training, after the run's predictions are written and before the card."""
    run = Path(run_dir)
    classifier = load_classifier(str(run), device=device, attn_implementation="eager")
    items = run_test_items(run, per_class, None, False)
    explained = explain_items(classifier, items)
    methods = list(explained.maps)
    about = {"model": str(run), "split": "test", "selection": f"per class, up to {per_class} right and {per_class} wrong"}
    return write_explanations(explained, run / EXPLANATIONS_DIR, methods, about)


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-medbeit explain",
        description="Heat maps of where a model looks (Grad-CAM; attention rollout and last-layer attention for "
        "ViT/BEiT), per image and in one grid, with a sanity check per method.",
    )
    parser.add_argument("--model", required=True, help="Run folder or Hub repository id (USER/NAME).")
    parser.add_argument("inputs", nargs="*", metavar="IMAGES_OR_FOLDERS", help="Image files and/or folders.")
    parser.add_argument("--split", choices=["test"], default=None, help="Explain the run's own test split instead of files.")
    parser.add_argument("--per_class", type=int, default=None,
                        help=f"--split test: per class, this many wrong and this many right images (default {DEFAULT_PER_CLASS}).")
    parser.add_argument("--misclassified_first", action="store_true",
                        help="--split test: take --num_images images, the most confidently misclassified first.")
    parser.add_argument("--num_images", type=int, default=None,
                        help=f"With --misclassified_first: how many (default {DEFAULT_NUM_IMAGES}).")
    parser.add_argument("--methods", default=None, help="Comma-separated: gradcam, rollout, attention (default: all that apply).")
    parser.add_argument("--output_dir", default=None, help="Folder to write (default: RUN/explanations for --split test, else explanations).")
    parser.add_argument("--no_sanity_check", action="store_true", help="Skip the randomisation and deletion checks.")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available).")
    parser.add_argument("--revision", default=None, help="Branch, tag or commit of a Hub repository.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the randomised model and random deletion order.")
    return parser


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    # Every argument is checked before the model is loaded.
    if args.split and args.inputs:
        raise UserError("pass image files or --split test, not both")
    if not args.split and not args.inputs:
        raise UserError("nothing to explain; pass image files or folders, or --split test for a run's own test split")
    if not args.split and (args.per_class is not None or args.misclassified_first or args.num_images is not None):
        raise UserError("--per_class, --misclassified_first and --num_images choose from a test split; add --split test")
    if args.per_class is not None and args.misclassified_first:
        raise UserError("--per_class and --misclassified_first choose images in two different ways; pass one of them")
    if args.num_images is not None and not args.misclassified_first:
        raise UserError("--num_images goes with --misclassified_first; add it, or use --per_class")
    for flag, value in (("--per_class", args.per_class), ("--num_images", args.num_images), ("--batch_size", args.batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value} must be at least 1")
    methods = None
    if args.methods is not None:
        methods = [method.strip() for method in args.methods.split(",") if method.strip()]
        unknown = [method for method in methods if method not in METHODS]
        if unknown or not methods:
            raise UserError(f"--methods {args.methods}: choose from {', '.join(METHODS)} (comma-separated)")
    device = resolve_device(args.device)
    local = check_model_reference(args.model)
    if args.split and local is None:
        raise UserError(f"--split test reads a run's own test split and predictions, so --model must be a run folder, "
                        f"not the Hub id {args.model}; pass image files instead")
    output_dir = Path(args.output_dir or (local / EXPLANATIONS_DIR if args.split else EXPLANATIONS_DIR))
    _check_output_dir(output_dir)

    if args.split:
        items = run_test_items(local, args.per_class or DEFAULT_PER_CLASS, args.num_images or DEFAULT_NUM_IMAGES,
                               args.misclassified_first)
        if not items:
            raise UserError(f"{local}'s test split has no image to explain")
        about = {"model": args.model, "split": "test",
                 "selection": (f"the {len(items)} most confidently misclassified first" if args.misclassified_first
                               else f"per class, up to {args.per_class or DEFAULT_PER_CLASS} right and wrong")}
    else:
        skipped = []

        def report(path, reason):
            skipped.append(path)
            print(f"hf-medbeit: skipped {path}: {reason}", file=sys.stderr)

        items = []
        for path in find_images(args.inputs, on_skip=report):
            try:
                items.append(Item(name=path.stem, source=str(path), image=load_image(path)))
            except IMAGE_ERRORS as error:
                report(path, f"cannot read it as an image ({str(error).splitlines()[0] if str(error) else type(error).__name__})")
        if not items:
            raise UserError(f"none of {' '.join(args.inputs)} could be read as an image (see above); pass image files")
        about = {"model": args.model, "split": None}
    classifier = load_classifier(args.model, device=device, revision=args.revision, attn_implementation="eager")
    explained = explain_items(classifier, items, methods, sanity=not args.no_sanity_check, batch_size=args.batch_size, seed=args.seed)
    about["command"] = "hf-medbeit explain " + " ".join(argv if argv is not None else sys.argv[2:])
    written = write_explanations(explained, output_dir, list(explained.maps), about)
    print(f"hf-medbeit: explained {len(items)} images with {', '.join(explained.maps)}; wrote {written}", file=sys.stderr)
    if explained.sanity:
        for method, numbers in explained.sanity.items():
            print(f"  {method}: rank correlation with a randomised model {numbers['randomisation_rank_correlation']:.3f}, "
                  f"deletion AUC {numbers['deletion_auc']:.3f} (random order {numbers['deletion_auc_random']:.3f})",
                  file=sys.stderr)
    return written
