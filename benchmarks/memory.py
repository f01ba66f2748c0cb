"""Peak memory of preparing a large MedMNIST-format data set at 224x224 for the fast path.

    python benchmarks/memory.py --flag pneumoniamnist --images 5856
    python benchmarks/memory.py --flag chestmnist --images 112120

Writes a synthetic .npz in MedMNIST's exact layout (streamed, in a child process, so its memory
does not count), then in this process: .npz -> DatasetDict (data.load_medmnist) -> fast-path
splits (in RAM or decoded per batch, by size) -> a few model-ready batches. Prints the peak
resident memory (ru_maxrss) and the time of each step as JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

# MedMNIST's own split shares (train, val, test) of these two sets.
SPLIT_SHARES = {"pneumoniamnist": (4708, 524, 624), "chestmnist": (78468, 11219, 22433)}
ROWS_PER_WRITE = 2048


def _write_member(archive: zipfile.ZipFile, name: str, shape: tuple, fill) -> None:
    """One .npy member, header then rows in chunks: never the whole array in memory."""
    with archive.open(f"{name}.npy", "w", force_zip64=True) as stream:
        np.lib.format.write_array_header_1_0(stream, {"descr": "|u1", "fortran_order": False, "shape": shape})
        for start in range(0, shape[0], ROWS_PER_WRITE):
            stream.write(fill(start, min(ROWS_PER_WRITE, shape[0] - start)).tobytes())


def write_synthetic_npz(path: Path, flag: str, images: int, size: int, seed: int = 0) -> None:
    from medmnist import INFO

    info = INFO[flag]
    rng = np.random.default_rng(seed)
    shares = np.array(SPLIT_SHARES.get(flag, (7, 1, 2)), dtype=float)
    counts = np.floor(images * shares / shares.sum()).astype(int)
    counts[0] += images - counts.sum()
    num_labels, multi = len(info["label"]), info["task"].startswith("multi-label")
    # Smooth structure plus noise: compresses (as PNG) about like an X-ray, unlike pure noise.
    yy, xx = np.mgrid[0:size, 0:size]
    base = ((np.sin(xx / 17.0) + np.cos(yy / 23.0)) * 60 + 128).astype(np.uint8)

    def image_rows(start, count):
        noise = rng.integers(0, 24, size=(count, size, size), dtype=np.uint8)
        return base[None] + noise

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for prefix, count in zip(("train", "val", "test"), counts):
            _write_member(archive, f"{prefix}_images", (int(count), size, size), image_rows)
            width = num_labels if multi else 1
            labels = rng.integers(0, 2 if multi else num_labels, size=(int(count), width)).astype(np.uint8)
            _write_member(archive, f"{prefix}_labels", labels.shape, lambda s, c, labels=labels: labels[s : s + c])


def peak_rss_gib(who=resource.RUSAGE_SELF) -> float:
    # RUSAGE_CHILDREN: the largest finished child (the .npz writer, the --num_proc converters).
    return resource.getrusage(who).ru_maxrss / 1024**2  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flag", default="pneumoniamnist")
    parser.add_argument("--images", type=int, default=5856)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", type=int, default=20, help="Model-ready batches drawn after preparing.")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_proc", type=int, default=None, help="Processes for the conversion (--preprocessing_num_workers).")
    parser.add_argument("--workdir", default=None, help="Where the .npz and the Arrow cache go (default: a temp dir).")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="hf_medbeit_memory_"))
    root, cache = workdir / "medmnist", workdir / "cache"
    root.mkdir(parents=True, exist_ok=True)
    name = f"{args.flag}.npz" if args.size == 28 else f"{args.flag}_{args.size}.npz"
    timings = {}
    try:
        started = time.perf_counter()
        writer = multiprocessing.get_context("spawn").Process(
            target=write_synthetic_npz, args=(root / name, args.flag, args.images, args.size)
        )
        writer.start()
        writer.join()
        timings["write_npz_s"] = round(time.perf_counter() - started, 1)
        rss_before = peak_rss_gib()

        import torch
        from transformers import BeitImageProcessor

        from hf_medbeit.data import load_medmnist
        from hf_medbeit.data_path import prepare_splits

        started = time.perf_counter()
        raw, _, _ = load_medmnist(args.flag, size=args.size, data_dir=root, verify_md5=False, cache_dir=cache,
                                  num_proc=args.num_proc)
        timings["npz_to_datasetdict_s"] = round(time.perf_counter() - started, 1)
        rss_converted = peak_rss_gib()

        started = time.perf_counter()
        processor = BeitImageProcessor()
        prepared = prepare_splits(raw["train"], raw["validation"], raw["test"], processor)
        timings["fast_path_splits_s"] = round(time.perf_counter() - started, 1)

        started = time.perf_counter()
        loader = torch.utils.data.DataLoader(
            prepared.train, batch_size=args.batch_size, shuffle=True, collate_fn=prepared.collate_fn
        )
        for step, batch in enumerate(loader):
            pixels = prepared.device_preprocessor(batch["pixel_values"])
            if step + 1 >= args.batches:
                break
        timings["batches_s"] = round(time.perf_counter() - started, 1)
        report = {
            "flag": args.flag, "images": args.images, "size": args.size, "num_proc": args.num_proc,
            "npz_gib": round((root / name).stat().st_size / 1024**3, 2),
            "in_memory": {split: getattr(prepared, split).in_memory for split in ("train", "validation", "test")},
            "peak_rss_gib_at_start": round(rss_before, 2),
            "peak_rss_gib_after_conversion": round(rss_converted, 2),
            "peak_rss_gib": round(peak_rss_gib(), 2),
            "peak_rss_gib_largest_child": round(peak_rss_gib(resource.RUSAGE_CHILDREN), 2),
            "batch_shape": list(pixels.shape),
            **timings,
        }
        print(json.dumps(report, indent=2))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
