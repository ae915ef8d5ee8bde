"""Device and precision policy: CUDA fp16 by default, fp32 on the CPU, never fp16 on the CPU."""

from __future__ import annotations

import torch

from tinysr_cli.errors import TinySRError

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; explicit names are checked with a clear message."""
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TinySRError(f"unknown device {name!r}", hint="use auto, cpu, cuda, cuda:N or mps", option="device") from None
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise TinySRError(
                "this PyTorch build has no CUDA support",
                hint="install a CUDA build of torch (see pytorch.org) or use {opt:device} cpu",
                option="device",
            )
        if not torch.cuda.is_available():
            raise TinySRError(
                "no CUDA device is visible", hint="check the driver and CUDA_VISIBLE_DEVICES, or use {opt:device} cpu", option="device"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TinySRError(f"{name}: only {torch.cuda.device_count()} CUDA device(s) are visible", option="device")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise TinySRError("MPS is not available on this machine", hint="use {opt:device} cpu", option="device")
    elif device.type not in {"cpu", "cuda", "mps"}:
        raise TinySRError(f"unsupported device {name!r}", hint="use auto, cpu, cuda, cuda:N or mps", option="device")
    return device


def resolve_devices(names: str) -> list[torch.device]:
    """``cuda:0,1`` (or ``cuda:0,cuda:1``) -> one checked device per entry; a single name gives one.

    Only CUDA devices may be listed together, each once. The CLI does not spread files across
    several devices yet: this is the parsing and checking such a mode needs.
    """
    entries = [entry.strip() for entry in names.split(",")]
    if len(entries) == 1:
        return [resolve_device(entries[0])]
    if not entries[0].lower().startswith("cuda") or any(not entry for entry in entries):
        raise TinySRError(f"cannot list devices {names!r}", hint="several devices are written cuda:0,1")
    names_checked = []
    for entry in entries:
        name = entry if entry.lower().startswith("cuda") else f"cuda:{entry}"
        if not name.lower().removeprefix("cuda:").isdigit():
            raise TinySRError(f"cannot list devices {names!r}: {entry!r} is not a CUDA device index", hint="several devices are written cuda:0,1")
        names_checked.append(name)
    devices = [resolve_device(name) for name in names_checked]
    if len(set(devices)) != len(devices):
        raise TinySRError(f"{names}: a device is listed twice")
    return devices


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is fp16 on CUDA/MPS and fp32 on the CPU; fp16 on the CPU is refused."""
    name = name.strip().lower()
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if name not in PRECISIONS:
        raise TinySRError(f"unknown precision {name!r}", hint="use auto, fp32, fp16 or bf16", option="precision")
    if name == "fp16" and device.type == "cpu":
        raise TinySRError(
            "fp16 is not supported on the CPU (slow and inaccurate there)", hint="use {opt:precision} bf16 or fp32", option="precision"
        )
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TinySRError("this GPU does not support bf16", hint="use {opt:precision} fp16 or fp32", option="precision")
    return PRECISIONS[name]
