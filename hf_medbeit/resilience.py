"""Surviving faults: kills, interrupts, full disks.

* ``last_complete_checkpoint``: a run killed while saving leaves a checkpoint folder without its
  ``trainer_state.json`` (Trainer writes that file last); resuming from it would fail or, worse,
  mix states. Only complete checkpoints count.
* ``StopOnSignal``: Ctrl-C (SIGINT) or SIGTERM (pre-emption) ends training at the next step with a
  checkpoint saved, instead of losing everything since the last one.
* ``check_output_dir``: an unwritable folder or a disk too small for the checkpoints is found
  before training starts.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import uuid

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import sort_checkpoints

from .errors import UserError

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
# check_output_dir's probe file: removed at once, left behind only by a crash in between.
WRITE_PROBE_PREFIX = ".write-test-"
# Errors that mean "the disk cannot take this write", as opposed to a bug.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR}


def is_complete_checkpoint(folder: str) -> bool:
    try:
        with open(os.path.join(folder, TRAINER_STATE)) as handle:
            json.load(handle)
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(output_dir: str, remove_incomplete: bool = False) -> str | None:
    """The newest checkpoint whose save finished; optionally delete the unfinished ones after it."""
    last = None
    # Trainer's own ordering (by step), the one it rotates checkpoints with.
    for folder in sort_checkpoints(output_dir) if os.path.isdir(output_dir) else []:
        if is_complete_checkpoint(folder):
            last = folder
        elif remove_incomplete:
            logger.warning("Removing %s: its save was interrupted (no %s)", folder, TRAINER_STATE)
            shutil.rmtree(folder, ignore_errors=True)
    return last


class StopOnSignal(TrainerCallback):
    """On SIGINT or SIGTERM: save a checkpoint at the end of the current step and stop training.

    A second signal to the same process falls through to the default behaviour (a second Ctrl-C
    kills at once).

    Under ``accelerate launch`` with several processes, a launcher may deliver the signal to one
    process, or to each at a slightly different moment. A process that stopped alone would leave
    the others waiting forever in the next collective (gradient all-reduce, checkpoint barrier). So
    the processes agree at every step end: each stops for the highest signal any of them got
    (one all-reduce of one integer per step, on the host where possible; none in a single
    process).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None  # the first signal this process got
        self.agreed: int | None = None  # the signal every process stops for
        self._previous = {}
        self._channel_choice = None

    def install(self) -> "StopOnSignal":
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.received is not None:
            self.uninstall()
            signal.raise_signal(signum)
            return
        self.received = signum
        logger.warning("Received %s: saving a checkpoint after this step, then stopping", signal.Signals(signum).name)

    def agree(self, args) -> int | None:
        """The signal all processes stop for, or None. Every process must call this at the same
        point (a step end, or after training), since it is a collective in multi-process runs."""
        signum = self.received or 0
        if args.world_size > 1:
            group, device = self._channel(args)
            flag = torch.tensor([signum], dtype=torch.int64, device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
            signum = int(flag.item())
            if signum and self.received is None:
                logger.warning("Another process received %s: saving a checkpoint after this step, then stopping",
                               signal.Signals(signum).name)
        self.agreed = signum or None
        return self.agreed

    def _channel(self, args) -> tuple:
        """(process group, device) for the per-step flag, chosen once, the same in every process.

        On the host where possible, so that the check never waits for the GPU: the world group
        when it is gloo already (CPU runs); on one machine with NCCL, a gloo group beside it
        (loopback, always reachable). Across machines, gloo might pick a network interface that
        NCCL was told to avoid, so the flag goes through the world group on the training device,
        at the price of one host-device sync per step."""
        if self._channel_choice is None:
            distributed = torch.distributed
            single_machine = os.environ.get("LOCAL_WORLD_SIZE") == str(args.world_size)
            if distributed.get_backend() == "gloo":
                self._channel_choice = (distributed.group.WORLD, torch.device("cpu"))
            elif single_machine:
                self._channel_choice = (distributed.new_group(backend="gloo"), torch.device("cpu"))
            else:
                self._channel_choice = (distributed.group.WORLD, args.device)
        return self._channel_choice

    def on_step_end(self, args, state, control, **kwargs):
        if self.agree(args) is not None:
            control.should_save = True
            control.should_training_stop = True
            # Interrupted runs keep their checkpoints; the last one is what a resume needs.
            control.should_evaluate = False
        return control

    @property
    def exit_code(self) -> int:
        signum = self.agreed or self.received
        return 128 + int(signum) if signum else 0


def _bytes_per_checkpoint(model: torch.nn.Module) -> int:
    """Weights of the whole model plus two AdamW moments per trainable parameter."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    moments = sum(2 * p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return weights + moments


def check_output_dir(output_dir: str, model: torch.nn.Module, save_total_limit: int | None) -> None:
    """Fail before training if ``output_dir`` cannot be written or the disk cannot hold the run."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f"{WRITE_PROBE_PREFIX}{uuid.uuid4().hex}")
        with open(probe, "wb") as handle:
            handle.write(b"\0" * 4096)
        os.remove(probe)
    except OSError as error:
        raise UserError(f"cannot write to --output_dir {output_dir} ({error.strerror or error}); choose a writable folder") from error
    # Checkpoints kept (save_total_limit, +1 for the best one that Trainer also keeps, +1 being
    # written before the oldest is deleted), plus the final model. Without a limit, assume 5.
    kept = (save_total_limit or 5) + 2
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    needed = _bytes_per_checkpoint(model) * kept + weights
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise UserError(
            f"{output_dir} has {free / 2**30:.2f} GiB free but this run needs about {needed / 2**30:.2f} GiB "
            f"for {kept} checkpoints and the model; free space, lower --save_total_limit or choose another --output_dir"
        )


def is_write_failure(error: BaseException) -> bool:
    """A full disk or a refused write, however the writer reports it: Python raises OSError, the
    safetensors writer a SafetensorError, torch.save a RuntimeError from its zip writer."""
    if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
        return True
    text = str(error)
    return any(marker in text for marker in (
        "No space left on device", "os error 28", "Disk quota exceeded", "PytorchStreamWriter failed", "inline_container",
    ))


def write_failure(error: BaseException, output_dir: str) -> UserError:
    """A one-line error for a write that failed mid-run, naming the checkpoint to resume from."""
    last = last_complete_checkpoint(output_dir)
    resume = f"the last good checkpoint is {last}; " if last else "no checkpoint was completed; "
    reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
    return UserError(
        f"could not write to {output_dir} ({reason}); {resume}free space or fix permissions, "
        "then run the same command again to resume"
    )


class TrainingInterrupted(UserError):
    """Ctrl-C or SIGTERM: a checkpoint was saved and the run can resume."""

    label = "stopped"

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def train_or_stop(trainer, resume_from_checkpoint: str | None = None):
    """``trainer.train`` as every recipe runs it: a signal saves a checkpoint and raises
    ``TrainingInterrupted`` (the same command resumes); a failed write names the checkpoint to
    resume from. ``trainer`` must have been built with a ``StopOnSignal`` among its callbacks."""
    args = trainer.args
    stop_on_signal = next(callback for callback in trainer.callback_handler.callbacks if isinstance(callback, StopOnSignal))
    stop_on_signal.install()
    try:
        train_result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    except Exception as error:
        if is_write_failure(error):
            raise write_failure(error, args.output_dir) from error
        raise
    finally:
        stop_on_signal.uninstall()
    # All processes decide together (a signal may have come after the last step end on one only).
    if stop_on_signal.agree(args) is not None:
        trainer.accelerator.wait_for_everyone()  # no process exits while another still saves
        raise TrainingInterrupted(
            f"interrupted at step {trainer.state.global_step}; checkpoint saved in "
            f"{last_complete_checkpoint(args.output_dir)}: run the same command again to resume",
            exit_code=stop_on_signal.exit_code,
        )
    return train_result
