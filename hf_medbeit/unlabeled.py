"""Unlabelled images for self-supervised pre-training, as one Hugging Face ``Dataset``.

A corpus mixes sources, each one of:

* a MedMNIST 2D data set flag (``breastmnist``): its **training split only**, labels dropped,
  loaded at ``size`` through ``data.load_medmnist`` (same files, MD5 check and Arrow cache);
* an ``.npz`` file: its one array; or, in MedMNIST's format, only ``train_images`` (validation
  and test images never reach pre-training); or the array named ``images``;
* an ``.npy`` file of images;
* a folder of image files (PNG, JPEG, TIFF, ...; searched recursively, other files ignored;
  16-bit scans scaled to 8 bits as ``predict`` does).

A name that is a MedMNIST flag means that data set even where a folder of that name exists;
write ``./breastmnist`` for the folder.

Arrays are uint8 ``(N, H, W)``, ``(N, H, W, 1)`` or ``(N, H, W, 3)``. Every image comes out
``size`` x ``size`` (others are centre-cropped to a square and resized, PIL bicubic) and all in
one mode: ``L`` (gray), or ``RGB`` as soon as one source is colour (gray images are then
decoded as RGB, three equal channels). ``repeats`` weights the sources per epoch.

Memory: MedMNIST sources stay in their memory-mapped Arrow cache (concatenated, never decoded
here); array and folder sources are streamed into PNG-encoded Arrow files once, cached under
``cache_dir`` keyed on the file's MD5 (or the folder's file names, sizes and times), so a second
run starts in seconds. Gray-to-RGB is done by the ``Image(mode="RGB")`` feature on decoding,
so no stored image is re-encoded for it.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from medmnist import INFO
from medmnist.info import DEFAULT_ROOT
from PIL import Image, UnidentifiedImageError

from .data import (
    CHUNK_ROWS, _NpyMember, _root_cause, default_cache_dir, file_md5, flags_2d, get_spec, load_medmnist,
)
from .errors import UserError
from .predict import IMAGE_SUFFIXES, find_images, to_rgb

logger = logging.getLogger(__name__)

KINDS = ("medmnist", "npz", "npy", "folder")
# Bump when what the array/folder generators write changes, so old caches are not reused.
CACHE_VERSION = "1"
# PIL modes whose images are gray (one channel once in 8 bits).
GRAY_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
# Images per process below which extra processes cost more than they save.
ROWS_PER_PROCESS = 256
_UNREADABLE = "cannot read the image"


@dataclass
class CorpusSource:
    name: str  # the flag ("breastmnist") or the path as given
    kind: str  # "medmnist" | "npz" | "npy" | "folder"
    path: str  # file or folder actually read
    md5: str | None  # file MD5 (medmnist/npz/npy); None for folders
    images: int  # images in the source
    repeats: float  # as asked (default 1)
    used: int  # images per epoch after repeats
    channels: int = 1  # the source's own channels (1 gray, 3 colour), before any conversion
    original_size: str = ""  # "28x28", or "mixed" for a folder of several sizes
    resized: int = 0  # images resized (and centre-cropped when not square) to size x size
    array: str | None = None  # the .npz array read ("train_images" for a MedMNIST-format file)

    def describe(self) -> str:
        what = {"medmnist": "MedMNIST training split", "npz": f"array {self.array} of", "npy": "array",
                "folder": "image folder"}[self.kind]
        line = f"{self.name}: {what} {self.path}, {self.images} images x {self.repeats:g} = {self.used} per epoch"
        return line + (f" (MD5 {self.md5})" if self.md5 else "")


@dataclass
class UnlabeledCorpus:
    dataset: datasets.Dataset  # "image" (size x size, all "L" or all "RGB"), "source" (ClassLabel of source names)
    sources: list[CorpusSource]
    channels: int  # 1 or 3
    size: int = 28

    def describe(self) -> str:
        """Several lines: one per source, then the total (for logs and model cards)."""
        mode = "RGB" if self.channels == 3 else "gray"
        lines = [source.describe() for source in self.sources]
        lines.append(f"{len(self.dataset)} {mode} images of {self.size}x{self.size} per epoch from {len(self.sources)} source(s)")
        return "\n".join(lines)


@dataclass
class _Parsed:
    name: str
    kind: str
    path: Path
    repeats: float
    spec: object = field(default=None, repr=False)


# ---------------------------------------------------------------------------------------------
# Validation before anything loads
# ---------------------------------------------------------------------------------------------


def _looks_like_path(source: str) -> bool:
    return os.sep in source or "/" in source or source.startswith((".", "~")) or source.lower().endswith((".npz", ".npy"))


def _parse_one(source: str, size: int | None) -> tuple[str, Path, object]:
    if not isinstance(source, str) or not source.strip():
        raise UserError(f"empty source {source!r}; give a MedMNIST 2D flag (e.g. breastmnist), an .npz/.npy file or a folder of images")
    flag = source.lower()
    if flag in INFO and not _looks_like_path(source):
        # get_spec says what is wrong with a 3D flag or a size the data set does not come in.
        spec = get_spec(flag, size if size is not None else 28)
        return "medmnist", Path(), spec
    path = Path(source).expanduser()
    if path.is_dir():
        return "folder", path, None
    if path.exists():
        suffix = path.suffix.lower()
        if suffix in (".npz", ".npy"):
            return suffix[1:], path, None
        raise UserError(
            f"{source} is neither an .npz/.npy array nor a folder; pass a folder of image files "
            f"({', '.join(sorted(IMAGE_SUFFIXES))}) or save the images as a uint8 .npy/.npz array"
        )
    if _looks_like_path(source):
        raise UserError(f"{source} does not exist; check the path (a source is a MedMNIST 2D flag, an .npz/.npy file or a folder)")
    close = difflib.get_close_matches(flag, flags_2d(), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UserError(
        f"{source!r} is neither a MedMNIST 2D data set nor an existing file or folder; {hint}"
        f"choose from {', '.join(flags_2d())}, or give the path of an .npz/.npy file or image folder"
    )


def _check_repeats(sources: list[str], repeats) -> list[float]:
    if repeats is None:
        return [1.0] * len(sources)
    repeats = list(repeats)
    if len(repeats) != len(sources):
        raise UserError(
            f"{len(repeats)} repeats for {len(sources)} sources; give one repeat per source, in the same order "
            f"(e.g. {' '.join(['1'] * len(sources))})"
        )
    checked = []
    for source, value in zip(sources, repeats):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UserError(f"repeat {value!r} for {source} is not a number; give a positive number such as 1 or 0.5") from None
        if isinstance(value, bool) or not math.isfinite(number):
            raise UserError(f"repeat {value!r} for {source} is not a finite number; give a positive number such as 1 or 0.5")
        if number <= 0:
            raise UserError(f"repeat {value!r} for {source} must be > 0 (the times its images appear per epoch); "
                            "drop the source instead of giving it 0")
        checked.append(number)
    return checked


def check_sources(sources: list[str], repeats: list[float] | None = None, size: int | None = None) -> list[_Parsed]:
    """Validate sources and repeats without loading anything; raise ``UserError`` on the first
    problem. ``size`` (when given) is checked against the sizes each MedMNIST flag comes in."""
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise UserError("no unlabelled sources; give at least one MedMNIST 2D flag, .npz/.npy file or image folder")
    repeats = _check_repeats(list(sources), repeats)
    parsed, seen = [], {}
    for source, repeat in zip(sources, repeats):
        kind, path, spec = _parse_one(source, size)
        name = spec.flag if kind == "medmnist" else source
        key = name if kind == "medmnist" else str(path.resolve())
        if key in seen:
            raise UserError(f"{source} is given twice (as {seen[key]!r} and {source!r}); give each source once, "
                            "and use repeats to weight it")
        seen[key] = source
        parsed.append(_Parsed(name=name, kind=kind, path=path, repeats=repeat, spec=spec))
    return parsed


parse_sources = check_sources


# ---------------------------------------------------------------------------------------------
# Arrays (.npz / .npy)
# ---------------------------------------------------------------------------------------------


def _array_problem(where: str, shape: tuple, dtype: np.dtype) -> str | None:
    """Why an array is not a stack of uint8 images, with the fix; None when it is."""
    found = f"{where} has shape {shape} and dtype {dtype}"
    if dtype.hasobject:
        return f"{found} (Python objects); save the images as a uint8 array (np.stack(images).astype(np.uint8))"
    if len(shape) == 4 and shape[1] in (1, 3) and shape[3] not in (1, 3):
        return f"{found}: channels first; move the channel axis last (np.moveaxis(images, 1, -1)) and save it again"
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)):
        return (f"{found}; images must be (N, H, W) gray, (N, H, W, 1) or (N, H, W, 3) RGB: "
                "reshape or split the array (one image per row)")
    if dtype != np.uint8:
        if dtype.kind == "f":
            fix = "convert to uint8 0-255 (e.g. np.clip(images * 255, 0, 255).astype(np.uint8) for values in 0..1)"
        elif dtype.kind in "iu":
            fix = "convert to uint8 0-255 (e.g. (images * 255.0 / images.max()).astype(np.uint8) for 16-bit scans)"
        else:
            fix = "convert to uint8 0-255"
        return f"{found}, expected uint8; {fix}"
    if shape[0] == 0 or 0 in shape[1:3]:
        return f"{found}: no images; give an array with at least one image"
    return None


def _npz_choice(path: Path, source: str) -> tuple[str, bool]:
    """The array of an .npz to read, and whether it is MedMNIST's train split."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.files)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as error:
        raise UserError(f"{path} is not a readable .npz ({type(error).__name__}: {error}); "
                        "save the images again with np.savez or np.savez_compressed") from error
    if "train_images" in keys:
        return "train_images", True
    held_out = [key for key in keys if key in ("val_images", "test_images")]
    if held_out:
        raise UserError(f"{path} holds {', '.join(held_out)} but no train_images; pre-training must not see validation "
                        "or test images: give a file with train_images (or one array of unlabelled images)")
    if len(keys) == 1:
        return keys[0], False
    if "images" in keys:
        return "images", False
    listed = ", ".join(keys) if keys else "no arrays"
    raise UserError(f"{path} holds {listed}; cannot tell which are the images: save them alone, "
                    "or as the array named 'images' (np.savez(path, images=...))")


def _npy_header(path: Path) -> tuple[tuple, np.dtype]:
    try:
        with open(path, "rb") as stream:
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    except (ValueError, OSError, EOFError) as error:
        raise UserError(f"{path} is not a readable .npy ({type(error).__name__}: {error}); "
                        "save the images again with np.save") from error
    if fortran:
        raise UserError(f"{path} is stored in Fortran order; save it again with np.save(path, np.ascontiguousarray(images))")
    return tuple(shape), dtype


def _square(image: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square, then resize to size x size (bicubic); unchanged when already so."""
    width, height = image.size
    if (width, height) == (size, size):
        return image
    if width != height:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    return image.resize((size, size), Image.BICUBIC)


def _resize_array(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(_square(Image.fromarray(image), size))


def _generate_array_images(path: str, kind: str, key: str, md5: str, size: int, version: str, row_ranges: list[list[int]]):
    # Module-level with plain arguments, so `datasets` fingerprints it (md5 and version key the cache).
    if kind == "npy":
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        for start, stop in row_ranges:
            for first in range(start, stop, CHUNK_ROWS):
                for image in np.asarray(array[first:min(first + CHUNK_ROWS, stop)]):
                    yield {"image": _resize_array(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image, size)}
        return
    with zipfile.ZipFile(path) as archive:
        member = _NpyMember(archive, key)
        for start, stop in row_ranges:
            for chunk in member.iter_chunks(start=start, stop=stop):
                for image in chunk:
                    yield {"image": _resize_array(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image, size)}


def _ranges(rows: int, num_proc: int | None) -> list[list[int]]:
    parts = max(1, min(num_proc or 1, rows // ROWS_PER_PROCESS))
    bounds = np.linspace(0, rows, parts + 1).astype(int).tolist()
    return [[start, stop] for start, stop in zip(bounds[:-1], bounds[1:])]


def _build(generator, gen_kwargs: dict, work: int, num_proc: int | None, cache_root: Path, what: str) -> datasets.Dataset:
    try:
        return datasets.Dataset.from_generator(
            generator, features=datasets.Features({"image": datasets.Image()}), cache_dir=str(cache_root),
            gen_kwargs=gen_kwargs, num_proc=work if work > 1 else None,
        )
    except datasets.exceptions.DatasetGenerationError as error:
        cause = _root_cause(error)
        prefix = f"ValueError: {_UNREADABLE} "
        detail = cause[len("ValueError: "):] if cause.startswith(prefix) else f"cannot read {what} ({cause})"
        raise UserError(f"{detail}; replace or remove the damaged file") from error


def _load_array(parsed: _Parsed, size: int, cache_root: Path, num_proc: int | None):
    path = parsed.path
    if parsed.kind == "npz":
        key, medmnist_format = _npz_choice(path, parsed.name)
        try:
            with zipfile.ZipFile(path) as archive:
                member = _NpyMember(archive, key)
                shape, dtype = tuple(member.shape), member.dtype
        except ValueError as error:  # object arrays, Fortran order
            raise UserError(f"{path}: array {key} {error}; save the images as a uint8 array "
                            "(np.savez(path, images=np.stack(images).astype(np.uint8)))") from error
        except (zipfile.BadZipFile, OSError, EOFError, KeyError) as error:
            raise UserError(f"{path} is not a readable .npz ({type(error).__name__}: {error}); "
                            "save the images again with np.savez") from error
        where = f"{path} (array {key})"
    else:
        key, medmnist_format = None, False
        shape, dtype = _npy_header(path)
        where = str(path)
    problem = _array_problem(where, shape, dtype)
    if problem:
        raise UserError(problem)
    if medmnist_format:
        logger.info("%s is in MedMNIST's format: only its train_images (%d) are used; val_images and test_images "
                    "(and all labels) are left out of pre-training", path, shape[0])
    channels = 3 if len(shape) == 4 and shape[3] == 3 else 1
    height, width = shape[1], shape[2]
    if (height, width) != (size, size):
        logger.info("%s: %d images of %dx%d %sresized to %dx%d (PIL bicubic)", parsed.name, shape[0], height, width,
                    "centre-cropped to a square and " if height != width else "", size, size)
    md5 = file_md5(path)
    row_ranges = _ranges(shape[0], num_proc)
    dataset = _build(
        _generate_array_images,
        {"path": str(path), "kind": parsed.kind, "key": key or "", "md5": md5, "size": size,
         "version": CACHE_VERSION, "row_ranges": row_ranges},
        len(row_ranges), num_proc, cache_root, str(path),
    )
    source = CorpusSource(
        name=parsed.name, kind=parsed.kind, path=str(path), md5=md5, images=shape[0], repeats=parsed.repeats, used=0,
        channels=channels, original_size=f"{height}x{width}",
        resized=shape[0] if (height, width) != (size, size) else 0, array=key,
    )
    return dataset, source


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------


def _is_gray(image: Image.Image) -> bool:
    if image.mode in GRAY_MODES:
        return True
    if image.mode == "P" and "transparency" not in image.info:
        palette = np.asarray(image.getpalette() or [], dtype=np.uint8).reshape(-1, 3)
        return bool(len(palette)) and bool((palette == palette[:, :1]).all())
    return False


def _generate_folder_images(files: list[list], size: int, gray: bool, version: str):
    # files: [path, bytes, mtime_ns] (the sizes and times key the cache, so an edited folder is re-read)
    for path, _, _ in files:
        try:
            with Image.open(path) as image:
                image.load()
                converted = to_rgb(image)
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise ValueError(f"{_UNREADABLE} {path} ({type(error).__name__}: {error})") from error
        if gray:
            converted = converted.convert("L")
        yield {"image": np.asarray(_square(converted, size))}


def _load_folder(parsed: _Parsed, size: int, cache_root: Path, num_proc: int | None):
    folder = parsed.path
    skipped = []
    files = find_images([str(folder)], on_skip=lambda path, reason: skipped.append(f"{path}: {reason}"))
    for line in skipped:
        logger.warning("%s: skipped %s", parsed.name, line)
    if not files:
        entries = sum(len(names) for _, _, names in os.walk(folder))
        if entries == 0:
            raise UserError(f"folder {folder} is empty; put the unlabelled image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in it")
        raise UserError(f"folder {folder} holds {entries} file(s) but no images ({', '.join(sorted(IMAGE_SUFFIXES))}, "
                        "searched recursively); convert the scans to PNG, or give the right folder")
    entries, gray, sizes, to_resize = [], True, set(), 0
    for path in files:
        try:
            with Image.open(path) as image:
                gray = gray and _is_gray(image)
                sizes.add(image.size)
                to_resize += image.size != (size, size)
            stat = path.stat()
        except (UnidentifiedImageError, OSError) as error:
            raise UserError(f"cannot read the image {path} ({type(error).__name__}: {error}); replace or remove it") from error
        entries.append([str(path), stat.st_size, stat.st_mtime_ns])
    if to_resize:
        shown = "x".join(map(str, next(iter(sizes)))) if len(sizes) == 1 else f"{len(sizes)} sizes"
        logger.info("%s: %d of %d images (%s) centre-cropped to a square where needed and resized to %dx%d (PIL bicubic)",
                    parsed.name, to_resize, len(files), shown, size, size)
    work = max(1, min(num_proc or 1, len(entries) // ROWS_PER_PROCESS))
    dataset = _build(_generate_folder_images, {"files": entries, "size": size, "gray": gray, "version": CACHE_VERSION},
                     work, num_proc, cache_root, f"an image in {folder}")
    width, height = next(iter(sizes))
    source = CorpusSource(
        name=parsed.name, kind="folder", path=str(folder), md5=None, images=len(entries), repeats=parsed.repeats, used=0,
        channels=1 if gray else 3, original_size=f"{height}x{width}" if len(sizes) == 1 else "mixed", resized=to_resize,
    )
    return dataset, source


# ---------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------


def _epoch_indices(count: int, repeats: float, rng: np.random.Generator) -> np.ndarray:
    """Row indices of one epoch: every row ``floor(repeats)`` times, then a random ``frac`` of them (kept in order)."""
    whole = int(math.floor(repeats))
    extra = int(round((repeats - whole) * count))
    subset = np.sort(rng.choice(count, size=extra, replace=False)) if extra else np.zeros(0, np.int64)
    return np.concatenate([np.tile(np.arange(count), whole), subset]).astype(np.int64)


def load_unlabeled(
    sources: list[str],
    size: int = 28,
    *,
    repeats: list[float] | None = None,
    data_dir=None,
    download: bool = False,
    verify_md5: bool = True,
    cache_dir=None,
    seed: int = 0,
    num_proc: int | None = None,
) -> UnlabeledCorpus:
    """Load and mix unlabelled sources (see the module docstring) into one ``Dataset`` ordered by
    source (the Trainer shuffles). ``repeats[i]`` is how often source i's images appear per epoch;
    a fractional part takes a random subset seeded by ``seed`` (and the source's position)."""
    if not isinstance(size, int) or size < 1:
        raise UserError(f"image size {size!r} must be a positive whole number of pixels, e.g. 28 or 224")
    parsed = check_sources(sources, repeats, size=size)
    cache_root = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser()
    unlabeled_cache = cache_root / "unlabeled"
    parts, found = [], []
    for item in parsed:
        if item.kind == "medmnist":
            splits, spec, md5 = load_medmnist(item.name, size=size, data_dir=data_dir, download=download,
                                              verify_md5=verify_md5, cache_dir=cache_dir, num_proc=num_proc)
            train = splits["train"].select_columns(["image"])
            logger.info("%s: %d training images (validation, test and labels left out)", item.name, len(train))
            source = CorpusSource(
                name=item.name, kind="medmnist", md5=md5,
                path=str(Path(data_dir if data_dir is not None else DEFAULT_ROOT).expanduser() / spec.filename),
                images=len(train), repeats=item.repeats, used=0,
                channels=spec.n_channels, original_size=f"{size}x{size}",
            )
            parts.append(train)
        elif item.kind == "folder":
            dataset, source = _load_folder(item, size, unlabeled_cache, num_proc)
            parts.append(dataset)
        else:
            dataset, source = _load_array(item, size, unlabeled_cache, num_proc)
            parts.append(dataset)
        for other in found:
            if source.md5 and source.md5 == other.md5:
                raise UserError(f"{other.name} and {source.name} are the same file (MD5 {source.md5}); "
                                "give it once, and use repeats to weight it")
        found.append(source)

    channels = 3 if any(source.channels == 3 for source in found) else 1
    mode = "RGB" if channels == 3 else "L"
    if channels == 3:
        gray = [source.name for source in found if source.channels == 1]
        colour = [source.name for source in found if source.channels == 3]
        if gray:
            logger.info("Colour source(s) %s make the corpus RGB: gray source(s) %s are read as RGB (three equal channels)",
                        ", ".join(colour), ", ".join(gray))
    names = [source.name for source in found]
    features = datasets.Features({"image": datasets.Image(mode=mode), "source": datasets.ClassLabel(names=names)})
    tagged = []
    for index, part in enumerate(parts):
        part = part.cast_column("image", datasets.Image(mode=mode))
        part = part.add_column("source", np.full(len(part), index, dtype=np.int64), feature=features["source"])
        tagged.append(part)
    corpus = datasets.concatenate_datasets(tagged) if len(tagged) > 1 else tagged[0]

    offsets = np.cumsum([0] + [len(part) for part in parts])
    selected, trivial = [], True
    for index, source in enumerate(found):
        rows = _epoch_indices(source.images, source.repeats, np.random.default_rng([seed, index]))
        if len(rows) == 0:
            raise UserError(f"repeats {source.repeats:g} of {source.name}'s {source.images} images selects none; "
                            f"raise it to at least {1 / source.images:.2g}, or drop the source")
        source.used = len(rows)
        trivial = trivial and source.repeats == 1
        selected.append(rows + offsets[index])
    if not trivial:
        corpus = corpus.select(np.concatenate(selected))
    logger.info("Unlabelled corpus: %d %s images of %dx%d per epoch from %s", len(corpus), mode, size, size,
                ", ".join(f"{source.name} ({source.used})" for source in found))
    return UnlabeledCorpus(dataset=corpus, sources=found, channels=channels, size=size)
