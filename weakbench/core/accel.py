"""Device settings of a trial: mixed precision, memory layout, cuDNN autotuning.

Three trial options (``weakbench sweep --precision / --memory-format``, :class:`~weakbench.platform.engine.TrialSpec`):

* ``precision``: ``"auto"`` (default) runs the forward passes of a fit stage whose task allows it
  (``FitTask.mixed_precision``: the classifier → CAM methods) and of their evaluation under
  ``torch.autocast(dtype=torch.bfloat16)`` on a CUDA device that supports bf16
  (``torch.cuda.is_bf16_supported()``: Ampere and later), float32 everywhere else; ``"bf16"``
  asks for it on any device (CPU included); ``"fp32"`` never. bf16 keeps float32's exponent
  range, so no loss scaling is needed. Autocast computes the numerically sensitive ops
  (softmax, log-softmax, the BCE and cross-entropy losses, norms, sums) in float32 by itself,
  and the classifier methods' loss functions cast their inputs to float32 before the paper's
  equation (:func:`weakbench.methods.cam.classification_loss`, MinMaxCAM's ``crr_loss`` /
  ``frr_loss``, Puzzle-CAM's ``reconstruction_loss``, Top-GAP's ``l1_sparsity``). On the CPU the
  default stays float32 because CPU results must not change with the defaults (bf16 rounds
  activations), whether or not bf16 is faster on a given CPU (measured with
  ``benchmarks/throughput.py``, figures in ``benchmarks/README.md``); pass ``--precision bf16``
  to use it on the CPU.
* ``memory_format``: ``"auto"`` (default) puts the model in ``torch.channels_last`` on a CUDA
  device (tensor cores read NHWC without transposes), contiguous on the CPU; or
  ``"channels_last"`` / ``"contiguous"``.
* ``torch.backends.cudnn.benchmark`` is on for a CUDA fit stage whose batches all have one
  input size (``FitTask.fixed_input_size``), off otherwise (varying sizes would re-tune on every
  new shape).

Nothing here changes a CPU run with the defaults.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16"]
MemoryFormat = Literal["auto", "channels_last", "contiguous"]


def autocast_dtype(precision: Precision, device: torch.device | str, allowed: bool = True) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (``None``: float32, no autocast).

    Args:
        precision: ``"auto"`` (bf16 on a CUDA device with bf16 support), ``"bf16"`` or ``"fp32"``.
        device: the trial's device.
        allowed: the task allows mixed precision (``FitTask.mixed_precision``); False gives None.
    """
    dev = torch.device(device)
    if not allowed or precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def use_channels_last(memory_format: MemoryFormat, device: torch.device | str) -> bool:
    """Whether the model goes to ``torch.channels_last``: ``"auto"`` on a CUDA device only."""
    if memory_format == "auto":
        return torch.device(device).type == "cuda"
    return memory_format == "channels_last"


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """``torch.autocast`` on ``device``'s type with ``dtype``; a null context for ``dtype=None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
