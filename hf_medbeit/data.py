"""MedMNIST 2D data sets as Hugging Face ``datasets``.

Everything about a data set (its file name, URL, MD5, task, class names, licence) is read from
``medmnist.INFO``; nothing is listed by hand here. The ``.npz`` files are the very ones that
``medmnist`` downloads, read from the same root. They are converted once into a ``DatasetDict``
(``train`` / ``validation`` / ``test``; an ``Image`` column and a ``label`` column with the class
names) that is cached with ``save_to_disk``, so later runs start in seconds. The cache is keyed
on the MD5 of the file actually given, which is hashed on every run.

The conversion streams each array out of the ``.npz`` archive in chunks, so a 224x224 data set of
100,000 images never has to sit decoded in memory at once.

Balancing (undersampling, oversampling, class weights) applies to the training split only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from medmnist import INFO
from medmnist.info import DEFAULT_ROOT, HOMEPAGE
from sklearn.utils.class_weight import compute_class_weight

from .errors import UserError

logger = logging.getLogger(__name__)

# Hugging Face split name -> the prefix MedMNIST uses inside its .npz files.
SPLITS = {"train": "train", "validation": "val", "test": "test"}
MULTI_LABEL_TASK = "multi-label, binary-class"
BALANCING_METHODS = ("none", "weighted_loss", "undersample", "oversample")
# Rows read from the archive at a time while converting (about 150 MB for 224x224 RGB).
CHUNK_ROWS = 1024
# Bump when the layout of the cached DatasetDict changes, so old caches are rebuilt.
CACHE_VERSION = "1"


def is_2d(flag: str) -> bool:
    return not INFO[flag]["python_class"].endswith("3D")


def flags_2d() -> list[str]:
    return [flag for flag in INFO if is_2d(flag)]


def available_sizes(flag: str) -> list[int]:
    """28 plus every size INFO has a URL for (MedMNIST+: 64, 128, 224)."""
    larger = sorted(int(key[len("url_"):]) for key in INFO[flag] if key.startswith("url_"))
    return [28, *larger]


@dataclass(frozen=True)
class MedMNISTSpec:
    """The facts about one MedMNIST data set at one size, all taken from ``medmnist.INFO``."""

    flag: str
    size: int
    task: str
    label_names: tuple[str, ...]
    n_channels: int
    license: str
    description: str
    url: str
    md5: str

    @property
    def filename(self) -> str:
        # MedMNIST's own naming: breastmnist.npz at 28, breastmnist_224.npz at 224.
        return f"{self.flag}.npz" if self.size == 28 else f"{self.flag}_{self.size}.npz"

    @property
    def is_multi_label(self) -> bool:
        return self.task == MULTI_LABEL_TASK

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def get_spec(flag: str, size: int = 28) -> MedMNISTSpec:
    """Validate a data set flag and size against ``medmnist.INFO``."""
    flag = flag.lower()
    if flag not in INFO:
        raise UserError(f"unknown MedMNIST data set {flag!r}; choose one of: {', '.join(flags_2d())}")
    if not is_2d(flag):
        raise UserError(
            f"{flag!r} is a 3D MedMNIST data set, which this project does not handle; "
            f"choose a 2D one: {', '.join(flags_2d())}"
        )
    sizes = available_sizes(flag)
    if size not in sizes:
        raise UserError(f"{flag} has no size {size} in medmnist.INFO; choose one of: {', '.join(map(str, sizes))}")
    info = INFO[flag]
    suffix = "" if size == 28 else f"_{size}"
    return MedMNISTSpec(
        flag=flag,
        size=size,
        task=info["task"],
        label_names=tuple(info["label"][str(i)] for i in range(len(info["label"]))),
        n_channels=info["n_channels"],
        license=info["license"],
        description=info["description"],
        url=info[f"url{suffix}"],
        md5=info[f"MD5{suffix}"],
    )


def features_for(spec: MedMNISTSpec) -> datasets.Features:
    if spec.is_multi_label:
        # Multi-hot: one 0/1 entry per finding; the names travel in the data set's description
        # and in ``spec.label_names`` (a ClassLabel cannot describe a multi-hot vector).
        label = datasets.List(datasets.Value("int8"), length=spec.num_labels)
    else:
        label = datasets.ClassLabel(names=list(spec.label_names))
    return datasets.Features({"image": datasets.Image(), "label": label})


# ---------------------------------------------------------------------------------------------
# Reading MedMNIST's .npz archives
# ---------------------------------------------------------------------------------------------


class _NpyMember:
    """One ``.npy`` array inside an ``.npz`` archive, read in row chunks without loading it whole.

    ``np.load`` on an ``.npz`` decompresses a member completely; for PathMNIST at 224 that is
    16 GB. Here the header is parsed with ``numpy.lib.format`` and the rows are streamed.
    """

    def __init__(self, archive: zipfile.ZipFile, key: str):
        self.archive = archive
        self.key = key
        with archive.open(f"{key}.npy") as stream:
            self.shape, self.dtype, self.header_bytes = self._read_header(stream)

    @staticmethod
    def _read_header(stream):
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        if dtype.hasobject:
            # Object arrays would need pickle; MedMNIST never has them.
            raise ValueError("holds Python objects (pickle), not numbers")
        if fortran_order:
            raise ValueError("is stored in Fortran order, which MedMNIST files never are")
        return shape, dtype, stream.tell()

    def __len__(self) -> int:
        return self.shape[0]

    def iter_chunks(self, rows: int = CHUNK_ROWS, start: int = 0, stop: int | None = None):
        """Rows ``start`` to ``stop`` (default: all), ``rows`` at a time."""
        stop = len(self) if stop is None else stop
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        with self.archive.open(f"{self.key}.npy") as stream:
            stream.seek(self.header_bytes + start * row_bytes)
            for first in range(start, stop, rows):
                count = min(rows, stop - first)
                buffer = stream.read(count * row_bytes)
                if len(buffer) != count * row_bytes:
                    raise EOFError(f"{self.key} ends after {first} rows of {len(self)}")
                yield np.frombuffer(buffer, dtype=self.dtype).reshape(count, *self.shape[1:])

    def read(self) -> np.ndarray:
        return np.concatenate(list(self.iter_chunks()), axis=0) if len(self) else np.zeros(self.shape, self.dtype)


def _corrupt(path: Path, detail: str) -> UserError:
    return UserError(f"{path} is truncated or not a valid MedMNIST .npz ({detail}); delete it and download it again")


# The arrays a MedMNIST .npz holds, as MedMNIST's own loader reads them.
REQUIRED_ARRAYS = tuple(f"{prefix}_{kind}" for prefix in SPLITS.values() for kind in ("images", "labels"))


def _unreadable(path: Path, error: OSError) -> UserError:
    reason = error.strerror or str(error)
    return UserError(
        f"cannot read {path}: {reason}; make it a readable file (check its permissions), or pass the folder "
        "that holds MedMNIST's .npz file as --data_dir"
    )


def _check_members(path: Path, archive: zipfile.ZipFile) -> None:
    # A missing member is the user's own file being incomplete (an official file with this gap
    # would have failed its MD5), so say what the format needs rather than "download again".
    names = set(archive.namelist())
    missing = [name for name in REQUIRED_ARRAYS if f"{name}.npy" not in names]
    if missing:
        raise UserError(
            f"{path} has no {', '.join(missing)}: a MedMNIST .npz holds the arrays {', '.join(REQUIRED_ARRAYS)}; "
            "add the missing split(s) to the file (np.savez_compressed with all six arrays)"
        )


def _check_image_shape(spec: MedMNISTSpec, path: Path, images: _NpyMember, split: str) -> None:
    size = spec.size
    shape = tuple(images.shape)
    if shape[1:] in {(size, size), (size, size, 3)}:
        return
    where = f"{path}: {split}_images has shape {shape}"
    if shape[1:] == (size, size, 1):
        raise UserError(
            f"{where}: a channel axis of size 1 is not MedMNIST's format (gray images are (N, {size}, {size})); "
            "squeeze the last axis (images[..., 0]) and save the file again"
        )
    if len(shape) == 4 and shape[1] in (1, 3) and shape[2:] == (size, size):
        raise UserError(
            f"{where}: channels first is not MedMNIST's format (gray (N, {size}, {size}), colour "
            f"(N, {size}, {size}, 3)); move the channel axis last (np.moveaxis(images, 1, -1), then drop a size-1 axis)"
        )
    raise UserError(
        f"{where}, expected (N, {size}, {size}[, 3]) for {spec.flag} at size {size}; check the file name and --size"
    )


def _check_labels(spec: MedMNISTSpec, path: Path, labels: np.ndarray, split: str) -> None:
    rule = "labels must be whole class indices"
    allowed = "0 or 1 (multi-hot)" if spec.is_multi_label else f"0..{spec.num_labels - 1}"
    classes = ", ".join(spec.label_names)
    if labels.dtype.kind not in "biuf":
        raise UserError(
            f"{path}: {split}_labels has dtype {labels.dtype}, not numbers; {rule} ({allowed}: {classes}), "
            "stored as integers: fix the labels in the file"
        )
    if labels.dtype.kind == "f":
        # int() would floor 0.5 to 0 and fail on NaN deep inside the conversion: refuse both here.
        not_whole = ~np.isfinite(labels) | (labels != np.round(labels))
        if not_whole.any():
            row = int(np.argwhere(not_whole)[0][0])
            raise UserError(
                f"{path}: {split}_labels[{row}] = {labels[row].tolist()} is not a whole number; {rule} "
                f"({allowed}: {classes}): fix the labels in the file"
            )
    if spec.is_multi_label:
        bad = ~np.isin(labels, (0, 1))
    else:
        bad = (labels < 0) | (labels >= spec.num_labels)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise UserError(
            f"{path}: {split}_labels[{row}] = {labels[row].tolist()} is out of range for {spec.flag} "
            f"(labels must be {allowed}: {classes}); fix the labels in the file"
        )


def _check_split_arrays(spec: MedMNISTSpec, path: Path, images: _NpyMember, labels: np.ndarray, split: str):
    _check_image_shape(spec, path, images, split)
    if images.dtype != np.uint8:
        raise UserError(f"{path}: {split}_images is {images.dtype}, expected uint8 as in MedMNIST; convert the file")
    if len(images) == 0:
        # Training, model selection and the test evaluation each need their split.
        raise UserError(
            f"{path}: the {split} split is empty ({split}_images has 0 rows); MedMNIST's format needs images in "
            "each of train, val and test: add some to that split"
        )
    expected_width = spec.num_labels if spec.is_multi_label else 1
    if labels.ndim != 2 or labels.shape != (len(images), expected_width):
        raise UserError(
            f"{path}: {split}_labels has shape {labels.shape}, expected ({len(images)}, {expected_width}); "
            "fix the file so that it has one label row per image"
        )
    _check_labels(spec, path, labels, split)


def _generate_examples(path: str, split_prefix: str, multi_label: bool, row_ranges: list[list[int]]):
    # A module-level generator with plain arguments, so `datasets` can fingerprint it. With
    # num_proc, `datasets` hands each process a contiguous run of `row_ranges`, in order.
    with zipfile.ZipFile(path) as archive:
        images = _NpyMember(archive, f"{split_prefix}_images")
        labels = _NpyMember(archive, f"{split_prefix}_labels").read()
        for start, stop in row_ranges:
            row_index = start
            for chunk in images.iter_chunks(start=start, stop=stop):
                for image in chunk:
                    row = labels[row_index]
                    yield {"image": image, "label": row.tolist() if multi_label else int(row[0])}
                    row_index += 1


def _row_ranges(rows: int, num_proc: int | None) -> list[list[int]]:
    """[start, stop) ranges of a split's rows: one per process (one in all without num_proc).
    Splits of a few chunks stay in one range: starting processes would cost more than it saves."""
    parts = max(1, min(num_proc or 1, rows // CHUNK_ROWS))
    bounds = np.linspace(0, rows, parts + 1).astype(int).tolist()
    return [[start, stop] for start, stop in zip(bounds[:-1], bounds[1:])]


def file_md5(path: str | os.PathLike) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_dir() -> str:
    return os.path.join(datasets.config.HF_DATASETS_CACHE, "hf_medbeit")


def _check_root(root: Path) -> None:
    """``--data_dir`` (or a folder above it) must not be a plain file: say so, instead of "not
    found in FILE" or, with --download, a FileExistsError from mkdir."""
    for folder in (root, *root.parents):
        try:
            if not folder.exists():
                continue
        except OSError as error:  # e.g. a folder above it that cannot be searched
            raise _unreadable(folder, error) from error
        if not folder.is_dir():
            where = f"--data_dir {root}" if folder == root else f"{folder}, in --data_dir {root},"
            raise UserError(f"{where} is a file, not a folder; pass the folder that holds MedMNIST's .npz files")
        return


def _locate(spec: MedMNISTSpec, root: Path, download: bool) -> Path:
    """The data file actually given: ``root/<filename>``, fetched with ``download`` when missing."""
    _check_root(root)
    path = root / spec.filename
    try:
        path.stat()
        return path
    except FileNotFoundError:
        pass
    except OSError as error:
        raise _unreadable(path, error) from error
    if not download:
        raise UserError(
            f"{spec.filename} not found in {root}: put it there (get it from {spec.url}, MD5 {spec.md5}), "
            "or pass --download to fetch it"
        )
    # The same downloader and MD5 check that medmnist itself uses.
    from torchvision.datasets.utils import download_url

    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create {root} to download {spec.filename} into: {error.strerror or error}; "
                        "pass a writable --data_dir") from error
    try:
        download_url(url=spec.url, root=str(root), filename=spec.filename, md5=spec.md5)
    except Exception as error:  # network errors come in many types; all mean the same to the user
        raise UserError(
            f"could not download {spec.filename} ({type(error).__name__}: {error}); download it from "
            f"{spec.url} (or {HOMEPAGE}) and put it in {root}"
        ) from error
    return path


def load_medmnist(
    flag: str,
    size: int = 28,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    verify_md5: bool = True,
    cache_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
) -> tuple[datasets.DatasetDict, MedMNISTSpec, str]:
    """Return the MedMNIST data set ``flag`` at ``size`` as a ``DatasetDict``, its spec and the file's MD5.

    ``data_dir`` is the folder holding MedMNIST's ``.npz`` files (medmnist's own default root when
    None). With ``verify_md5`` the file must match the MD5 in ``medmnist.INFO``; turn it off only
    for your own files in MedMNIST's format. ``num_proc`` processes convert a file that is not
    cached yet (the cache is the same whatever the number).

    The file is always opened and hashed, and the cache is keyed on that MD5: a cache built from
    one file is never handed out for another (a modified file, another folder, a missing file).
    """
    spec = get_spec(flag, size)
    root = Path(data_dir if data_dir is not None else DEFAULT_ROOT).expanduser()
    cache_root = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser()

    path = _locate(spec, root, download)
    try:
        md5 = file_md5(path)
    except OSError as error:  # a folder named like the file, no read permission, ...
        raise _unreadable(path, error) from error
    if verify_md5 and md5 != spec.md5:
        raise UserError(
            f"{path} has MD5 {md5} but medmnist.INFO expects {spec.md5}: the file is corrupt or another "
            "version; delete it and download it again (or pass --skip_md5_check for your own file)"
        )
    cached = cache_root / f"{spec.flag}_{spec.size}_{md5}_v{CACHE_VERSION}"
    if cached.exists():
        logger.info("Loading %s (MD5 %s) from cache %s", path, md5, cached)
        return datasets.load_from_disk(str(cached)), spec, md5

    logger.info("Converting %s into a DatasetDict (once; cached in %s)", path, cached)
    cache_root.mkdir(parents=True, exist_ok=True)
    # Build and save next to the final place, then rename: a crash never leaves a half cache.
    staging = Path(tempfile.mkdtemp(prefix=f".{cached.name}.", dir=cache_root))
    try:
        _convert(spec, path, work_dir=staging / "work", num_proc=num_proc).save_to_disk(str(staging / "data"))
        try:
            os.replace(staging / "data", cached)
        except OSError:
            if not cached.exists():  # another process may have won the race; its copy is as good
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return datasets.load_from_disk(str(cached)), spec, md5


def _convert(spec: MedMNISTSpec, path: Path, work_dir: Path, num_proc: int | None = None) -> datasets.DatasetDict:
    """Stream the archive into Arrow files under ``work_dir``, one chunk of rows at a time; with
    ``num_proc``, each split's rows are cut into that many ranges, converted in parallel (PNG
    encoding is most of the time). The result is the same, row for row."""
    features = features_for(spec)
    splits, rows = {}, {}
    try:
        with zipfile.ZipFile(path) as archive:
            _check_members(path, archive)
            for prefix in SPLITS.values():
                images = _NpyMember(archive, f"{prefix}_images")
                labels = _NpyMember(archive, f"{prefix}_labels").read()
                _check_split_arrays(spec, path, images, labels, prefix)
                rows[prefix] = len(images)
        for split, prefix in SPLITS.items():
            row_ranges = _row_ranges(rows[prefix], num_proc)
            dataset = datasets.Dataset.from_generator(
                _generate_examples,
                features=features,
                cache_dir=str(work_dir),
                gen_kwargs={"path": str(path), "split_prefix": prefix, "multi_label": spec.is_multi_label,
                            "row_ranges": row_ranges},
                split=datasets.NamedSplit(split),
                num_proc=len(row_ranges) if len(row_ranges) > 1 else None,
            )
            dataset.info.description = f"{spec.flag} ({spec.size}x{spec.size}): {spec.description}"
            dataset.info.license = spec.license
            dataset.info.homepage = HOMEPAGE
            splits[split] = dataset
    except UserError:
        raise
    except (zipfile.BadZipFile, EOFError, KeyError, ValueError, OSError) as error:
        raise _corrupt(path, f"{type(error).__name__}: {error}") from error
    except datasets.exceptions.DatasetGenerationError as error:
        raise _corrupt(path, _root_cause(error)) from error
    return datasets.DatasetDict(splits)


def _root_cause(error: BaseException) -> str:
    """``Type: message`` of what went wrong while generating. In one process that is the error's
    cause. From a ``num_proc`` worker the cause arrives only as the worker's traceback text, whose
    first block ends with the original error's line."""
    cause = error.__cause__ or error
    if type(cause).__name__ != "RemoteTraceback":
        return f"{type(cause).__name__}: {cause}"
    first_block = re.split(r"\n(?:The above exception was the direct cause|During handling of the above exception)",
                           str(cause))[0]
    lines = [line.strip() for line in first_block.strip().strip('"').splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


# ---------------------------------------------------------------------------------------------
# Balancing of the training split
# ---------------------------------------------------------------------------------------------


def label_array(dataset: datasets.Dataset) -> np.ndarray:
    """Labels as an array: (N,) class indices, or (N, K) multi-hot for multi-label tasks."""
    return np.asarray(dataset.select_columns(["label"]).with_format("numpy")[:]["label"])


def class_weights(labels: np.ndarray, spec: MedMNISTSpec) -> np.ndarray:
    """Loss weights that make every class count equally.

    Single-label: ``n / (k * count_c)``, scikit-learn's "balanced" weights (they average to 1 over
    the training set). Multi-label: BCE ``pos_weight`` per finding, ``negatives / positives``.
    """
    if spec.is_multi_label:
        positives = labels.sum(axis=0).astype(np.float64)
        if (positives == 0).any():
            missing = [spec.label_names[i] for i in np.flatnonzero(positives == 0)]
            raise UserError(f"no positive training example for {', '.join(missing)}: cannot weight the loss; use --balancing none")
        return (len(labels) - positives) / positives
    present = np.unique(labels)
    if len(present) < spec.num_labels:
        missing = [spec.label_names[i] for i in range(spec.num_labels) if i not in present]
        raise UserError(f"the training split has no example of {', '.join(missing)}: cannot weight the loss; use --balancing none")
    return compute_class_weight("balanced", classes=np.arange(spec.num_labels), y=labels)


def _target_counts(counts: np.ndarray, ratio: float | None, grow: bool) -> np.ndarray:
    """Per-class counts after resampling.

    Binary with ``ratio`` r: the majority class makes up r of the result (the study: 0.6 for
    BreastMNIST, 0.5 for PneumoniaMNIST); undersampling shrinks the majority, oversampling grows
    the minority. Without a ratio every class ends with the same count.
    """
    if ratio is None:
        return np.full_like(counts, counts.max() if grow else counts.min())
    majority, minority = int(np.argmax(counts)), int(np.argmin(counts))
    target = counts.copy()
    if grow:
        target[minority] = max(counts[minority], round(counts[majority] * (1 - ratio) / ratio))
    else:
        target[majority] = min(counts[majority], round(counts[minority] * ratio / (1 - ratio)))
    return target


def check_balance_ratio(spec: MedMNISTSpec, method: str, ratio: float | None) -> None:
    """``--balance_ratio`` is the majority share of a binary task, in [0.5, 1). Called when the
    arguments are parsed (before any data loads) and again by ``resample`` for library callers."""
    if ratio is None:
        return
    if spec.num_labels != 2:
        raise UserError(
            f"--balance_ratio applies to binary tasks; {spec.flag} has {spec.num_labels} classes and "
            f"--balancing {method} equalises them all: drop --balance_ratio"
        )
    if not 0.5 <= ratio < 1:
        raise UserError(f"--balance_ratio {ratio} must be the majority class's share, in [0.5, 1); the study used 0.6 and 0.5")


def resample(dataset: datasets.Dataset, spec: MedMNISTSpec, method: str, ratio: float | None, seed: int) -> datasets.Dataset:
    """Undersample or oversample a training split, seeded; returns a new ``Dataset``."""
    if spec.is_multi_label:
        raise UserError(f"--balancing {method} needs single-label data; {spec.flag} is multi-label: use --balancing weighted_loss")
    check_balance_ratio(spec, method, ratio)
    labels = label_array(dataset)
    counts = np.bincount(labels, minlength=spec.num_labels)
    if (counts == 0).any():
        # Undersampling would cut every class to 0 images, oversampling would draw from nothing.
        missing = [spec.label_names[i] for i in np.flatnonzero(counts == 0)]
        raise UserError(
            f"the training split has no example of {', '.join(missing)}: cannot {method} to balance the classes; "
            "use --balancing none, or training data (and --max_train_samples) with every class"
        )
    target = _target_counts(counts, ratio, grow=(method == "oversample"))
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in range(spec.num_labels):
        members = np.flatnonzero(labels == cls)
        if target[cls] <= len(members):
            chosen.append(rng.choice(members, size=int(target[cls]), replace=False))
        else:  # oversampling: every original once, the rest drawn with replacement
            extra = rng.choice(members, size=int(target[cls]) - len(members), replace=True)
            chosen.append(np.concatenate([members, extra]))
    indices = np.sort(np.concatenate(chosen))
    logger.info(
        "%s: training split %s -> %s images per class",
        method, dict(zip(spec.label_names, counts.tolist())), dict(zip(spec.label_names, target.tolist())),
    )
    return dataset.select(indices)
