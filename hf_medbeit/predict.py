"""``hf-medbeit predict``: classify image files with a trained model (a run folder or a Hub repo).

    hf-medbeit predict --model runs/beit-breast scans/ extra.png --output predictions.csv
    hf-medbeit predict --model user/beit-breastmnist images/ --output predictions.json --batch_size 128

Files are read, converted to RGB, passed through the model's own image processor and model in
batches; memory stays bounded by the batch size however many files there are, and results are
written as each batch completes. Images of any size and of the usual modes are accepted:
grayscale (replicated to RGB, as in training), RGB, RGBA (composited onto black, the background of
most medical images), palette, and 16-bit grayscale (scaled from 0-65535 to 0-255, not clipped).
A file that cannot be read (including a broken symbolic link or a symbolic link loop) is reported
on stderr and skipped; the command fails only when no file could be read at all.

Arguments are checked before anything is loaded: the output path, the device, and whether
``--model`` is a finished run folder (or, if it is not a local path, a Hub id).

The scores are the same as ``transformers.pipeline("image-classification")`` gives (softmax, or
sigmoid for multi-label models), because the same processor and model compute them.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from . import outputs
from .errors import UserError
# Reading images and loading the model are shared with explain and demo (inference.py); the names
# stay importable from here for existing callers.
from .inference import (  # noqa: F401
    IMAGE_ERRORS, IMAGE_SUFFIXES, Classifier, check_model_reference, check_output_file, find_images, load_classifier,
    load_image, resolve_device, score_images, to_rgb,
)

# A decompression bomb check still applies (Pillow's default limit); this is only the batch size.
DEFAULT_BATCH_SIZE = 64


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
            except IMAGE_ERRORS as error:
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

    # Every argument is checked before the model is loaded, so a mistake costs seconds, not a load.
    if batch_size < 1:
        raise UserError(f"--batch_size {batch_size} must be at least 1")
    kind = "csv"
    if output is not None:
        check_output_file(output)
        suffix = Path(output).suffix.lower()
        if suffix not in (".csv", ".json"):
            raise UserError(f"--output {output} must end in .csv or .json")
        kind = suffix[1:]
    device = resolve_device(device)
    check_model_reference(model)
    failures = []

    def report(path, reason):
        failures.append(path)
        tqdm.write(f"hf-medbeit: skipped {path}: {reason}", file=sys.stderr)

    paths = find_images(inputs, on_skip=report)
    total = len(paths) + len(failures)
    if not paths:
        if failures:
            raise UserError(f"none of the {total} files could be read (each is reported above); check the links and permissions")
        raise UserError(f"no image files found in {' '.join(inputs)} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    classifier = load_classifier(model, device=device, revision=revision)
    names = classifier.label_names

    def unreadable(path, error):
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        report(path, f"cannot read it as an image ({detail})")

    def score_all(writer: _Writer) -> None:
        with tqdm(total=len(paths), desc="predict", unit="img", file=sys.stderr, disable=None) as progress:
            for path, scores in predict_files(classifier, paths, batch_size, on_error=unreadable, progress=progress):
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
                raise UserError(f"none of the {total} files could be read as an image; nothing written")
    if writer.rows == 0:
        raise UserError(f"none of the {total} files could be read as an image")
    print(
        f"hf-medbeit: scored {writer.rows} of {total} files"
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
