"""``hf-medbeit predict``: classify image files with a trained model (a run folder or a Hub repo).

    hf-medbeit predict --model runs/beit-breast scans/ extra.png --output predictions.csv
    hf-medbeit predict --model user/beit-breastmnist images/ --output predictions.json --batch_size 128

Files are read, converted to RGB, passed through the model's own image processor and model in
batches; memory stays bounded by the batch size however many files there are, and results are
written as each batch completes. Images of any size and of the usual modes are accepted:
grayscale (replicated to RGB, as in training), RGB, RGBA (composited onto black, the background of
most medical images), palette, and 16-bit grayscale (scaled from 0-65535 to 0-255, not clipped).
A file that cannot be read is reported on stderr and skipped; the command fails only when no file
could be read at all.

The scores are the same as ``transformers.pipeline("image-classification")`` gives (softmax, or
sigmoid for multi-label models), because the same processor and model compute them.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import outputs
from .errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm"}
# A decompression bomb check still applies (Pillow's default limit); this is only the batch size.
DEFAULT_BATCH_SIZE = 64


# ---------------------------------------------------------------------------------------------
# Reading images
# ---------------------------------------------------------------------------------------------


def _to_uint8(array: np.ndarray, bits_max: float) -> np.ndarray:
    return np.clip(np.rint(array.astype(np.float64) * (255.0 / bits_max)), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB, the way a radiologist's viewer would show it.

    * 16-bit grayscale ('I;16', 'I;16B', 'I;16L', and 'I' holding 16-bit values): scaled linearly
      from 0..65535 to 0..255 (a value of 4096 becomes 16, it is not clipped to 255);
    * 32-bit integer or float ('I', 'F') with values beyond 16 bits: scaled from its own range;
    * with alpha ('RGBA', 'LA', 'PA', palette with transparency): composited onto black;
    * anything else (L, 1, P, CMYK, YCbCr, ...): Pillow's conversion.
    """
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        array = np.asarray(image)
        if mode.startswith("I;16"):
            gray = _to_uint8(array, 65535.0)
        else:
            low, high = float(np.min(array)), float(np.max(array))
            if low >= 0 and high <= 255 and mode == "I":
                gray = array.astype(np.uint8)
            elif low >= 0 and high <= 65535:
                gray = _to_uint8(array, 65535.0 if mode == "I" else max(high, 1.0))
            else:
                gray = _to_uint8(array - low, max(high - low, 1e-12))
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read one file into an 8-bit RGB image (the first frame of a multi-frame file)."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def find_images(inputs: Iterable[str]) -> list[Path]:
    """Files named directly (any extension), plus image files found recursively in folders."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.exists():
            found.append(path)
        else:
            raise UserError(f"{item} does not exist; pass image files or folders of images")
    return found


# ---------------------------------------------------------------------------------------------
# Model and batched prediction
# ---------------------------------------------------------------------------------------------


@dataclass
class Classifier:
    model: object
    processor: object
    device: str
    multi_label: bool
    processor_options: dict  # extra arguments of every processor call

    @property
    def label_names(self) -> list[str]:
        id2label = self.model.config.id2label
        return [id2label[index] for index in range(len(id2label))]


def load_classifier(model_ref: str, device: str | None = None, revision: str | None = None) -> Classifier:
    """A model and its image processor from a run folder or a Hub repository id."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = AutoModelForImageClassification.from_pretrained(model_ref, revision=revision)
        processor = AutoImageProcessor.from_pretrained(model_ref, revision=revision)
    except (OSError, ValueError) as error:
        raise UserError(
            f"could not load the model {model_ref!r} ({str(error).splitlines()[0]}); pass a run folder or a Hub id "
            "with config.json, weights and preprocessor_config.json"
        ) from error
    model.eval().to(device)
    multi_label = getattr(model.config, "problem_type", None) == "multi_label_classification"
    # transformers' torchvision-backed processors batch same-size images and, given `device`, resize
    # and normalise them there (on a GPU, no per-image CPU work); other processors run as they are.
    accepted = getattr(getattr(processor, "valid_kwargs", None), "__annotations__", {})
    options = {"device": device} if "device" in accepted else {}
    return Classifier(model=model, processor=processor, device=device, multi_label=multi_label, processor_options=options)


def score_images(classifier: Classifier, images: list[Image.Image]) -> np.ndarray:
    """(N, K) probabilities for a batch of RGB images."""
    import torch

    inputs = classifier.processor(images, return_tensors="pt", **classifier.processor_options)
    pixel_values = inputs["pixel_values"].to(classifier.device)
    with torch.inference_mode():
        logits = classifier.model(pixel_values=pixel_values).logits.float()
    scores = torch.sigmoid(logits) if classifier.multi_label else torch.softmax(logits, dim=-1)
    return scores.cpu().numpy()


def predict_files(
    classifier: Classifier, paths: list[Path], batch_size: int = DEFAULT_BATCH_SIZE, on_error=None, progress=None
) -> Iterator[tuple[Path, np.ndarray]]:
    """Yield (path, scores) per readable file, reading and scoring ``batch_size`` files at a time.

    ``on_error(path, error)`` is called for each unreadable file; ``progress.update(n)`` per file.
    """
    for start in range(0, len(paths), batch_size):
        batch_paths, batch_images = [], []
        for path in paths[start:start + batch_size]:
            try:
                batch_images.append(load_image(path))
                batch_paths.append(path)
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                if on_error is not None:
                    on_error(path, error)
            if progress is not None:
                progress.update(1)
        if batch_images:
            yield from zip(batch_paths, score_images(classifier, batch_images))


def _predicted(scores: np.ndarray, label_names: list[str], multi_label: bool) -> str:
    if multi_label:
        return ";".join(name for name, score in zip(label_names, scores) if score > 0.5)
    return label_names[int(np.argmax(scores))]


class _Writer:
    """Streams rows to CSV or JSON; the file appears under its name only when complete."""

    def __init__(self, handle, kind: str, label_names: list[str]):
        self.handle, self.kind, self.label_names = handle, kind, label_names
        self.rows = 0
        if kind == "csv":
            self.csv = csv.writer(handle)
            self.csv.writerow(["path", "prediction", *(f"score_{name}" for name in label_names)])
        else:
            handle.write("[")

    def write(self, path: Path, scores: np.ndarray, prediction: str) -> None:
        if self.kind == "csv":
            self.csv.writerow([str(path), prediction, *(f"{value:.8g}" for value in scores)])
        else:
            record = {
                "path": str(path),
                "prediction": prediction,
                "scores": {name: float(f"{value:.8g}") for name, value in zip(self.label_names, scores)},
            }
            self.handle.write(("\n  " if self.rows == 0 else ",\n  ") + json.dumps(record))
        self.rows += 1

    def close(self) -> None:
        if self.kind == "json":
            self.handle.write("\n]\n")


def run_predictions(model: str, inputs: list[str], output: str | None, batch_size: int, device: str | None, revision: str | None) -> int:
    """The command: returns the number of files scored."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise UserError(f"--batch_size {batch_size} must be at least 1")
    kind = "csv"
    if output is not None:
        suffix = Path(output).suffix.lower()
        if suffix not in (".csv", ".json"):
            raise UserError(f"--output {output} must end in .csv or .json")
        kind = suffix[1:]
    paths = find_images(inputs)
    if not paths:
        raise UserError(f"no image files found in {' '.join(inputs)} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    classifier = load_classifier(model, device=device, revision=revision)
    names = classifier.label_names
    failures = []

    def report(path, error):
        failures.append(path)
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        tqdm.write(f"hf-medbeit: skipped {path}: cannot read it as an image ({detail})", file=sys.stderr)

    def score_all(writer: _Writer) -> None:
        with tqdm(total=len(paths), desc="predict", unit="img", file=sys.stderr, disable=None) as progress:
            for path, scores in predict_files(classifier, paths, batch_size, on_error=report, progress=progress):
                writer.write(path, scores, _predicted(scores, names, classifier.multi_label))
        writer.close()

    if output is None:
        writer = _Writer(sys.stdout, kind, names)
        score_all(writer)
    else:
        with outputs.atomic_path(output) as temporary, open(temporary, "w", newline="") as handle:
            writer = _Writer(handle, kind, names)
            score_all(writer)
            if writer.rows == 0:
                raise UserError(f"none of the {len(paths)} files could be read as an image; nothing written")
    if writer.rows == 0:
        raise UserError(f"none of the {len(paths)} files could be read as an image")
    print(
        f"hf-medbeit: scored {writer.rows} of {len(paths)} files"
        + (f", skipped {len(failures)} unreadable" if failures else "")
        + (f"; wrote {output}" if output else ""),
        file=sys.stderr,
    )
    return writer.rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-medbeit predict",
        description="Classify image files with a trained model (a run folder or a Hub repository).",
    )
    parser.add_argument("--model", required=True, help="Run folder or Hub repository id (USER/NAME).")
    parser.add_argument("inputs", nargs="+", metavar="IMAGES_OR_FOLDERS", help="Image files and/or folders (searched recursively).")
    parser.add_argument("--output", default=None, help="Write predictions to this .csv or .json file (default: CSV on stdout).")
    parser.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="Images per forward pass.")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available).")
    parser.add_argument("--revision", default=None, help="Branch, tag or commit of a Hub repository.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_predictions(args.model, args.inputs, args.output, args.batch_size, args.device, args.revision)
