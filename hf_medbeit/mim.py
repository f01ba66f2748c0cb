"""Masked image modeling: BEiT's pre-training objective, with targets that can be had offline.

BEiT (Bao et al., ICLR 2022) masks about 40% of the image patches in blocks, replaces their
embeddings with a learned mask token, and trains the encoder to predict, for every masked patch, a
target the unmasked image defines. ``transformers.BeitForMaskedImageModeling`` is that model: a
BEiT encoder, a final LayerNorm and a linear head (``lm_head``) over every patch token. Its
backbone (``beit.*``) is exactly what ``BeitForImageClassification`` loads for fine-tuning.

The paper's target is the visual token of each patch from DALL-E's tokenizer, which cannot be
downloaded here. Two targets that need nothing from outside:

* ``tokens``: BEiT's own loss (cross-entropy over a visual vocabulary) with a tokenizer fitted on
  the pre-training images themselves: a k-means codebook of their patches (``PatchCodebook``).
  A patch's token is its nearest centroid. ``lm_head`` has ``codebook_size`` outputs.
* ``pixels``: SimMIM/MAE-style regression of the masked patches' pixels (L1, each patch normalised
  to zero mean and unit variance as MAE's ``norm_pix_loss``). ``lm_head`` has
  ``patch_size**2 * 3`` outputs: the same model class and weight names, a different output.

Masks are drawn on the host (a boolean per patch; BEiT's block-wise algorithm or uniform random
patches), pixels are resized, normalised and augmented on the training device.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .fast_path import collate_uint8
from .training import MedMNISTTrainer

logger = logging.getLogger(__name__)

CODEBOOK_FILE = "codebook.safetensors"
MIM_TARGETS = ("tokens", "pixels")
MASKING_KINDS = ("block", "random")


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


class BlockMaskGenerator:
    """BEiT's block-wise masking (Bao et al. 2022, Algorithm 1): rectangles of patches with a random
    area (at least ``min_block`` patches) and aspect ratio (0.3 to 1/0.3, log-uniform) are added
    until about ``mask_ratio`` of the grid is masked. Like BEiT's, the count may end a little under
    the target when no further block fits.

    ``min_block`` defaults to BEiT's 16 patches on its 14x14 grid, scaled to this grid's size
    (4 on MedMNIST-28's 7x7 grid with 4x4 patches).
    """

    def __init__(self, grid: tuple[int, int], mask_ratio: float, min_block: int | None = None,
                 min_aspect: float = 0.3, attempts: int = 10):
        self.height, self.width = grid
        self.num_patches = self.height * self.width
        self.target = max(1, int(round(mask_ratio * self.num_patches)))
        self.min_block = min_block or max(1, int(round(16 * self.num_patches / 196)))
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
        self.attempts = attempts

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Try to add one block of at most ``budget`` new patches; return how many were added."""
        for _ in range(self.attempts):
            area = rng.uniform(min(self.min_block, budget), budget)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            block_h = int(round(math.sqrt(area * aspect)))
            block_w = int(round(math.sqrt(area / aspect)))
            if not (0 < block_h <= self.height and 0 < block_w <= self.width):
                continue
            top = rng.integers(0, self.height - block_h + 1)
            left = rng.integers(0, self.width - block_w + 1)
            window = mask[top : top + block_h, left : left + block_w]
            new = block_h * block_w - int(window.sum())
            if 0 < new <= budget:
                window[...] = True
                return new
        return 0

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.target:
            added = self._add_block(mask, self.target - count, rng)
            if added == 0:
                break
            count += added
        return mask.reshape(-1)


class RandomMaskGenerator:
    """Exactly ``round(mask_ratio * patches)`` patches, uniformly at random (SimMIM/MAE style)."""

    def __init__(self, grid: tuple[int, int], mask_ratio: float):
        self.num_patches = grid[0] * grid[1]
        self.target = max(1, int(round(mask_ratio * self.num_patches)))

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros(self.num_patches, dtype=bool)
        mask[rng.choice(self.num_patches, self.target, replace=False)] = True
        return mask


def make_mask_generator(kind: str, grid: tuple[int, int], mask_ratio: float):
    if kind == "block":
        return BlockMaskGenerator(grid, mask_ratio)
    if kind == "random":
        return RandomMaskGenerator(grid, mask_ratio)
    raise ValueError(f"masking must be one of {MASKING_KINDS}, not {kind!r}")


def collate_images(data) -> dict:
    """``collate_uint8`` without labels: pre-training never sees them."""
    batch = collate_uint8(data)
    batch.pop("labels", None)
    return batch


def draw_masks(generator, batch_size: int, rng: np.random.Generator) -> torch.Tensor:
    """(batch_size, patches) booleans, one mask per image."""
    return torch.from_numpy(np.stack([generator(rng) for _ in range(batch_size)]))


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, patches, patch_size**2 * C), patches in the row-major order of BEiT's
    patch embedding (a stride-``patch_size`` convolution, flattened)."""
    batch, channels, height, width = pixel_values.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = pixel_values[:, :, : grid_h * patch_size, : grid_w * patch_size]
    patches = patches.reshape(batch, channels, grid_h, patch_size, grid_w, patch_size)
    return patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, grid_h * grid_w, patch_size * patch_size * channels)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each patch to zero mean and unit variance (MAE's ``norm_pix_loss``)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=False)
    return (patches - mean) / (var + eps).sqrt()


class PatchCodebook:
    """A visual vocabulary fitted offline: k-means centroids of image patches (``codes``,
    (codebook_size, patch_size**2 * 3)). ``tokens`` maps every patch of a batch to its nearest
    centroid on the batch's device."""

    def __init__(self, codes: torch.Tensor, patch_size: int, normalize: bool):
        self.codes = codes.float()
        self.patch_size = patch_size
        self.normalize = normalize
        self._on = {}

    @property
    def size(self) -> int:
        return self.codes.shape[0]

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = patchify(pixel_values.float(), self.patch_size)
        return normalize_patches(patches) if self.normalize else patches

    @torch.no_grad()
    def tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self._features(pixel_values)
        device = features.device
        if device not in self._on:
            self._on[device] = (self.codes.to(device), self.codes.to(device).square().sum(-1))
        codes, code_norms = self._on[device]
        # argmin ||x - c||^2 = argmin (||c||^2 - 2 x.c): one matrix product per batch.
        distances = code_norms - 2 * features @ codes.T
        return distances.argmin(dim=-1)

    @classmethod
    def fit(cls, images, preprocess, patch_size: int, codebook_size: int, normalize: bool, seed: int,
            max_images: int = 20000, max_patches: int = 500_000, batch_size: int = 512) -> "PatchCodebook":
        """k-means (scikit-learn's MiniBatchKMeans) on up to ``max_patches`` patches drawn evenly from
        up to ``max_images`` images of ``images`` (a ``UInt8ImageDataset``), preprocessed as in
        training (``preprocess``). The caps bound the memory at 224x224 (196 patches of 768 values
        per image)."""
        from sklearn.cluster import MiniBatchKMeans

        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(len(images), min(max_images, len(images)), replace=False))
        empty = cls(torch.zeros(1, 1), patch_size, normalize)
        chunks = []
        for start in range(0, len(chosen), batch_size):
            pixels = preprocess(images.__getitems__(chosen[start : start + batch_size].tolist())["pixel_values"])
            features = empty._features(pixels)  # (batch, patches, values)
            per_image = min(features.shape[1], max(1, -(-max_patches // len(chosen))))
            if per_image < features.shape[1]:
                keep = torch.from_numpy(np.argsort(rng.random(features.shape[:2]), axis=1)[:, :per_image])
                features = torch.gather(features, 1, keep[..., None].expand(-1, -1, features.shape[2]))
            chunks.append(features.reshape(-1, features.shape[2]))
        features = torch.cat(chunks).numpy()
        if len(features) < codebook_size:
            raise ValueError(f"{len(features)} patches cannot make {codebook_size} clusters")
        kmeans = MiniBatchKMeans(n_clusters=codebook_size, random_state=seed, batch_size=4096, n_init=3,
                                 max_no_improvement=20)
        kmeans.fit(features)
        logger.info("Codebook: %d centroids fitted on %s patches of %d images (inertia per patch %.4f)",
                    codebook_size, f"{len(features):,}", len(chosen), kmeans.inertia_ / len(features))
        return cls(torch.from_numpy(kmeans.cluster_centers_).float(), patch_size, normalize)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        from .outputs import atomic_path

        with atomic_path(path) as temporary:
            save_file({"codes": self.codes.contiguous()}, str(temporary),
                      metadata={"patch_size": str(self.patch_size), "normalize": str(self.normalize)})

    @classmethod
    def load(cls, path: str | Path) -> "PatchCodebook":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            codes = handle.get_tensor("codes")
        return cls(codes, int(metadata["patch_size"]), metadata.get("normalize") == "True")


class TokenTarget:
    """BEiT's loss: cross-entropy of the masked patches' logits against their codebook tokens."""

    name = "tokens"

    def __init__(self, codebook: PatchCodebook):
        self.codebook = codebook

    @property
    def output_size(self) -> int:
        return self.codebook.size

    def loss(self, predictions: torch.Tensor, pixel_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tokens = self.codebook.tokens(pixel_values)[mask]
        return F.cross_entropy(predictions.float(), tokens)


class PixelTarget:
    """SimMIM/MAE's loss: L1 between the predicted and the (per-patch normalised) pixels of the
    masked patches."""

    name = "pixels"

    def __init__(self, patch_size: int, normalize: bool = True):
        self.patch_size = patch_size
        self.normalize = normalize

    @property
    def output_size(self) -> int:
        return self.patch_size * self.patch_size * 3

    def loss(self, predictions: torch.Tensor, pixel_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = patchify(pixel_values.float(), self.patch_size)
            if self.normalize:
                target = normalize_patches(target)
            target = target[mask]
        return F.l1_loss(predictions.float(), target)


# ---------------------------------------------------------------------------------------------
# Augmentation on the device
# ---------------------------------------------------------------------------------------------


class DeviceAugmenter:
    """A random resized crop (area ``min_scale``..1 of the image, aspect 3/4..4/3) and a horizontal
    flip per image, as one batched affine resampling on the training device (BEiT pre-trains with
    both). The output has the input's size."""

    def __init__(self, min_scale: float = 0.5, flip: bool = True, aspect: tuple[float, float] = (3 / 4, 4 / 3)):
        self.min_scale = min_scale
        self.flip = flip
        self.log_aspect = (math.log(aspect[0]), math.log(aspect[1]))

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``generator`` (a CPU generator) draws the crops; the few numbers per image are drawn on
        the host and the resampling runs on the batch's device."""
        batch = pixel_values.shape[0]
        draws = torch.rand(5, batch, generator=generator)
        scale = self.min_scale + (1.0 - self.min_scale) * draws[0]
        aspect = (self.log_aspect[0] + (self.log_aspect[1] - self.log_aspect[0]) * draws[1]).exp()
        width = (scale * aspect).sqrt().clamp(max=1.0)  # fractions of the image's side
        height = (scale / aspect).sqrt().clamp(max=1.0)
        centre_x = (draws[2] * 2 - 1) * (1 - width)
        centre_y = (draws[3] * 2 - 1) * (1 - height)
        sign = torch.where(draws[4] < 0.5, -1.0, 1.0) if self.flip else torch.ones(batch)
        theta = torch.zeros(batch, 2, 3)
        theta[:, 0, 0] = width * sign
        theta[:, 0, 2] = centre_x
        theta[:, 1, 1] = height
        theta[:, 1, 2] = centre_y
        pixel_values = pixel_values.float()
        grid = F.affine_grid(theta.to(pixel_values.device), list(pixel_values.shape), align_corners=False)
        return F.grid_sample(pixel_values, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


class MaskedImageModelingTrainer(MedMNISTTrainer):
    """``MedMNISTTrainer`` (device preprocessing, checkpoint reloading, layer decay) with the masked
    image modeling loss of ``target`` (``TokenTarget`` or ``PixelTarget``) on
    ``BeitForMaskedImageModeling``: masks from ``mask_generator``, crops from ``augmenter``.

    Masks and crops are drawn from a seed made of the run's seed, the optimizer step, the
    micro-batch within it and the process: a function of where the run is, not of a random stream.
    A run resumed from a checkpoint therefore draws exactly what an uninterrupted run would, and
    ends with the same weights.
    """

    def __init__(self, *args, target, mask_generator, augmenter: DeviceAugmenter | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.target = target
        self.mask_generator = mask_generator
        self.augmenter = augmenter
        self._draw_step, self._micro_batch = -1, 0

    def _draw_seed(self) -> int:
        step = self.state.global_step
        if step != self._draw_step:
            self._draw_step, self._micro_batch = step, 0
        self._micro_batch += 1
        return int(np.random.SeedSequence([self.args.seed, step, self._micro_batch, self.args.process_index]).generate_state(1)[0])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = self.preprocess_on_device(inputs)
        pixel_values = inputs["pixel_values"]
        seed = self._draw_seed()
        if self.augmenter is not None and model.training:
            pixel_values = self.augmenter(pixel_values, generator=torch.Generator().manual_seed(seed))
        mask = draw_masks(self.mask_generator, pixel_values.shape[0], np.random.default_rng(seed)).to(pixel_values.device)
        outputs = model(pixel_values=pixel_values, bool_masked_pos=mask)
        loss = self.target.loss(outputs.logits[mask], pixel_values, mask)
        return (loss, outputs) if return_outputs else loss
