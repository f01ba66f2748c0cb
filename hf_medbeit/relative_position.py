"""BEiT's relative position bias without the per-call work that changes nothing.

transformers' ``BeitRelativePositionBias.forward`` (checked against 5.24), called once per layer
per forward pass, or once per pass for BEiT-large's shared bias:

* resizes the bias table bilinearly to the input's window even when that window is the table's
  own, then concatenates the three cls entries back on: four extra kernels forward, three backward;
* gathers the table with a position index built and ``lru_cache``-d on the CPU, so on a GPU every
  call copies a 197x197 int64 index from pageable host memory, and CUDA synchronises the stream
  before such a copy: the host stops queueing work once per layer;
* with ``interpolate_pos_encoding=True``, resizes the (heads, N, N) bias to (N, N), its own size.

A bilinear resize to the same size (``align_corners=False``) maps every output pixel to its own
input pixel with weights 1 and 0, so it returns its input and passes the gradient back unchanged,
bit for bit, for any finite values (checked for float64/32/16 and bfloat16 in the tests). At the
table's native window this module therefore gathers the table directly with an index cached on the
table's device: same values, same gradients, fewer kernels and no host copy. Any other window
(another input resolution) runs transformers' own code unchanged.

``use_fast_relative_position_bias(model)`` changes only the bias modules of that one model, by
swapping their class for a subclass (no class of transformers is patched, so other models in the
process are untouched); ``restore_relative_position_bias`` undoes it. The index is a plain
attribute, not a buffer: ``state_dict``, checkpoints and DDP buffer broadcasts are unchanged. If a
future transformers changes the module (other attributes, or outputs that differ from the fast
path on a random probe table), the model is left as it is and a warning says so.
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

try:  # transformers is a dependency; guarded only so that a renamed module degrades to a warning
    from transformers.models.beit.modeling_beit import BeitRelativePositionBias
except ImportError:  # pragma: no cover - depends on the installed transformers
    BeitRelativePositionBias = None

_INDEX_ATTRIBUTE = "_hf_medbeit_relative_position_index"
_EXPECTED_PARAMETERS = ["self", "window_size", "interpolate_pos_encoding", "dim_size"]


def _same_size_resize_is_identity(dtype: torch.dtype, device_type: str) -> bool:
    """Skipping the same-size resize keeps the dtype as well as the values, unless autocast could
    run the resize in another precision than the table's (a bfloat16/float16 table under autocast,
    if the resize were on autocast's float32 list). float32/float64 tables are never recast."""
    return dtype in (torch.float32, torch.float64) or not torch.is_autocast_enabled(device_type)


if BeitRelativePositionBias is not None:

    class FastBeitRelativePositionBias(BeitRelativePositionBias):
        """``BeitRelativePositionBias`` with the same outputs and gradients, bit for bit; see the
        module docstring. Instances are made by ``use_fast_relative_position_bias``."""

        def _device_index(self, device: torch.device) -> torch.Tensor:
            index = getattr(self, _INDEX_ATTRIBUTE)
            if index.device != device:  # the model moved (e.g. Trainer's .to("cuda")): copy once
                index = self.generate_relative_position_index(self.window_size).to(device)
                setattr(self, _INDEX_ATTRIBUTE, index)
            return index

        def forward(self, window_size, interpolate_pos_encoding: bool = False, dim_size=None) -> torch.Tensor:
            table = self.relative_position_bias_table
            if (tuple(window_size) != tuple(self.window_size)
                    or not _same_size_resize_is_identity(table.dtype, table.device.type)):
                return super().forward(window_size, interpolate_pos_encoding, dim_size)
            tokens = window_size[0] * window_size[1] + 1
            index = self._device_index(table.device)
            bias = table[index.view(-1)].view(tokens, tokens, -1).permute(2, 0, 1).contiguous()
            if interpolate_pos_encoding and dim_size != tokens:  # never in BeitModel; kept as upstream does it
                bias = nn.functional.interpolate(
                    bias.unsqueeze(1), size=(dim_size, dim_size), mode="bilinear", align_corners=False
                ).squeeze(1)
            return bias.unsqueeze(0)


def _unexpected(module: nn.Module) -> str | None:
    """Why ``module`` is not the ``BeitRelativePositionBias`` this fast path was written for, or None."""
    window = getattr(module, "window_size", None)
    table = getattr(module, "relative_position_bias_table", None)
    if not (isinstance(window, tuple) and len(window) == 2 and all(isinstance(side, int) for side in window)):
        return f"window_size is {window!r}, not a pair of ints"
    if not isinstance(table, nn.Parameter) or table.dim() != 2:
        return "relative_position_bias_table is not a 2-D parameter"
    if table.shape[0] != (2 * window[0] - 1) * (2 * window[1] - 1) + 3:
        return f"relative_position_bias_table has {table.shape[0]} rows for window {window}"
    if table.is_meta:
        return "relative_position_bias_table is on the meta device"
    if not callable(getattr(module, "generate_relative_position_index", None)):
        return "generate_relative_position_index is missing"
    if list(inspect.signature(type(module).forward).parameters) != _EXPECTED_PARAMETERS:
        return f"forward's signature is {inspect.signature(type(module).forward)}"
    return None


def _differs_on_a_probe(module: nn.Module) -> str | None:
    """Run transformers' forward and the fast one on a random table (a fresh model's table is all
    zeros, which would hide a changed index layout); None if they agree exactly."""
    table = module.relative_position_bias_table
    generator = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(table.shape, generator=generator).to(device=table.device, dtype=table.dtype)
    tokens = module.window_size[0] * module.window_size[1] + 1
    try:
        with torch.no_grad():
            for interpolate in (False, True):
                args = (module.window_size, interpolate, tokens)
                upstream = torch.func.functional_call(module, {"relative_position_bias_table": probe}, args)
                module.__class__ = FastBeitRelativePositionBias
                try:
                    fast = torch.func.functional_call(module, {"relative_position_bias_table": probe}, args)
                finally:
                    module.__class__ = BeitRelativePositionBias
                if upstream.dtype != fast.dtype or not torch.equal(upstream, fast):
                    return f"its output differs from the fast path's (interpolate_pos_encoding={interpolate})"
    except Exception as error:  # any failure means the module is not what this code expects
        return f"the fast path failed on it ({type(error).__name__}: {error})"
    return None


def use_fast_relative_position_bias(model: nn.Module) -> int:
    """Give a BEiT model's relative position bias modules the fast forward; return how many.

    Only modules whose class is exactly transformers' ``BeitRelativePositionBias`` are changed
    (BEiT's per-layer biases, or BEiT-large's shared one); any other model is returned untouched
    (0). If one of them is not what this code was written for, none is changed and a warning is
    logged: the model then runs transformers' code as it is."""
    if BeitRelativePositionBias is None or getattr(getattr(model, "config", None), "model_type", None) != "beit":
        return 0
    modules = [module for module in model.modules() if type(module) is BeitRelativePositionBias]
    for module in modules:
        reason = _unexpected(module)
        if reason is None:
            table = module.relative_position_bias_table
            index = module.generate_relative_position_index(module.window_size).to(table.device)
            setattr(module, _INDEX_ATTRIBUTE, index)
            reason = _differs_on_a_probe(module)
        if reason:
            for touched in modules:  # leave no attribute behind on any of them
                touched.__dict__.pop(_INDEX_ATTRIBUTE, None)
            logger.warning("Fast relative position bias not used: transformers' BeitRelativePositionBias is not "
                           "what hf_medbeit expects (%s); the model runs unchanged, only slower", reason)
            return 0
    for module in modules:
        module.__class__ = FastBeitRelativePositionBias
    if modules:
        logger.info("Fast relative position bias on %d BEiT module(s): same outputs and gradients", len(modules))
    return len(modules)


def restore_relative_position_bias(model: nn.Module) -> int:
    """Undo ``use_fast_relative_position_bias``: transformers' own forward again; return how many."""
    restored = 0
    for module in model.modules():
        if BeitRelativePositionBias is not None and type(module) is FastBeitRelativePositionBias:
            module.__class__ = BeitRelativePositionBias
            delattr(module, _INDEX_ATTRIBUTE)
            restored += 1
    return restored
