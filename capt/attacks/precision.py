"""The precision guard of evaluation attacks: a robust accuracy is only reported for an attack that ran
in float32.

Why: an attack whose gradients are computed in fp16/bf16 is weaker (gradients underflow or are
quantised, the step signs turn noisy), so it overstates robustness; the method page lists "fp16
attacks at evaluation" among the reproduction traps of this family of papers. The guard refuses
rather than silently casting: a caller that wrapped evaluation in ``torch.autocast`` or halved the
model asked for something else than what the figure would claim, and should be told.
"""
from __future__ import annotations

import torch
from torch import nn

# Autocast is per device type; these are the ones torch.is_autocast_enabled(device_type) knows here.
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")


class PrecisionError(ValueError):
    """An evaluation attack was about to run outside float32 (a ValueError: the CLI prints it as a message)."""


def active_autocast(extra_device_types: tuple[str, ...] = ()) -> list[str]:
    """The device types on which autocast is enabled right now."""
    active = []
    for device_type in dict.fromkeys(_AUTOCAST_DEVICE_TYPES + extra_device_types):
        try:
            if torch.is_autocast_enabled(device_type):
                active.append(device_type)
        except (RuntimeError, ValueError):  # a device type this build of torch does not know
            continue
    return active


def require_fp32(module: nn.Module, *tensors: torch.Tensor, what: str = "the attacked model") -> None:
    """Raise :class:`PrecisionError` unless every floating parameter and buffer of ``module`` and every
    given tensor is float32 and no autocast region is active (on cpu, cuda or the tensors' devices)."""
    device_types = tuple(t.device.type for t in tensors)
    autocast = active_autocast(device_types)
    if autocast:
        raise PrecisionError(
            f"an evaluation attack must run in float32, but autocast is enabled on {', '.join(autocast)}: "
            "call it outside torch.autocast (a reduced-precision attack is weaker and overstates robustness)")
    for name, value in [*module.named_parameters(), *module.named_buffers()]:
        if value.is_floating_point() and value.dtype != torch.float32:
            raise PrecisionError(f"an evaluation attack must run in float32, but {what}'s {name} is {value.dtype}: "
                                 "evaluate the model in float32 (model.float())")
    for tensor in tensors:
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            raise PrecisionError(f"an evaluation attack must run on float32 images, got {tensor.dtype}")
