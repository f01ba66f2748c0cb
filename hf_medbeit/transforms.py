"""Image-processor transforms, applied lazily per batch with ``Dataset.set_transform``.

The checkpoint's ``AutoImageProcessor`` is the source of truth for input size, resampling, mean
and std. MedMNIST images are grayscale or RGB at 28..224 pixels; they are turned into 3-channel
RGB and the processor resizes them to the model's input size (28 -> 224 for BEiT-base) and
normalises them.

Augmentation is off by default (the study used none). With ``augment=True`` the training split
gets a mild random resized crop, horizontal flip and small rotation before the processor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2


def _augmentation(image_size: int) -> v2.Compose:
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=(0.8, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(10),
        ]
    )


def make_transform(image_processor, augment: bool = False) -> Callable[[dict], dict]:
    """A batched transform for ``Dataset.set_transform``: PIL images -> ``pixel_values``."""

    def transform(batch: dict) -> dict:
        images = [image.convert("RGB") for image in batch["image"]]
        if augment:
            images = [_augmentation(image.height)(image) for image in images]
        pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "label": batch["label"]}

    return transform


def collate(examples: list[dict]) -> dict:
    """Stack examples into a batch; multi-hot labels become float targets for BCE."""
    labels = torch.tensor([example["label"] for example in examples])
    if labels.ndim == 2:
        labels = labels.float()
    return {"pixel_values": torch.stack([example["pixel_values"] for example in examples]), "labels": labels}
