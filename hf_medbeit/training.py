"""Training: ``TrainingArguments`` with the study's defaults and a ``Trainer`` with a class-weighted loss.

The loss is written so that gradient accumulation and several processes give the same gradient as
one big batch: the summed (weighted) per-example loss is divided by ``num_items_in_batch``, the
number of labels in the whole accumulated, all-process batch that ``Trainer`` counts. With the
balanced weights (which average to 1 over the training set) this is the weighted mean in
expectation, and unlike PyTorch's weighted ``"mean"`` it does not change with how a batch is split.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments
from transformers.utils import SAFE_WEIGHTS_NAME

from .errors import UserError
from .modeling import layer_decay_parameter_groups


# The training arguments a run records in all_results.json, in the order its model card shows them
# (world_size and total_train_batch_size are derived from the others).
RECORDED_HYPERPARAMETERS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "world_size", "total_train_batch_size", "per_device_eval_batch_size", "optim", "weight_decay", "adam_beta1",
    "adam_beta2", "adam_epsilon", "max_grad_norm", "lr_scheduler_type", "warmup_steps", "warmup_ratio",
    "label_smoothing_factor", "seed", "data_seed", "bf16", "fp16", "tf32", "eval_strategy", "save_strategy",
    "metric_for_best_model", "load_best_model_at_end",
)


@dataclass
class MedMNISTTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the study's defaults (configs/study/README.md): 5 epochs, lr 3e-4,
    batch 32, seed 42, evaluation and saving every epoch, best checkpoint by validation AUC."""

    output_dir: str | None = field(
        default=None, metadata={"help": "Run folder. Default: runs/<run_name>."}
    )
    num_train_epochs: float = field(default=5.0, metadata={"help": "Training epochs."})
    learning_rate: float = field(default=3e-4, metadata={"help": "Peak learning rate (the study: 3e-4)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Training batch size per device."})
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Evaluation batch size per device (inference only, so large)."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate on the validation split."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to save a checkpoint."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept (the best is always kept)."})
    logging_strategy: str = field(default="steps", metadata={"help": "When to log the training loss."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "Reload the best checkpoint after training."})
    metric_for_best_model: str | None = field(default="auc", metadata={"help": "Validation metric that picks the best checkpoint."})
    greater_is_better: bool | None = field(default=True, metadata={"help": "Whether a larger metric is better."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the image column for the lazy transform."})
    seed: int = field(default=42, metadata={"help": "Random seed (the study: 42)."})
    explain_per_class: int = field(
        default=2,
        metadata={"help": "At the end of training, explain this many right and this many wrong test images per class "
                  "(heat maps for the model card, as `hf-medbeit explain --split test`); 0 skips it."},
    )
    gpu_defaults: bool = field(
        default=True,
        metadata={"help": "On a CUDA GPU: bf16 (fp16 where bf16 is missing) unless --bf16/--fp16 is given, and TF32 unless --tf32 is given. --gpu_defaults False trains in fp32."},
    )

    def __post_init__(self):
        # Remember whether the user chose a folder; if not, the run name names it (see finetune.py).
        self.output_dir_given = self.output_dir is not None
        if self.load_best_model_at_end and str(self.eval_strategy) in ("no", "IntervalStrategy.NO"):
            # Checked before TrainingArguments, whose message ("save and eval strategy must match")
            # hides the reason. (Code that trains without selection, e.g. benchmarks, turns
            # load_best_model_at_end off.)
            raise UserError("--eval_strategy no: the best checkpoint is chosen by validation AUC, which needs "
                            "evaluation; use --eval_strategy epoch (default) or steps")
        if launched_as_several_processes_without_accelerator():
            # torchrun (accelerate launch) started N processes on a machine with no GPU: accelerate
            # joins them into one group only when told to use the CPU; otherwise each would train
            # alone on all the data and write the same run folder, a silent wrong result.
            self.use_cpu = True
        if self.gpu_defaults and not self.use_cpu and torch.cuda.is_available():
            apply_gpu_defaults(self)
        super().__post_init__()


@dataclass
class PretrainingArguments(MedMNISTTrainingArguments):
    """``TrainingArguments`` for masked image modeling: no labels, so no validation or selection
    (the last model is the result); AdamW with BEiT's weight decay 0.05, warm-up and cosine decay."""

    num_train_epochs: float = field(default=100.0, metadata={"help": "Pre-training epochs."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (BEiT: 1.5e-3 at batch 2048)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (BEiT: 0.05)."})
    per_device_train_batch_size: int = field(default=128, metadata={"help": "Training batch size per device."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule (BEiT: cosine)."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Linear warm-up: steps, or a share of all steps if below 1."})
    eval_strategy: str = field(default="no", metadata={"help": "No validation: pre-training has no labels."})
    load_best_model_at_end: bool = field(default=False, metadata={"help": "The last model is the result."})
    metric_for_best_model: str | None = field(default=None, metadata={"help": "Unused in pre-training."})
    greater_is_better: bool | None = field(default=None, metadata={"help": "Unused in pre-training."})
    save_total_limit: int | None = field(default=1, metadata={"help": "Checkpoints kept for resuming."})
    logging_steps: float = field(default=50, metadata={"help": "Log the loss every N steps."})
    explain_per_class: int = field(default=0, metadata={"help": "Unused in pre-training (no classifier to explain)."})


def setup_logging(training_args) -> None:
    """Hugging Face's example-script logging, at the level ``training_args`` asks for."""
    import datasets
    import transformers

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    # Our own progress lines (data, balancing, results) on the main process even at transformers'
    # default "passive" level; replicas follow --log_level_replica.
    logging.getLogger("hf_medbeit").setLevel(logging.INFO if training_args.should_log else log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def launched_as_several_processes_without_accelerator() -> bool:
    """True in a process that torchrun started as one of several (LOCAL_RANK and WORLD_SIZE > 1 set)
    on a machine where torch sees no accelerator (CUDA, XPU, MPS, ...)."""
    if "LOCAL_RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        return not accelerator.is_available()
    return not torch.cuda.is_available()


def apply_gpu_defaults(args: TrainingArguments) -> None:
    """Mixed precision and TF32 where the user chose neither: on this project's H200, BEiT-base at
    batch 128 trained at 1,419 images/s in bf16 against 980 in fp32 + TF32 (benchmarks/README.md).
    Fused AdamW and SDPA attention are already transformers' defaults for torch >= 2.8."""
    if not (args.bf16 or args.fp16):
        if torch.cuda.is_bf16_supported():
            args.bf16 = True
        else:
            args.fp16 = True
    if args.tf32 is None and torch.cuda.get_device_capability()[0] >= 8:
        args.tf32 = True


class MedMNISTTrainer(Trainer):
    """``Trainer`` with what every recipe here needs (fine-tuning and pre-training alike):

    * ``device_preprocessor`` (``fast_path.DevicePreprocessor``) turns uint8 batches into the
      model's ``pixel_values`` on the training device, at the start of every step;
    * ``layer_decay`` switches on BEiT's layer-wise learning-rate decay through the optimizer's
      parameter groups;
    * checkpoints are reloaded through ``from_pretrained`` (see below), so the best model at the
      end and a resumed run get the saved weights, not a silent partial match.
    """

    def __init__(self, *args, layer_decay: float | None = None, device_preprocessor=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.device_preprocessor = device_preprocessor
        self.layer_decay = layer_decay

    def preprocess_on_device(self, inputs: dict) -> dict:
        """uint8 pixels -> normalised float ``pixel_values``; batches already in float pass as they are."""
        pixels = inputs.get("pixel_values")
        if self.device_preprocessor is None or pixels is None or pixels.dtype != torch.uint8:
            return inputs
        return {**inputs, "pixel_values": self.device_preprocessor(pixels)}

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Also covers predictions without labels, where Trainer calls the model, not compute_loss.
        inputs = self.preprocess_on_device(self._prepare_inputs(inputs))
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def create_optimizer(self, model=None):
        if self.layer_decay is None or self.optimizer is not None:
            return super().create_optimizer(model)
        model = self.model if model is None else model
        groups = layer_decay_parameter_groups(
            model,
            set(self.get_decay_parameter_names(model)),
            learning_rate=self.args.learning_rate,
            weight_decay=self.args.weight_decay,
            layer_decay=self.layer_decay,
        )
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # --- Loading checkpoint weights -----------------------------------------------------------
    # transformers 5.x renamed BEiT's and ViT's modules in memory (encoder.layer.N.attention... ->
    # layers.N.attention.q_proj) but saves checkpoints under the Hub's original names. Trainer then
    # reloads a checkpoint (best model at the end, or on resume) with a raw `load_state_dict(...,
    # strict=False)`, which matches none of the renamed keys and only logs a warning: the "best"
    # model would silently be the last one. Loading through `from_pretrained` applies the key
    # conversion; `strict=True` makes any remaining mismatch an error instead of a warning.

    def _single_file_checkpoint(self, checkpoint: str) -> bool:
        return not (self.is_deepspeed_enabled or self.is_fsdp_enabled) and os.path.isfile(
            os.path.join(checkpoint, SAFE_WEIGHTS_NAME)
        )

    def _load_weights_from_pretrained(self, checkpoint: str, model=None) -> None:
        model = self.accelerator.unwrap_model(self.model if model is None else model)
        reloaded = type(model).from_pretrained(checkpoint, dtype=model.dtype)
        model.load_state_dict(reloaded.state_dict(), strict=True)

    def _load_best_model(self) -> None:
        checkpoint = self.state.best_model_checkpoint
        if not self._single_file_checkpoint(checkpoint):
            return super()._load_best_model()
        self._load_weights_from_pretrained(checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self._single_file_checkpoint(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_weights_from_pretrained(resume_from_checkpoint, model)


class WeightedLossTrainer(MedMNISTTrainer):
    """``MedMNISTTrainer`` whose loss weights classes: cross-entropy with per-class weights for
    single-label tasks, BCE-with-logits with per-finding ``pos_weight`` for multi-label ones.
    ``class_weights=None`` gives the plain (unweighted) loss.
    """

    def __init__(self, *args, class_weights=None, multi_label: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.class_weights = None if class_weights is None else torch.as_tensor(np.asarray(class_weights), dtype=torch.float32)
        self.multi_label = multi_label
        # Makes Trainer count the labels of each accumulated batch (across processes) and pass that
        # count as `num_items_in_batch`; it then does not divide our loss by the accumulation steps.
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = self.preprocess_on_device(inputs)
        labels = inputs["labels"]
        outputs = model(**{key: value for key, value in inputs.items() if key != "labels"})
        loss = self.weighted_loss(outputs.logits, labels, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def weighted_loss(self, logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        logits = logits.float()
        weights = None if self.class_weights is None else self.class_weights.to(logits.device)
        if self.multi_label:
            per_item = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), pos_weight=weights, reduction="none")
        else:
            # --label_smoothing_factor: Trainer's own label smoother never runs, since this loss replaces its.
            per_item = F.cross_entropy(logits, labels, weight=weights, reduction="none",
                                       label_smoothing=self.args.label_smoothing_factor)
        if num_items_in_batch is None:
            return per_item.mean()
        loss = per_item.sum() / num_items_in_batch
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            # DDP averages gradients over processes, but the count already spans all of them.
            loss = loss * self.accelerator.num_processes
        return loss
