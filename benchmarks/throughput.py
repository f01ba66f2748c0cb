"""Training and inference throughput: the study's data path vs ours vs the model alone.

    python benchmarks/throughput.py                                  # CPU, tiny BEiT at 224
    python benchmarks/throughput.py --model base --batch_size 32 128 --device cuda
    python benchmarks/throughput.py --model large --batch_size 32 128 --out large.json

In one process, on one synthetic PneumoniaMNIST-format set (28x28 gray, upscaled to 224):

(a) study    the study's path: the image processor on PIL images in the data loader
             (``Dataset.set_transform``), fp32, batch ``--study_batch_size`` (32, as in this
             project's earlier H200 measurement; its figures are in benchmarks/README.md)
(b) ours     ``hf-medbeit train``'s path: WeightedLossTrainer + fast path + GPU defaults
(c) model    the model alone: synthetic tensors already on the device, same batch and precision

All three are images/s over ``--steps`` steps after ``--warmup`` untimed ones, timed between
steps with the device synchronised. Also: the data path alone (model-ready batches/s, ours vs the
processor path) and inference (our batched ``Trainer.predict`` vs a per-image ``pipeline`` loop).
Prints a table and writes JSON. Random weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import BeitConfig, BeitForImageClassification, BeitImageProcessor, Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hf_medbeit.data import load_medmnist  # noqa: E402
from hf_medbeit.data_path import default_num_workers, prepare_splits  # noqa: E402
from hf_medbeit.fast_path import UInt8ImageDataset  # noqa: E402
from hf_medbeit.modeling import count_parameters, freeze_all_but_top_layers  # noqa: E402
from hf_medbeit.training import MedMNISTTrainingArguments, WeightedLossTrainer  # noqa: E402
from hf_medbeit.transforms import collate, make_transform  # noqa: E402

from beit_shapes import MODELS  # noqa: E402  (the BEiT shapes; benchmarks/ is this script's folder)

DEFAULT_TOP_LAYERS = {"tiny": None, "base": None, "large": 5}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_model(name: str, top_layers: int | None, image_size: int, attn_implementation: str = "sdpa") -> BeitForImageClassification:
    """A new model, the same weights every call. Every measurement gets its own: a model that one
    Trainer has prepared is marked ``_is_accelerate_prepared``, and accelerate then hands it to the
    next Trainer as it is, without the autocast wrapper of that Trainer's bf16 (the cause of the
    GPU runs' b/c = 0.61 before this was fixed: our path had run in fp32 after the study path)."""
    transformers.set_seed(0)
    config = BeitConfig(image_size=image_size, patch_size=16, num_labels=2, **MODELS[name])
    model = BeitForImageClassification(config)
    model.set_attn_implementation(attn_implementation)
    if top_layers is not None:
        freeze_all_but_top_layers(model, top_layers)
    return model


def synthetic_medmnist(workdir: Path, images: int, seed: int = 0):
    """A PneumoniaMNIST-format file (28x28 gray, binary) -> DatasetDict, through data.load_medmnist."""
    rng = np.random.default_rng(seed)
    root = workdir / "medmnist"
    root.mkdir(parents=True, exist_ok=True)
    counts = {"train": images, "val": max(64, images // 10), "test": max(256, images // 4)}
    arrays = {}
    for prefix, count in counts.items():
        arrays[f"{prefix}_images"] = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        arrays[f"{prefix}_labels"] = rng.integers(0, 2, size=(count, 1), dtype=np.uint8)
    np.savez(root / "pneumoniamnist.npz", **arrays)
    raw, _, _ = load_medmnist("pneumoniamnist", data_dir=root, verify_md5=False, cache_dir=workdir / "cache")
    return raw


# What autocast runs each precision label in (fp32: no autocast).
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionCheck:
    """Records the dtype of the classifier's output, to prove a measurement ran in the precision
    it is labelled with (autocast bf16 gives bf16 logits before accelerate casts them back)."""

    def __init__(self, model):
        self.dtypes = set()
        self.handle = model.classifier.register_forward_hook(lambda module, inputs, output: self.dtypes.add(output.dtype))

    def require(self, precision: str, what: str) -> None:
        self.handle.remove()
        expected = AUTOCAST_DTYPES.get(precision, torch.float32)
        if self.dtypes != {expected}:
            raise RuntimeError(f"{what} was to run in {precision} but its logits were {sorted(map(str, self.dtypes))}")


class StepTimer(TrainerCallback):
    """Wall time of training steps warmup+1 .. warmup+steps, the device synchronised at both ends."""

    def __init__(self, warmup: int, steps: int, device: torch.device):
        self.warmup, self.steps, self.device = warmup, steps, device
        self.started = self.seconds = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            synchronize(self.device)
            self.started = time.perf_counter()
        elif state.global_step == self.warmup + self.steps:
            synchronize(self.device)
            self.seconds = time.perf_counter() - self.started


def common_args(workdir: Path, device: torch.device, batch_size: int, max_steps: int) -> dict:
    return dict(
        output_dir=str(workdir / "trainer"), report_to="none", save_strategy="no", eval_strategy="no",
        disable_tqdm=True, per_device_train_batch_size=batch_size, max_steps=max_steps,
        use_cpu=device.type == "cpu", seed=42,
    )


def images_per_second(timer: StepTimer, batch_size: int) -> float:
    return timer.steps * batch_size / timer.seconds


def train_study_path(model, raw, processor, batch_size, warmup, steps, device, workdir) -> float:
    """(a): plain Trainer, fp32, processor per PIL image in the loader, the HF example's way."""
    train = raw["train"].with_transform(make_transform(processor))
    # tf32=False: fp32 as the study ran it (transformers' own TF32 default would change it).
    tf32 = False if device.type == "cuda" and torch.cuda.get_device_capability()[0] >= 8 else None
    args = TrainingArguments(**common_args(workdir, device, batch_size, warmup + steps), remove_unused_columns=False,
                             optim="adamw_torch", tf32=tf32, logging_steps=10)
    timer = StepTimer(warmup, steps, device)
    check = PrecisionCheck(model)
    # Eager attention, as BEiT ran when the study was made. It also avoids a PyTorch failure seen on
    # an H200 (torch 2.11): fp32 SDPA backward of BEiT-large raised "LSE is not correctly aligned".
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate, callbacks=[timer])
        trainer.train()
    finally:
        model.set_attn_implementation(previous)
    check.require("fp32", "(a) the study path")
    del trainer
    free_memory()
    return images_per_second(timer, batch_size)


def train_our_path(model, raw, processor, batch_size, warmup, steps, device, workdir, precision, compile_model=False,
                   overrides: dict | None = None) -> float:
    """(b): what ``hf-medbeit train`` runs: fast path, WeightedLossTrainer, GPU defaults.
    ``overrides``: TrainingArguments fields to change, to find where (b) loses time against (c)."""
    prepared = prepare_splits(raw["train"], raw["validation"], raw["test"], processor)
    args = MedMNISTTrainingArguments(
        **{**common_args(workdir, device, batch_size, warmup + steps), "load_best_model_at_end": False,
           "bf16": precision == "bf16", "fp16": precision == "fp16", "torch_compile": compile_model,
           "gpu_defaults": precision != "fp32", **(overrides or {})},
    )
    args.dataloader_num_workers = default_num_workers(prepared, args.dataloader_num_workers)
    timer = StepTimer(warmup, steps, device)
    check = PrecisionCheck(model)
    trainer = WeightedLossTrainer(
        model=model, args=args, train_dataset=prepared.train, data_collator=prepared.collate_fn,
        processing_class=processor, device_preprocessor=prepared.device_preprocessor, callbacks=[timer],
    )
    trainer.train()
    check.require(precision, "(b) our path")
    del trainer
    free_memory()
    return images_per_second(timer, batch_size)


def train_model_only(model, batch_size, warmup, steps, device, precision) -> float:
    """(c): forward + backward + fused AdamW step on tensors already on the device."""
    model.to(device).train()
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        # As (b): hf-medbeit's GPU defaults switch TF32 on (the study path, run before, switched it off).
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=3e-4, weight_decay=0.01, fused=device.type == "cuda")
    pixel_values = torch.randn(batch_size, 3, model.config.image_size, model.config.image_size, device=device)
    labels = torch.randint(0, 2, (batch_size,), device=device)
    dtype = AUTOCAST_DTYPES.get(precision)
    check = PrecisionCheck(model)
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(device)
            started = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    seconds = time.perf_counter() - started
    check.require(precision, "(c) the model alone")
    del optimizer, pixel_values, labels
    free_memory()
    return steps * batch_size / seconds


def data_path_only(raw, processor, batch_size, batches, device, warmup: int = 10, rounds: int = 5) -> dict:
    """Model-ready (B, 3, 224, 224) float batches per second on ``device``: ours vs the processor.

    The two paths alternate in ``rounds`` so that load from other processes (a shared CPU
    machine) falls on both alike. ``warmup`` untimed batches per path first: the first batches
    pay for lazy setup and for the C allocator growing the heap (page faults on fresh memory),
    which a training run pays once."""

    def endless(loader):
        while True:
            yield from loader

    prepared = prepare_splits(raw["train"], raw["validation"], raw["test"], processor)
    pin = device.type == "cuda"
    ours = endless(torch.utils.data.DataLoader(prepared.train, batch_size=batch_size, shuffle=True,
                                               collate_fn=prepared.collate_fn, pin_memory=pin))
    study = endless(torch.utils.data.DataLoader(raw["train"].with_transform(make_transform(processor)),
                                                batch_size=batch_size, shuffle=True, collate_fn=collate, pin_memory=pin))
    paths = {
        "ours": (ours, lambda b: prepared.device_preprocessor(b["pixel_values"].to(device, non_blocking=True))),
        "processor": (study, lambda b: b["pixel_values"].to(device, non_blocking=True)),
    }
    seconds, images = dict.fromkeys(paths, 0.0), dict.fromkeys(paths, 0)
    for name, (iterator, finish) in paths.items():
        for _ in range(warmup):
            finish(next(iterator))
    per_round = max(1, batches // rounds)
    for _ in range(rounds):
        for name, (iterator, finish) in paths.items():
            synchronize(device)
            started = time.perf_counter()
            for _ in range(per_round):
                images[name] += len(finish(next(iterator)))
            synchronize(device)
            seconds[name] += time.perf_counter() - started
    ours_rate, study_rate = images["ours"] / seconds["ours"], images["processor"] / seconds["processor"]
    return {"batch_size": batch_size, "batches": per_round * rounds, "warmup_batches": warmup,
            "ours_images_per_s": ours_rate, "processor_images_per_s": study_rate, "speedup": ours_rate / study_rate}


def pipeline_images_per_s(classify, inputs: list, device: torch.device, warmup: int = 8) -> float:
    """A plain ``pipeline`` called once per image (PIL image or file path), as a user would loop."""
    for item in inputs[:warmup]:
        classify(item)
    synchronize(device)
    started = time.perf_counter()
    for item in inputs:
        classify(item)
    synchronize(device)
    return len(inputs) / (time.perf_counter() - started)


def inference(model, raw, processor, device, precision, workdir, images: int, pipeline_images: int) -> dict:
    """Our ``Trainer.predict`` (fast path, eval batch 256, GPU defaults) vs ``pipeline`` per image."""
    test = raw["test"].select(range(min(images, len(raw["test"]))))
    prepared = prepare_splits(raw["train"], raw["validation"], test, processor)
    args = MedMNISTTrainingArguments(**common_args(workdir, device, 32, 1), load_best_model_at_end=False,
                                     bf16=precision == "bf16", fp16=precision == "fp16", gpu_defaults=precision != "fp32")
    trainer = WeightedLossTrainer(model=model, args=args, data_collator=prepared.collate_fn, processing_class=processor,
                                  device_preprocessor=prepared.device_preprocessor)
    trainer.predict(UInt8ImageDataset(test.select(range(min(512, len(test))))))  # warm-up
    synchronize(device)
    started = time.perf_counter()
    trainer.predict(prepared.test)
    synchronize(device)
    ours = len(test) / (time.perf_counter() - started)
    del trainer
    free_memory()

    model.eval()
    classify = transformers.pipeline("image-classification", model=model, image_processor=processor, device=device)
    pil_images = [image.convert("RGB") for image in raw["test"].select(range(pipeline_images))["image"]]
    plain = pipeline_images_per_s(classify, pil_images, device)
    return {"ours_images_per_s": ours, "pipeline_images_per_s": plain, "speedup": ours / plain,
            "ours_images": len(test), "pipeline_images": len(pil_images),
            "ours_eval_batch_size": args.per_device_eval_batch_size, "ours_precision": precision, "pipeline_precision": "fp32"}


def predict_command(model, raw, processor, device, workdir, images: int, pipeline_images: int) -> dict:
    """``hf-medbeit predict`` on PNG files (read, RGB, batches of 64, fp32; the image processor
    batched on the model's device) against ``pipeline`` called per file, same model and device."""
    from hf_medbeit.predict import find_images, load_classifier, predict_files

    folder = workdir / "predict_files"
    folder.mkdir()
    for index, image in enumerate(raw["test"].select(range(min(images, len(raw["test"]))))["image"]):
        image.save(folder / f"{index:05d}.png")
    model.save_pretrained(workdir / "predict_model")
    processor.save_pretrained(workdir / "predict_model")
    paths = find_images([str(folder)])
    classifier = load_classifier(str(workdir / "predict_model"), device=str(device))
    list(predict_files(classifier, paths[:64]))  # warm-up
    synchronize(device)
    started = time.perf_counter()
    scored = sum(1 for _ in predict_files(classifier, paths))
    synchronize(device)
    ours = scored / (time.perf_counter() - started)
    classify = transformers.pipeline("image-classification", model=str(workdir / "predict_model"), device=device)
    plain = pipeline_images_per_s(classify, [str(path) for path in paths[:pipeline_images]], device)
    return {"files": scored, "batch_size": 64, "ours_images_per_s": ours, "pipeline_images_per_s": plain,
            "speedup": ours / plain}


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--trainable_top_layers", type=int, default=-1, help="Default: 5 for large, all for the others.")
    parser.add_argument("--batch_size", type=int, nargs="+", default=[32], help="Batch sizes for (b) and (c).")
    parser.add_argument("--study_batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="Timed steps per measurement.")
    parser.add_argument("--warmup", type=int, default=5, help="Untimed steps before them.")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N].")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                        help="For (b) and (c). auto: bf16 (fp16 without bf16) on CUDA, fp32 on CPU, as hf-medbeit train does.")
    parser.add_argument("--compile", action="store_true", help="Also time (b) with --torch_compile at the largest batch size.")
    parser.add_argument("--attn_implementation", choices=["sdpa", "eager"], default="sdpa",
                        help="Attention of (b) and (c); the study path (a) always runs eager, as BEiT did then.")
    parser.add_argument("--trainer_overrides", type=json.loads, default=None,
                        help='JSON of TrainingArguments fields for (b), e.g. \'{"max_grad_norm": 0}\' (diagnostics).')
    parser.add_argument("--skip", nargs="*", default=[], choices=["study", "ours", "model", "data", "inference", "predict"])
    parser.add_argument("--data_batches", type=int, default=20, help="Batches timed for the data-path-only measurement.")
    parser.add_argument("--data_warmup", type=int, default=10, help="Untimed batches per path before them.")
    parser.add_argument("--inference_images", type=int, default=2048)
    parser.add_argument("--pipeline_images", type=int, default=128)
    parser.add_argument("--out", default=None, help="Write the JSON report here.")
    return parser.parse_args()


def main() -> dict:
    args = parse()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    precision = args.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    top_layers = DEFAULT_TOP_LAYERS[args.model] if args.trainable_top_layers < 0 else args.trainable_top_layers
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    report = {
        "date": datetime.date.today().isoformat(), "device": str(device), "device_name": device_name,
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "model": args.model, "trainable_top_layers": top_layers, "precision": precision, "attn_implementation": args.attn_implementation,
        "trainer_overrides": args.trainer_overrides,
        "steps": args.steps, "warmup": args.warmup, "command": " ".join(sys.argv),
    }
    log(f"device {device} ({device_name}), model {args.model}, precision {precision}")
    transformers.set_seed(0)
    with tempfile.TemporaryDirectory(prefix="hf_medbeit_bench_") as tmp:
        workdir = Path(tmp)
        largest = max(args.batch_size + [args.study_batch_size])
        needed = max((args.warmup + args.steps) * largest, (args.data_batches + args.data_warmup) * largest)
        raw = synthetic_medmnist(workdir, images=min(max(needed, 1024), 20000))
        def new_model():  # one per measurement: see build_model
            free_memory()
            return build_model(args.model, top_layers, image_size=224, attn_implementation=args.attn_implementation)

        trainable, total = count_parameters(new_model())
        report.update(trainable_parameters=trainable, total_parameters=total)
        processor = BeitImageProcessor(size={"height": 224, "width": 224})
        log(f"data: {len(raw['train'])} train images 28x28; model: {trainable:,} of {total:,} parameters trained")

        if "study" not in args.skip:
            log(f"(a) study path, fp32, batch {args.study_batch_size} ...")
            report["study_images_per_s"] = train_study_path(new_model(), raw, processor, args.study_batch_size, args.warmup,
                                                            args.steps, device, workdir)
            report["study_batch_size"] = args.study_batch_size
            log(f"    {report['study_images_per_s']:.1f} images/s")
        rows = []
        for batch_size in args.batch_size:
            row = {"batch_size": batch_size}
            if "model" not in args.skip:
                log(f"(c) model only, {precision}, batch {batch_size} ...")
                row["model_only_images_per_s"] = train_model_only(new_model(), batch_size, args.warmup, args.steps, device, precision)
                log(f"    {row['model_only_images_per_s']:.1f} images/s")
            if "ours" not in args.skip:
                log(f"(b) our Trainer + fast path, {precision}, batch {batch_size} ...")
                row["ours_images_per_s"] = train_our_path(new_model(), raw, processor, batch_size, args.warmup, args.steps,
                                                          device, workdir, precision, overrides=args.trainer_overrides)
                log(f"    {row['ours_images_per_s']:.1f} images/s")
            if "ours_images_per_s" in row and "study_images_per_s" in report:
                row["ours_over_study"] = row["ours_images_per_s"] / report["study_images_per_s"]
            if "ours_images_per_s" in row and "model_only_images_per_s" in row:
                row["ours_over_model_only"] = row["ours_images_per_s"] / row["model_only_images_per_s"]
            rows.append(row)
        report["training"] = rows
        if args.compile:
            batch_size = max(args.batch_size)
            log(f"(b) with torch_compile, batch {batch_size} (compiling takes a while) ...")
            rate = train_our_path(new_model(), raw, processor, batch_size, max(args.warmup, 3), args.steps, device, workdir,
                                  precision, compile_model=True)
            report["compiled"] = {"batch_size": batch_size, "ours_images_per_s": rate}
            log(f"    {rate:.1f} images/s")
        if "data" not in args.skip:
            log("data path alone (28 -> 224, model-ready batches) ...")
            report["data_path"] = data_path_only(raw, processor, max(args.batch_size), args.data_batches, device,
                                                 warmup=args.data_warmup)
            log(f"    ours {report['data_path']['ours_images_per_s']:.0f} vs processor "
                f"{report['data_path']['processor_images_per_s']:.0f} images/s")
        if "inference" not in args.skip:
            log("inference: Trainer.predict (fast path) vs pipeline per image ...")
            report["inference"] = inference(new_model(), raw, processor, device, precision, workdir,
                                            args.inference_images, args.pipeline_images)
            log(f"    ours {report['inference']['ours_images_per_s']:.0f} vs pipeline "
                f"{report['inference']['pipeline_images_per_s']:.0f} images/s")
        if "predict" not in args.skip:
            log("hf-medbeit predict on PNG files vs pipeline per file ...")
            report["predict_command"] = predict_command(new_model(), raw, processor, device, workdir,
                                                        args.inference_images, args.pipeline_images)
            log(f"    ours {report['predict_command']['ours_images_per_s']:.0f} vs pipeline "
                f"{report['predict_command']['pipeline_images_per_s']:.0f} images/s")
    print_table(report)
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def print_table(report: dict) -> None:
    print(f"\n{report['model']} BEiT on {report['device_name']} ({report['device']}), {report['precision']}; "
          f"study path: {report.get('study_images_per_s', float('nan')):.1f} images/s (fp32, batch {report.get('study_batch_size', '-')})")
    print("| batch | (b) ours img/s | (c) model only img/s | b/a | b/c |")
    print("| --- | --- | --- | --- | --- |")
    for row in report.get("training", []):
        cells = [row.get(key) for key in ("ours_images_per_s", "model_only_images_per_s", "ours_over_study", "ours_over_model_only")]
        text = [f"{c:.1f}" if c is not None and i < 2 else (f"{c:.2f}" if c is not None else "-") for i, c in enumerate(cells)]
        print(f"| {row['batch_size']} | " + " | ".join(text) + " |")
    for key in ("data_path", "inference", "predict_command"):
        if key in report:
            r = report[key]
            other = "processor" if key == "data_path" else "pipeline"
            print(f"{key}: ours {r['ours_images_per_s']:.0f} img/s vs {other} {r[f'{other}_images_per_s']:.0f} img/s = {r['speedup']:.1f}x")


if __name__ == "__main__":
    main()
