"""Fine-tune an image classifier on a MedMNIST data set: the whole recipe, top to bottom.

    hf-medbeit train --dataset_name breastmnist --output_dir runs/beit-breast
    accelerate launch scripts/train.py --dataset_name pneumoniamnist --balancing undersample --balance_ratio 0.5
    hf-medbeit train configs/study/beit-large-breastmnist-28.yaml

Steps: arguments -> run folder -> data -> balancing -> model -> transforms -> Trainer -> best
checkpoint by validation AUC -> ONE test evaluation -> results, predictions and plots.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import transformers

from . import outputs, run_folder
from .arguments import parse_args
from .cards import write_card
from .data import class_weights, label_array, load_medmnist, resample
from .errors import UserError, run_with_user_errors
from .explain import write_run_explanations
from .hub import push_finished_run, take_push_settings
from .metrics import auc_confidence_interval, confusion, make_compute_metrics, scores_from_logits
from .modeling import count_parameters, encoder_layers, freeze_all_but_top_layers, load_image_processor, load_model
from .provenance import describe_hardware, framework_versions, git_commit, recorded_hyperparameters, resolved_config
from .resilience import StopOnSignal, check_output_dir, train_or_stop
from .training import RECORDED_HYPERPARAMETERS, WeightedLossTrainer, setup_logging
from .data_path import default_num_workers, prepare_splits

logger = logging.getLogger("hf_medbeit")


def default_run_name(model_args, data_args) -> str:
    model = model_args.model_type or Path((model_args.config_name or model_args.model_name_or_path).rstrip("/")).name.removesuffix(".json")
    return f"{model}-{data_args.dataset_name}-{data_args.size}-{data_args.balancing}"


def main(argv: list[str] | None = None) -> dict:
    started = time.time()
    model_args, data_args, training_args = parse_args(argv)
    # Trainer's own Hub pushing is switched off and the token taken out of the arguments (which
    # Trainer pickles into training_args.bin); the finished run is pushed at the end instead.
    hub_push = take_push_settings(training_args)
    setup_logging(training_args)
    # Decide what to do with the run folder now (start, resume or refuse), but touch it only once
    # data and model have loaded: a mistake found on the way leaves nothing behind.
    training_args.run_name = training_args.run_name or default_run_name(model_args, data_args)
    if not training_args.output_dir_given:
        training_args.output_dir = os.path.join("runs", training_args.run_name)
    identity = run_folder.identity_of(model_args, data_args, training_args)
    run = run_folder.resolve(training_args.output_dir, identity, training_args.resume_from_checkpoint)
    last_checkpoint = run.resume_from
    logger.info("Run %s -> %s", training_args.run_name, training_args.output_dir)

    # 1. Data: MedMNIST .npz -> DatasetDict with the class names from medmnist.INFO.
    raw, spec, data_md5 = load_medmnist(
        data_args.dataset_name,
        size=data_args.size,
        data_dir=data_args.data_dir,
        download=data_args.download,
        verify_md5=not data_args.skip_md5_check,
        cache_dir=data_args.dataset_cache_dir,
        num_proc=data_args.preprocessing_num_workers,
    )
    train_split, validation_split, test_split = raw["train"], raw["validation"], raw["test"]
    if data_args.max_train_samples is not None:
        train_split = train_split.select(range(min(data_args.max_train_samples, len(train_split))))
    if data_args.max_eval_samples is not None:
        validation_split = validation_split.select(range(min(data_args.max_eval_samples, len(validation_split))))

    # 2. Balancing, on the training split only.
    loss_weights = None
    if data_args.balancing in ("undersample", "oversample"):
        train_split = resample(train_split, spec, data_args.balancing, data_args.balance_ratio, training_args.seed)
    train_labels = label_array(train_split)
    if data_args.balancing == "weighted_loss":
        loss_weights = class_weights(train_labels, spec)
        logger.info("Class weights for the loss: %s", dict(zip(spec.label_names, np.round(loss_weights, 4).tolist())))

    # 3. Model with the data set's labels, and its image processor.
    transformers.set_seed(training_args.seed)
    model = load_model(model_args, spec)
    if model_args.trainable_top_layers is not None:
        freeze_all_but_top_layers(model, model_args.trainable_top_layers)
    if model_args.layer_decay is not None:
        encoder_layers(model)  # fails early, with a clear message, for models without blocks
    trainable_parameters, total_parameters = count_parameters(model)
    logger.info("Trainable parameters: %s of %s", f"{trainable_parameters:,}", f"{total_parameters:,}")
    image_processor = load_image_processor(model_args, model)

    # 4. Data path: uint8 batches resized and normalised on the device (fast), or the processor
    #    per PIL image in the loader; grayscale -> RGB either way. The processor is what is saved.
    prepared = prepare_splits(
        train_split, validation_split, test_split, image_processor, data_path=data_args.data_path, augment=data_args.augment
    )
    training_args.dataloader_num_workers = default_num_workers(prepared, training_args.dataloader_num_workers)

    # 5. Train; the best checkpoint by validation AUC is loaded at the end. Found before training:
    #    an unwritable folder or a disk too small. During it: Ctrl-C or SIGTERM saves a checkpoint
    #    and stops; a failed write names the checkpoint to resume from.
    if last_checkpoint is not None:
        run_folder.check_checkpoint_fits(model, last_checkpoint)
    # From here on the folder is in use: a failure before the first checkpoint removes what this
    # command created, so no empty run folder is left behind.
    with run_folder.in_use(run, identity, is_main_process=training_args.process_index == 0):
        check_output_dir(training_args.output_dir, model, training_args.save_total_limit)
        trainer = WeightedLossTrainer(
            model=model,
            args=training_args,
            train_dataset=prepared.train,
            eval_dataset=prepared.validation,
            processing_class=image_processor,
            data_collator=prepared.collate_fn,
            compute_metrics=make_compute_metrics(spec.task, spec.label_names),
            class_weights=loss_weights,
            multi_label=spec.is_multi_label,
            layer_decay=model_args.layer_decay,
            device_preprocessor=prepared.device_preprocessor,
            callbacks=[StopOnSignal()],
        )
        train_result = train_or_stop(trainer, resume_from_checkpoint=last_checkpoint)
        trainer.save_model()  # the best model, as safetensors, with the image processor and config
        trainer.save_state()
        trainer.log_metrics("train", train_result.metrics)

        # 6. Validation metrics of the selected model, then the test split, evaluated once.
        validation_metrics = trainer.evaluate(metric_key_prefix="eval")
        trainer.log_metrics("eval", validation_metrics)
        test_output = trainer.predict(prepared.test, metric_key_prefix="test")
        trainer.log_metrics("test", test_output.metrics)

        results = {
            **train_result.metrics,
            **validation_metrics,
            **test_output.metrics,
            "dataset": spec.flag,
            "size": spec.size,
            "task": spec.task,
            "label_names": list(spec.label_names),
            "data_md5": data_md5,
            "best_model_checkpoint": trainer.state.best_model_checkpoint,
            "trainable_parameters": trainable_parameters,
            "total_parameters": total_parameters,
            "train_examples": len(train_split),
            "train_class_counts": train_labels.sum(axis=0).tolist()
            if spec.is_multi_label
            else np.bincount(train_labels, minlength=spec.num_labels).tolist(),
            "class_weights": None if loss_weights is None else loss_weights.tolist(),
            "wall_time_seconds": round(time.time() - started, 1),
            # Provenance for the model card.
            **run_provenance(model_args, data_args, training_args, model),
        }
        if trainer.is_world_process_zero():
            write_run_outputs(training_args.output_dir, spec, test_output, results,
                              resolved_config(model_args, data_args, training_args))
            # A few test images per class (right and wrong) with heat maps, for the card. The run is
            # finished and whole without them: a failure here is a warning, not a lost run.
            try:
                if training_args.explain_per_class > 0:
                    write_run_explanations(training_args.output_dir, per_class=training_args.explain_per_class,
                                           device=str(trainer.args.device))
            except Exception as error:  # noqa: BLE001 - any failure of an optional figure
                logger.warning("No explained test images in the card (%s: %s); make them with: hf-medbeit explain "
                               "--model %s --split test", type(error).__name__, error, training_args.output_dir)
            write_card(training_args.output_dir, repo_id=hub_push.repo_id if hub_push else None)
            push_finished_run(training_args.output_dir, hub_push)
        return results


def run_provenance(model_args, data_args, training_args, model) -> dict:
    """What the model card needs to say how the model was made (never the Hub token)."""
    from_scratch = bool(model_args.model_type or model_args.config_name)
    checkpoint = model_args.model_name_or_path
    hyperparameters = recorded_hyperparameters(training_args, RECORDED_HYPERPARAMETERS)
    return {
        "model_type": model.config.model_type,
        "trained_from_scratch": from_scratch,
        "config_overrides": model_args.config_overrides if from_scratch else None,
        "model_name_or_path": None if from_scratch else checkpoint,
        # A Hub id is a base model the Hub can link to; a local folder is not.
        "base_model": None if from_scratch or os.path.isdir(checkpoint) else checkpoint,
        # Fine-tuned from an `hf-medbeit pretrain` folder: what that encoder was pre-trained on, and how.
        "pretraining": None if from_scratch else pretraining_record(checkpoint),
        "model_revision": None if from_scratch else model_args.model_revision,
        "trainable_top_layers": model_args.trainable_top_layers,
        "layer_decay": model_args.layer_decay,
        "balancing": data_args.balancing,
        "balance_ratio": data_args.balance_ratio,
        "augment": data_args.augment,
        "max_train_samples": data_args.max_train_samples,
        "max_eval_samples": data_args.max_eval_samples,
        "hyperparameters": hyperparameters,
        "hardware": describe_hardware(training_args),
        "git_commit": git_commit(),
        "framework_versions": framework_versions(),
    }


def pretraining_record(checkpoint: str) -> dict | None:
    """The pre-training run behind a local ``--model_name_or_path`` (its objective and sources), or
    None when the checkpoint is not an ``hf-medbeit pretrain`` folder."""
    if not os.path.isdir(checkpoint):
        return None
    try:
        pretrained = outputs.read_results(checkpoint, kind="pretrain")
    except UserError:
        return None
    return {
        "run": checkpoint,
        "mim_target": pretrained["mim_target"],
        "sources": [source["name"] for source in pretrained["sources"]],
        "images_per_epoch": pretrained["images_per_epoch"],
        "epochs": pretrained.get("hyperparameters", {}).get("num_train_epochs"),
        "git_commit": pretrained.get("git_commit"),
    }


def write_run_outputs(output_dir: str, spec, test_output, results: dict, run_config: dict) -> None:
    """The resolved config, predictions, confusion matrix and ROC plot, then ``all_results.json``
    last: its presence marks a complete run."""
    y_true = np.asarray(test_output.label_ids).astype(int)
    scores = scores_from_logits(test_output.predictions, spec.task)
    low, high = auc_confidence_interval(y_true, scores, spec.task)
    results["test_auc_ci95"] = [low, high]
    matrix = confusion(y_true, scores, spec.task, spec.num_labels)
    title = f"{spec.flag} ({spec.size}x{spec.size}) test"
    folder = Path(output_dir)
    outputs.write_json(folder / outputs.RUN_CONFIG_FILE, run_config)
    outputs.write_predictions(folder / outputs.PREDICTIONS_FILE, y_true, scores, spec.label_names, spec.task)
    outputs.write_json(folder / outputs.CONFUSION_FILE, {"label_names": list(spec.label_names), "matrix": matrix})
    outputs.plot_confusion_matrix(folder / outputs.CONFUSION_PLOT, matrix, spec.label_names, title)
    outputs.plot_roc_curves(folder / outputs.ROC_PLOT, y_true, scores, spec.label_names, spec.task, title)
    outputs.write_json(folder / outputs.RESULTS_FILE, results)
    logger.info("Test AUC %.4f (95%% CI %.4f-%.4f), ACC %.4f; run folder %s",
                results["test_auc"], low, high, results["test_acc"], output_dir)


if __name__ == "__main__":
    run_with_user_errors(main)
