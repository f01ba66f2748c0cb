"""The fast data path: uint8 batches on the host, resize and normalisation as batched torch ops on
the training device.

The processor path (``transforms.py``) turns every image into a PIL image and runs the image
processor on the CPU inside the data loader: per-image Python work that starves a GPU. Here:

* ``UInt8ImageDataset`` holds a split as uint8 pixels, channels first, decoded once from the
  ``datasets`` Image column (small splits, in RAM) or per batch through ``datasets``' numpy
  formatting (large splits, e.g. 224x224 ChestMNIST, which would not fit comfortably in RAM). A batch
  is one fancy-indexing call (``__getitems__``), never a loop over images.
* ``DevicePreprocessor`` does what the image processor does (resize with its resample mode, centre
  crop, rescale, normalise) on a whole batch with ``torchvision.transforms.v2.functional``, on
  whatever device the batch is on. Its numbers come from the image processor, which stays the
  source of truth and is what gets saved with the model, so ``from_pretrained`` and ``pipeline``
  see a plain Hugging Face model and processor.

Grayscale images stay one channel until after the resize: ``convert("RGB")`` copies the gray
value into three channels, so resizing once and broadcasting in the normalisation is the same
result for a third of the work.

On the CPU, torchvision's uint8 resize (the processor's own kernel, so the results match it
bit for bit) is vectorised over the interleaved channels of a channels-last image and slow on
planar ones: pixels are kept channels-last (``(N, H, W, C)`` in memory), and gray batches are
resized four images at a time as the R, G, B, A planes of one image. Each plane is resized on its
own, so the result is identical, about 7x faster than one plane per image (benchmarks/README.md).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as tvF

logger = logging.getLogger(__name__)

# Splits up to this size are decoded into RAM once; larger ones are decoded per batch.
DEFAULT_MAX_IN_MEMORY_BYTES = 2 * 1024**3
# Rows decoded at a time when filling the in-memory array (bounds the temporary PIL/numpy copies).
DECODE_CHUNK_ROWS = 2048

# PIL's resample codes (what image processors store) -> torchvision's modes.
_PIL_TO_TORCHVISION = {
    0: InterpolationMode.NEAREST,
    1: InterpolationMode.LANCZOS,
    2: InterpolationMode.BILINEAR,
    3: InterpolationMode.BICUBIC,
    4: InterpolationMode.BOX,
    5: InterpolationMode.HAMMING,
}
# What torchvision resizes batched tensors with; the others only exist for PIL images.
_TENSOR_MODES = (InterpolationMode.NEAREST, InterpolationMode.NEAREST_EXACT, InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)


class UnsupportedProcessor(ValueError):
    """The image processor does something this module does not replicate; use the processor path."""


def _get(size, key):
    # Processors hold sizes as plain dicts or as transformers' SizeDict; read both the same way.
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _height_width(size, input_hw: tuple[int, int] | None = None) -> tuple[int, int]:
    height, width = _get(size, "height"), _get(size, "width")
    if height and width:
        return int(height), int(width)
    edge = _get(size, "shortest_edge")
    if edge and not _get(size, "longest_edge"):
        # MedMNIST images are square, so "shortest edge = s" is an (s, s) resize.
        if input_hw is not None and input_hw[0] != input_hw[1]:
            raise UnsupportedProcessor("shortest_edge resizing of non-square images")
        return int(edge), int(edge)
    raise UnsupportedProcessor(f"size {dict(size) if isinstance(size, dict) else size}")


class DevicePreprocessor:
    """``image_processor(images)["pixel_values"]`` for a uint8 batch (B, C, H, W), C in {1, 3}, as
    batched torch ops on the batch's own device. Raises ``UnsupportedProcessor`` for processors it
    cannot replicate exactly.

    ``pack_gray_on_cpu=False`` resizes gray batches one plane per image on the CPU too, which is
    the branch every other device takes; the tests use it to check that branch on a CPU.
    """

    def __init__(self, image_processor, pack_gray_on_cpu: bool = True):
        self.pack_gray_on_cpu = pack_gray_on_cpu
        p = image_processor
        for flag in ("do_pad", "do_reduce_labels", "do_convert_grayscale"):
            if getattr(p, flag, False):
                raise UnsupportedProcessor(f"{type(p).__name__} has {flag}=True")
        if getattr(p, "crop_pct", None):
            raise UnsupportedProcessor(f"{type(p).__name__} resizes by crop_pct")
        self.do_resize = bool(getattr(p, "do_resize", False))
        self.size = getattr(p, "size", None)
        _height_width(self.size) if self.do_resize else None  # fail early on sizes we cannot read
        resample = getattr(p, "resample", None)
        if resample is None:
            self.interpolation = InterpolationMode.BILINEAR  # the processors' own default
        elif isinstance(resample, InterpolationMode):
            self.interpolation = resample
        else:
            self.interpolation = _PIL_TO_TORCHVISION[int(resample)]
        if self.do_resize and self.interpolation not in _TENSOR_MODES:
            raise UnsupportedProcessor(f"resample mode {self.interpolation.value} on tensors")
        self.do_center_crop = bool(getattr(p, "do_center_crop", False))
        self.crop_size = _height_width(getattr(p, "crop_size", None)) if self.do_center_crop else None
        self.do_rescale = bool(getattr(p, "do_rescale", True))
        self.rescale_factor = float(getattr(p, "rescale_factor", 1 / 255))
        self.do_normalize = bool(getattr(p, "do_normalize", False))
        mean = torch.as_tensor(getattr(p, "image_mean", 0.0), dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(getattr(p, "image_std", 1.0), dtype=torch.float32).reshape(-1)
        self.mean, self.std = mean.expand(3).clone(), std.expand(3).clone()
        self._affine = {}  # device -> (scale, shift), so no host->device copy per batch

    def output_size(self, input_hw: tuple[int, int]) -> tuple[int, int]:
        hw = _height_width(self.size, input_hw) if self.do_resize else input_hw
        return self.crop_size if self.do_center_crop else hw

    def _scale_shift(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._affine:
            # (x * r - mean) / std == x * (r / std) - mean / std, one fused multiply-add per pixel.
            rescale = self.rescale_factor if self.do_rescale else 1.0
            if self.do_normalize:
                scale, shift = rescale / self.std, -self.mean / self.std
            else:
                scale, shift = torch.full((3,), rescale), torch.zeros(3)
            self._affine[device] = (scale.view(1, 3, 1, 1).to(device), shift.view(1, 3, 1, 1).to(device))
        return self._affine[device]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 images (B, 1|3, H, W), got {images.dtype} {tuple(images.shape)}")
        batch_size, on_cpu = images.shape[0], images.device.type == "cpu"
        # Four gray images as the planes of one RGBA image: see the module docstring.
        packed = on_cpu and self.pack_gray_on_cpu and self.do_resize and images.shape[1] == 1
        if packed:
            images = pack_gray_planes(images)
        # Autocast must not touch these ops: the processor works in float32 and so do we.
        with torch.autocast(images.device.type, enabled=False):
            if self.do_resize:
                # Resizing the uint8 tensor, as the processor does, rounds and clamps the result
                # to 0..255 (bicubic overshoots); antialias=True as in the processor (it only
                # matters when shrinking).
                size = list(_height_width(self.size, tuple(images.shape[-2:])))
                images = tvF.resize(images, size, interpolation=self.interpolation, antialias=True)
            if self.do_center_crop:
                images = tvF.center_crop(images, list(self.crop_size))
            scale, shift = self._scale_shift(images.device)
            # On the CPU, uint8 x float32 promotes on the fly (no float copy of the batch first:
            # about 2x faster there); elsewhere the explicit cast is cheap.
            pixels = images if on_cpu else images.float()
            height, width = images.shape[-2:]
            if packed:
                # (G, 4, H, W) planes -> (G, 4, 1, H, W) against 3 channels: image 4g + p, in order.
                out = torch.empty((images.shape[0], 4, 3, height, width), dtype=torch.float32)
                torch.addcmul(shift.unsqueeze(1), pixels.unsqueeze(2), scale.unsqueeze(1), out=out)
                return out.view(-1, 3, height, width)[:batch_size]
            # A contiguous (B, 3, H, W) result whatever the input's memory layout; broadcasting a
            # (B, 1, H, W) gray batch against 3 channels is convert("RGB").
            out = torch.empty((batch_size, 3, height, width), dtype=torch.float32, device=images.device)
            return torch.addcmul(shift, pixels, scale, out=out)


def pack_gray_planes(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> (ceil(B / 4), 4, H, W) channels-last: image 4g + p is plane p of image g
    (the last group padded with black images, which the caller drops after the resize)."""
    padding = -images.shape[0] % 4
    if padding:
        images = torch.cat([images, images.new_zeros((padding, *images.shape[1:]))])
    return images.reshape(-1, 4, *images.shape[-2:]).contiguous(memory_format=torch.channels_last)


def processor_supported(image_processor) -> str | None:
    """None if the fast path can replicate ``image_processor``, else the reason it cannot."""
    try:
        DevicePreprocessor(image_processor)
    except UnsupportedProcessor as error:
        return str(error)
    return None


# ---------------------------------------------------------------------------------------------
# Host side: uint8 splits and batches
# ---------------------------------------------------------------------------------------------


def _channels_first(batch: np.ndarray) -> torch.Tensor:
    """MedMNIST's (N, H, W) gray or (N, H, W, 3) RGB as an (N, C, H, W) tensor, channels-last in
    memory (a view, no copy): the layout the CPU resize is fast on (module docstring)."""
    batch = torch.from_numpy(np.ascontiguousarray(batch))
    return (batch[..., None] if batch.ndim == 3 else batch).permute(0, 3, 1, 2)


def _label_tensor(labels) -> torch.Tensor:
    labels = torch.as_tensor(np.asarray(labels))
    # Multi-hot rows are BCE targets (float); class indices stay int64 for cross-entropy.
    return labels.float() if labels.ndim == 2 else labels.long()


class UInt8ImageDataset(torch.utils.data.Dataset):
    """A split of a MedMNIST ``DatasetDict`` as uint8 pixels (channels first) and labels; a data
    set without a ``label`` column (unlabelled images for pre-training) gives pixels only.

    ``in_memory=None`` decides by size (``max_in_memory_bytes``): decoded once into one array, or
    decoded per batch from the Arrow file (then DataLoader workers decode in parallel).
    """

    def __init__(self, dataset, in_memory: bool | None = None, max_in_memory_bytes: int = DEFAULT_MAX_IN_MEMORY_BYTES):
        columns = [name for name in ("image", "label") if name in dataset.column_names]
        self.dataset = dataset.select_columns(columns).with_format("numpy")
        self.labels = None
        if "label" in columns:
            self.labels = _label_tensor(self.dataset.select_columns(["label"])[:]["label"]) if len(dataset) else torch.zeros(0, dtype=torch.long)
        first = self.dataset[0:1]["image"] if len(dataset) else np.zeros((0, 1, 1), np.uint8)
        self.image_shape = _channels_first(first).shape[1:]
        nbytes = len(dataset) * int(np.prod(self.image_shape))
        self.in_memory = nbytes <= max_in_memory_bytes if in_memory is None else in_memory
        self.images = self._decode_all() if self.in_memory else None

    def _decode_all(self) -> torch.Tensor:
        # Channels-last, the layout the CPU resize is fast on; indexed batches keep it.
        images = torch.empty((len(self.dataset), *self.image_shape), dtype=torch.uint8, memory_format=torch.channels_last)
        for start in range(0, len(self.dataset), DECODE_CHUNK_ROWS):
            chunk = self.dataset[start : start + DECODE_CHUNK_ROWS]["image"]
            images[start : start + len(chunk)] = _channels_first(chunk)
        return images

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices) -> dict:
        """A whole batch in one indexing call; ``collate_uint8`` passes it through."""
        index = torch.as_tensor(indices, dtype=torch.long)
        if self.images is not None:
            pixels = self.images[index]
        else:
            pixels = _channels_first(self.dataset[list(map(int, indices))]["image"])
        if self.labels is None:
            return {"pixel_values": pixels}
        return {"pixel_values": pixels, "labels": self.labels[index]}

    def __getitem__(self, index: int) -> dict:
        batch = self.__getitems__([index])
        return {key: value[0] for key, value in batch.items()}


def collate_uint8(data) -> dict:
    """Collate for ``UInt8ImageDataset``: a batch from ``__getitems__`` passes through; a list of
    single examples (samplers that fetch one at a time) is stacked."""
    if isinstance(data, dict):
        return data
    return {key: torch.stack([example[key] for example in data]) for key in data[0]}
