"""Which device a run uses, and what follows from it: autocast's device type
and the distributed backend.

Rules (one place, so the engine, training and the CLI agree):
- ``resolve_device(None | "auto")``: ``cuda`` when a GPU is visible, else ``cpu``;
  under torchrun a CUDA run uses ``cuda:LOCAL_RANK``.
- Random draws stay on the CPU generators and are moved to the device, so a
  seed gives the same noise on every device (and resume stays exact).
- The process group's backend follows the device the ranks actually use:
  NCCL for CUDA tensors, gloo otherwise (NCCL cannot reduce CPU tensors).
"""
from __future__ import annotations

import contextlib
import os

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """The torch.device a run uses; raises ValueError for a device that is not there."""
    if isinstance(name, torch.device):
        dev = name
    else:
        name = (name or "auto").strip()
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise ValueError(f"device: unknown device {name!r}; expected one of {DEVICE_CHOICES} "
                             "or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {dev} was asked for but this torch build or machine has no CUDA GPU")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {dev} does not exist ({torch.cuda.device_count()} GPU(s) visible)")
    return dev


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a module's weights are (CPU for a module without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def autocast(device: torch.device, dtype: torch.dtype = torch.bfloat16, enabled: bool = True):
    """Autocast for ``device``'s type (a no-op context when disabled or on ``meta``)."""
    if not enabled or device.type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def dist_backend(device: torch.device) -> str:
    """The collective backend for ranks whose tensors live on ``device``."""
    return "nccl" if device.type == "cuda" else "gloo"
