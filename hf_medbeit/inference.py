"""What ``predict``, ``explain`` and ``demo`` share: reading images and loading a classifier.

* Images: any file Pillow reads, converted to 8-bit RGB the way a viewer shows it (``to_rgb``:
  16-bit scaled, alpha composited onto black, grayscale replicated); folders searched recursively
  with links followed and whatever cannot be read reported, never dropped (``find_images``).
* Models: a finished run folder or a Hub id, checked before anything is loaded
  (``check_model_reference``), loaded with its own image processor on a checked device
  (``load_classifier``); ``score_images`` gives the scores ``pipeline("image-classification")``
  gives (softmax, or sigmoid for multi-label models).
"""

from __future__ import annotations

import difflib
import errno
import os
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm"}
# What reading an image file can raise when the file is not a usable image.
IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


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


def _print_skip(path: Path, reason: str) -> None:
    print(f"hf-medbeit: skipped {path}: {reason}", file=sys.stderr)


def _unreachable(path: Path, error: OSError) -> str:
    """Why ``path`` (which exists as a directory entry) cannot be opened."""
    if error.errno == errno.ELOOP:
        return "cannot read it (symbolic link loop)"
    if os.path.islink(path) and error.errno == errno.ENOENT:
        return f"cannot read it (broken symbolic link to {os.readlink(path)})"
    return f"cannot read it ({error.strerror or type(error).__name__})"


def _walk_images(root: Path, skip) -> Iterator[Path]:
    """Image files under ``root``, following folder links; what cannot be used goes to ``skip``.

    os.walk rather than Path.rglob: rglob neither follows links to folders nor says what it could not
    read (it drops unreadable folders, broken links and link loops without a word). Following links
    needs a guard: a link back to one of its own ancestors would recurse forever.
    """

    def unlistable(error: OSError) -> None:
        skip(Path(error.filename), f"cannot list this folder ({error.strerror})")

    def leads_back(real: str, chain: tuple[str, ...]) -> bool:
        # Back to a folder already on the way down, or to an ancestor of where the walk stands now
        # (a link to ".." or "/", which would walk everything above the input folder, then loop).
        return real in chain or os.path.commonpath([real, chain[-1]]) == real

    chains = {str(root): (os.path.realpath(root),)}  # folder -> real paths of it and the folders above it in the walk
    for folder, subfolders, files in os.walk(str(root), onerror=unlistable, followlinks=True):
        chain = chains.pop(folder)
        kept = []
        for name in sorted(subfolders):
            subfolder = os.path.join(folder, name)
            real = os.path.realpath(subfolder)
            if leads_back(real, chain):
                skip(Path(subfolder), f"not followed (symbolic link loop back to {real})")
            else:
                chains[subfolder] = (*chain, real)
                kept.append(name)
        subfolders[:] = kept
        for name in sorted(files):
            path = Path(folder, name)
            try:
                mode = os.stat(path).st_mode
            except OSError as error:
                # Whatever its name, a link that leads nowhere may hide images: say so.
                skip(path, _unreachable(path, error))
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if stat.S_ISREG(mode):
                yield path
            else:
                skip(path, "cannot read it (not a regular file)")


def find_images(inputs: Iterable[str], on_skip=None) -> list[Path]:
    """Files named directly (any extension), plus image files found recursively in folders.

    Links to files and folders are followed. A broken link, a link loop, a folder that cannot be
    listed or a special file is passed to ``on_skip(path, reason)`` (default: one line on stderr),
    never dropped silently. A name that does not exist at all is an error.
    """
    skip = on_skip or _print_skip
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(_walk_images(path, skip)))
        elif path.exists():
            found.append(path)
        elif os.path.lexists(path):  # the name is there, as a link that cannot be followed
            try:
                os.stat(path)
            except OSError as error:
                skip(path, _unreachable(path, error))
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


def check_output_file(output: str, flag: str = "--output", example: str = "predictions.csv") -> None:
    """Refuse an output path that can never become a file, before any work is done."""
    path = Path(output)
    if path.is_dir():
        raise UserError(f"{flag} {output} is a directory; pass a file name, e.g. {flag} {path / example}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:  # missing folders are created when writing
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {output}: {parent} is a file, not a folder; choose another location")
    try:  # the one reliable test (permissions, read-only file systems, root): create a file there
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as error:
        raise UserError(f"{flag} {output}: cannot write in {parent} ({error.strerror}); choose another location") from None


def resolve_device(device: str | None) -> str:
    """The device to run on, checked against what this machine has (default: cuda if available)."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device} is not a device name; use --device cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return device
    if parsed.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise UserError(f"--device {device}: no CUDA device is visible on this machine; use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise UserError(f"--device {device}: only {count} CUDA device(s) are visible (cuda:0 to cuda:{count - 1}); pick one of them or use --device cpu")
        return device
    if parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {device}: no MPS (Apple GPU) device is available here; use --device cpu")
        return device
    raise UserError(f"--device {device}: hf-medbeit runs on cpu, cuda or mps; use --device cpu or --device cuda")


def _looks_local(model_ref: str) -> bool:
    prefixes = tuple(f"{start}{separator}" for start in (".", "..") for separator in {os.sep, os.altsep or os.sep})
    return model_ref in (".", "..") or model_ref.startswith((*prefixes, "~")) or os.path.isabs(model_ref)


def check_model_reference(model_ref: str) -> Path | None:
    """The run folder ``model_ref`` names, or None if it is to be read as a Hub repository id.

    Catches, before anything is loaded, what from_pretrained would report misleadingly: a local
    path with a typo (reported as a failed Hub download) and a folder without config.json, such
    as an unfinished run (reported as a config without ``model_type``).
    """
    from huggingface_hub.utils import validate_repo_id

    path = Path(model_ref).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        from .resilience import last_complete_checkpoint

        checkpoint = last_complete_checkpoint(str(path))
        if checkpoint is not None:
            raise UserError(
                f"--model {model_ref} is not a finished run (no config.json yet); pass its last checkpoint, "
                f"--model {checkpoint}, or finish training by running the same train command again"
            )
        if any(path.glob("checkpoint-*")):
            raise UserError(
                f"--model {model_ref} is not a finished run (no config.json) and holds no complete checkpoint; "
                "finish training by running the same train command again"
            )
        raise UserError(
            f"--model {model_ref} has no config.json, so it is not a run folder; pass the folder that "
            "hf-medbeit train wrote (it holds config.json and model.safetensors) or one of its checkpoint-* folders"
        )
    if os.path.lexists(path):
        raise UserError(f"--model {model_ref} is not a folder; pass a run folder (it holds config.json) or a Hub id USER/NAME")
    try:
        validate_repo_id(model_ref)
        hub_form = True
    except ValueError:
        hub_form = False
    if hub_form and not _looks_local(model_ref):
        return None
    # Only a local folder could be meant: say which part of the path is wrong.
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    hint = "check the path"
    if parent == path.parent and parent.is_dir():
        nearby = difflib.get_close_matches(path.name, [entry.name for entry in parent.iterdir() if entry.is_dir()], n=1)
        if nearby:
            hint = f"did you mean --model {Path(model_ref).parent / nearby[0]}?"
    else:
        hint = f"check the path ({parent.absolute()} has no {path.relative_to(parent).parts[0]})"
    raise UserError(f"--model {model_ref}: the local folder {path.absolute()} does not exist; {hint}")


def _hub_failure(model_ref: str, error: Exception) -> UserError:
    from huggingface_hub import is_offline_mode

    detail = str(error).splitlines()[0] if str(error) else type(error).__name__
    path = Path(model_ref)
    if os.sep in model_ref and path.parent.is_dir():
        # "runs/typo" with a local runs/ folder: most likely a mistyped run folder, possibly a Hub id.
        where = "in the local Hub cache (offline mode is on)" if is_offline_mode() else f"on the Hub ({detail})"
        return UserError(
            f"--model {model_ref}: there is no local folder {path.absolute()}, and no Hub repository of that name "
            f"was found {where} either; check the folder name (ls {path.parent})"
        )
    return UserError(
        f"could not load the model {model_ref!r} ({detail}); pass a run folder or a Hub id "
        "with config.json, weights and preprocessor_config.json"
    )


def load_classifier(model_ref: str, device: str | None = None, revision: str | None = None,
                    attn_implementation: str | None = None) -> Classifier:
    """A model and its image processor from a run folder or a Hub repository id.

    ``attn_implementation="eager"`` is for explanations: only eager attention returns the attention
    weights (SDPA and flash attention return none); the scores are the same either way.
    """
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    device = resolve_device(device)
    local = check_model_reference(model_ref)
    source = str(local) if local is not None else model_ref
    try:
        options = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        model = AutoModelForImageClassification.from_pretrained(source, revision=revision, **options)
        processor = AutoImageProcessor.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as error:
        if local is None:
            raise _hub_failure(model_ref, error) from error
        raise UserError(
            f"could not load the model in {model_ref} ({str(error).splitlines()[0]}); pass a run folder "
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
