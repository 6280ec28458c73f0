"""Which device a command runs on: the tool's choice, handed to the reference code as a torch.device."""

from __future__ import annotations

import os

import torch


def resolve_device(name: str) -> torch.device:
    # "auto", or a device this machine has: refused here, not by a traceback from the first tensor sent there.
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"`device` {name!r}: not a device ({str(e).splitlines()[0]})") from None
    count = {"cpu": 1, "cuda": torch.cuda.device_count(), "mps": int(torch.backends.mps.is_available())}
    if device.type not in count:
        raise ValueError(f"`device` {name}: unsupported device type {device.type!r} (cpu, cuda or mps)")
    kind, available = device.type.upper(), count[device.type]
    if (device.index or 0) >= available:
        why = f"only {available} {kind} device(s)" if available else f"{kind} is not available"
        raise ValueError(f"`device` {name}: {why} on this machine (use `device` cpu)")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # torchrun: one GPU per process
    return device
