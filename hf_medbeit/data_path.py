"""Choose how images reach the model: the fast path (default) or the image-processor path.

``fast``: uint8 batches, resized and normalised on the training device (``fast_path.py``).
``processor``: PIL images through the image processor in the data loader (``transforms.py``), as
in Hugging Face's example scripts; kept as the reference, and for what the fast path does not do
(random augmentation, image processors with steps it does not replicate).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

from .fast_path import DevicePreprocessor, UInt8ImageDataset, collate_uint8, processor_supported
from .transforms import collate, make_transform

logger = logging.getLogger(__name__)

DATA_PATHS = ("fast", "processor")


@dataclass
class PreparedSplits:
    """What the Trainer gets: the splits, their collate function and (fast path) the preprocessor."""

    train: Any
    validation: Any
    test: Any
    collate_fn: Callable
    device_preprocessor: DevicePreprocessor | None
    path: str


def prepare_splits(train, validation, test, image_processor, data_path: str = "fast", augment: bool = False) -> PreparedSplits:
    """Wrap the ``datasets`` splits for the chosen data path (falling back to the processor path,
    with a log line saying why, where the fast path does not apply)."""
    if data_path not in DATA_PATHS:
        raise ValueError(f"data_path must be one of {DATA_PATHS}, not {data_path!r}")
    reason = "--augment uses PIL-based random augmentation" if augment else processor_supported(image_processor)
    if data_path == "fast" and reason is None:
        splits = [UInt8ImageDataset(split) for split in (train, validation, test)]
        lazy = [name for name, split in zip(("train", "validation", "test"), splits) if not split.in_memory]
        logger.info("Data path: fast (uint8 batches, resize and normalise on the device)%s",
                    f"; decoded per batch: {', '.join(lazy)}" if lazy else "")
        return PreparedSplits(*splits, collate_uint8, DevicePreprocessor(image_processor), "fast")
    if data_path == "fast":
        logger.warning("Data path: processor (the fast path does not apply: %s)", reason)
    train.set_transform(make_transform(image_processor, augment=augment))
    validation.set_transform(make_transform(image_processor))
    test.set_transform(make_transform(image_processor))
    return PreparedSplits(train, validation, test, collate, None, "processor")


def default_num_workers(prepared: PreparedSplits, requested: int) -> int:
    """Loader processes: what the user asked for; else, on a GPU, a few for splits decoded per
    batch (PNG decoding is the only CPU work left there). In-memory uint8 batches need none."""
    import torch

    if requested or prepared.path != "fast" or not torch.cuda.is_available():
        return requested
    if all(split.in_memory for split in (prepared.train, prepared.validation, prepared.test)):
        return 0
    return min(8, max(1, (os.cpu_count() or 2) // 2))
