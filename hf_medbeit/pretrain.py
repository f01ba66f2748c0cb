"""Pre-train a BEiT by masked image modeling on unlabelled medical images: the whole recipe.

    hf-medbeit pretrain --sources breastmnist scans/ chest.npz --output_dir runs/beit-mim
    hf-medbeit pretrain configs/pretrain/breastmnist_chest_28.yaml
    accelerate launch scripts/pretrain.py configs/pretrain/medmnist_all_224.yaml
    hf-medbeit train --model_name_or_path runs/beit-mim --dataset_name breastmnist ...   # fine-tune it

Steps: arguments -> run folder -> unlabelled images (training splits only) -> BEiT for masked image
modeling -> targets (a k-means codebook of patches, or pixels) -> Trainer with block-wise masks ->
the pre-trained model, its image processor and codebook, a loss curve and a model card.

The run folder follows the same contract as a fine-tuning run (``run_folder``, ``resilience``):
resumed after a kill with the same command, a checkpoint on Ctrl-C/SIGTERM, atomic files and
``all_results.json`` last.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import transformers
from transformers import AutoImageProcessor, BeitForMaskedImageModeling

from . import outputs, run_folder
from .arguments import parse_pretrain_args
from .errors import UserError, run_with_user_errors
from .fast_path import DevicePreprocessor, UInt8ImageDataset, UnsupportedProcessor
from .hub import push_finished_run, take_push_settings
from .mim import (CODEBOOK_FILE, DeviceAugmenter, MaskedImageModelingTrainer, PatchCodebook, PixelTarget, TokenTarget,
                  collate_images, make_mask_generator)
from .modeling import build_image_processor, build_pretraining_config, count_parameters
from .provenance import describe_hardware, framework_versions, git_commit, recorded_hyperparameters, resolved_config
from .relative_position import use_fast_relative_position_bias
from .resilience import StopOnSignal, check_output_dir, train_or_stop
from .training import RECORDED_HYPERPARAMETERS, setup_logging
from .unlabeled import load_unlabeled

logger = logging.getLogger("hf_medbeit")

RUN_KIND = "pretrain"
# Arguments that make a pre-training run what it is (resuming with any of them changed is refused).
PRETRAIN_IDENTITY = (
    "sources", "source_repeats", "size", "config_name", "config_overrides", "model_name_or_path", "image_size",
    "mim_target", "codebook_size", "normalize_target", "masking", "mask_ratio", "augment", "seed",
)
LOSS_PLOT = "pretraining_loss.png"
# What the card shows of the training arguments: fine-tuning's, less what needs labels or evaluation.
PRETRAIN_HYPERPARAMETERS = tuple(
    name for name in RECORDED_HYPERPARAMETERS
    if name not in ("per_device_eval_batch_size", "label_smoothing_factor", "eval_strategy", "metric_for_best_model",
                    "load_best_model_at_end")
)


def default_run_name(data_args, mim_args) -> str:
    sources = "+".join(Path(source.rstrip("/")).stem for source in data_args.sources)
    return f"beit-mim-{mim_args.mim_target}-{sources}-{data_args.size}"


def pixel_target_size(model_args, data_args) -> int:
    """Values per patch for ``--mim_target pixels``: patch_size**2 * 3 (RGB; gray images are RGB by then)."""
    if model_args.model_name_or_path:
        config = BeitForMaskedImageModeling.config_class.from_pretrained(
            model_args.model_name_or_path, revision=model_args.model_revision, cache_dir=model_args.cache_dir)
    else:
        config = build_pretraining_config(model_args, data_args.size)
    return config.patch_size ** 2 * 3


def load_pretraining_model(model_args, data_args, mim_args, target_size: int):
    """A new ``BeitForMaskedImageModeling`` from the config (``lm_head`` sized for the target), or
    the checkpoint to continue; with its image processor."""
    if model_args.model_name_or_path:
        try:
            model = BeitForMaskedImageModeling.from_pretrained(
                model_args.model_name_or_path, revision=model_args.model_revision, cache_dir=model_args.cache_dir,
                **({"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}),
            )
            processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision,
                                                           cache_dir=model_args.cache_dir)
        except (OSError, ValueError) as error:
            raise UserError(f"could not load {model_args.model_name_or_path!r} as a BEiT masked-image-modeling checkpoint "
                            f"({str(error).splitlines()[0]}); pass a pretrain run folder or a BEiT -pt Hub id") from error
        if model.config.vocab_size != target_size:
            raise UserError(f"{model_args.model_name_or_path} predicts {model.config.vocab_size} values per patch, but "
                            f"--mim_target {mim_args.mim_target} needs {target_size}; continue it with its own target and codebook size")
    else:
        config = build_pretraining_config(model_args, data_args.size)
        config.vocab_size = target_size
        model = BeitForMaskedImageModeling(config)  # attention: transformers' default unless asked
        if model_args.attn_implementation:
            model.set_attn_implementation(model_args.attn_implementation)
        processor = build_image_processor(config.image_size, model_args.resample)
    if model_args.fast_relative_position_bias:
        use_fast_relative_position_bias(model)
    return model, processor


def main(argv: list[str] | None = None) -> dict:
    started = time.time()
    model_args, data_args, mim_args, training_args = parse_pretrain_args(argv)
    hub_push = take_push_settings(training_args)  # the token never reaches training_args.bin
    setup_logging(training_args)
    training_args.run_name = training_args.run_name or default_run_name(data_args, mim_args)
    if not training_args.output_dir_given:
        training_args.output_dir = os.path.join("runs", training_args.run_name)
    identity = run_folder.identity_of(model_args, data_args, mim_args, training_args, names=PRETRAIN_IDENTITY)
    run = run_folder.resolve(training_args.output_dir, identity, training_args.resume_from_checkpoint, kind=RUN_KIND)
    logger.info("Pre-training run %s -> %s", training_args.run_name, training_args.output_dir)

    # 1. Unlabelled images: MedMNIST training splits (never validation/test, never labels) and the
    #    user's own arrays and folders, all at one size.
    corpus = load_unlabeled(
        data_args.sources, data_args.size, repeats=data_args.source_repeats, data_dir=data_args.data_dir,
        download=data_args.download, verify_md5=not data_args.skip_md5_check, cache_dir=data_args.dataset_cache_dir,
        seed=training_args.seed, num_proc=data_args.preprocessing_num_workers,
    )
    images = UInt8ImageDataset(corpus.dataset)
    logger.info("Pre-training images per epoch: %s (%s)", f"{len(images):,}",
                ", ".join(f"{source.name}: {source.used:,}" for source in corpus.sources))

    # 2. Model and image processor; pixels are resized and normalised on the device.
    transformers.set_seed(training_args.seed)
    target_size = mim_args.codebook_size if mim_args.mim_target == "tokens" else pixel_target_size(model_args, data_args)
    model, image_processor = load_pretraining_model(model_args, data_args, mim_args, target_size)
    patch_size = model.config.patch_size
    try:
        preprocess = DevicePreprocessor(image_processor)
    except UnsupportedProcessor as error:
        raise UserError(f"the image processor of {model_args.model_name_or_path} cannot run on the device ({error}); "
                        "pre-train from a config instead") from error
    trainable_parameters, total_parameters = count_parameters(model)
    logger.info("BEiT for masked image modeling: %s parameters, %dx%d input, %dx%d patches",
                f"{total_parameters:,}", model.config.image_size, model.config.image_size, patch_size, patch_size)

    # 3. Targets: the codebook is fitted once per run (a resumed run reads it back).
    saved_codebook = Path(training_args.output_dir) / CODEBOOK_FILE
    if mim_args.mim_target == "tokens":
        if run.resume_from is not None and saved_codebook.is_file():
            codebook = PatchCodebook.load(saved_codebook)
        else:
            codebook = PatchCodebook.fit(images, preprocess, patch_size, mim_args.codebook_size, mim_args.normalize_target,
                                         seed=training_args.seed, max_images=mim_args.codebook_fit_images)
        target = TokenTarget(codebook)
    else:
        codebook = None
        target = PixelTarget(patch_size, normalize=mim_args.normalize_target)
    grid = (model.config.image_size // patch_size, model.config.image_size // patch_size)

    if run.resume_from is not None:
        run_folder.check_checkpoint_fits(model, run.resume_from)
    with run_folder.in_use(run, identity, is_main_process=training_args.process_index == 0, kind=RUN_KIND):
        check_output_dir(training_args.output_dir, model, training_args.save_total_limit)
        if codebook is not None and training_args.process_index == 0:
            codebook.save(saved_codebook)
        trainer = MaskedImageModelingTrainer(
            model=model,
            args=training_args,
            train_dataset=images,
            processing_class=image_processor,
            data_collator=collate_images,
            target=target,
            mask_generator=make_mask_generator(mim_args.masking, grid, mim_args.mask_ratio),
            augmenter=DeviceAugmenter(mim_args.crop_min_scale) if mim_args.augment else None,
            device_preprocessor=preprocess,
            layer_decay=model_args.layer_decay,
            callbacks=[StopOnSignal()],
        )
        train_result = train_or_stop(trainer, resume_from_checkpoint=run.resume_from)
        trainer.save_model()  # BeitForMaskedImageModeling as safetensors, with config and image processor
        trainer.save_state()
        trainer.log_metrics("train", train_result.metrics)

        results = {
            **train_result.metrics,
            "kind": RUN_KIND,
            "mim_target": mim_args.mim_target,
            "codebook_size": codebook.size if codebook is not None else None,
            "masking": mim_args.masking,
            "mask_ratio": mim_args.mask_ratio,
            "augment": mim_args.augment,
            "image_size": model.config.image_size,
            "patch_size": patch_size,
            "sources": [vars(source) for source in corpus.sources],
            "images_per_epoch": len(images),
            "channels": corpus.channels,
            "final_loss": _last_logged_loss(trainer.state.log_history) or train_result.metrics.get("train_loss"),
            "total_parameters": total_parameters,
            "wall_time_seconds": round(time.time() - started, 1),
            "model_type": model.config.model_type,
            "continued_from": model_args.model_name_or_path,
            "hyperparameters": recorded_hyperparameters(training_args, PRETRAIN_HYPERPARAMETERS),
            "hardware": describe_hardware(training_args),
            "git_commit": git_commit(),
            "framework_versions": framework_versions(),
        }
        if trainer.is_world_process_zero():
            write_pretraining_outputs(training_args.output_dir, trainer.state.log_history, results,
                                      resolved_config(model_args, data_args, mim_args, training_args))
            push_finished_run(training_args.output_dir, hub_push)
        return results


def _last_logged_loss(log_history: list[dict]) -> float | None:
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    return losses[-1] if losses else None


def write_pretraining_outputs(output_dir: str, log_history: list[dict], results: dict, run_config: dict) -> None:
    """The resolved config, the loss curve and the model card, then ``all_results.json`` last: its
    presence marks a finished run."""
    from .cards import write_card

    folder = Path(output_dir)
    outputs.write_json(folder / outputs.RUN_CONFIG_FILE, run_config)
    outputs.plot_loss_curve(folder / LOSS_PLOT, log_history, f"masked image modeling ({results['mim_target']})")
    outputs.write_json(folder / outputs.RESULTS_FILE, results)
    write_card(output_dir)
    logger.info("Pre-training finished: final loss %s; run folder %s (fine-tune it with hf-medbeit train "
                "--model_name_or_path %s)", results["final_loss"], output_dir, output_dir)


if __name__ == "__main__":
    run_with_user_errors(main)
