"""Device and precision policy: CUDA fp16 by default, fp32 on the CPU, never fp16 on the CPU."""

from __future__ import annotations

from collections.abc import Sequence

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
            raise TinySRError(
                f"{{opt:device}} {name}: only {torch.cuda.device_count()} CUDA device(s) are visible", option="device"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise TinySRError("MPS is not available on this machine", hint="use {opt:device} cpu", option="device")
    elif device.type not in {"cpu", "cuda", "mps"}:
        raise TinySRError(f"unsupported device {name!r}", hint="use auto, cpu, cuda, cuda:N or mps", option="device")
    return device


def resolve_devices(names: str | Sequence[str]) -> list[torch.device]:
    """Several devices, each checked: ``cuda:0,1`` or ``cuda:0,cuda:1`` (the command line's form), or a
    list of names (the library's). A single name gives one device, as :func:`resolve_device`.

    Only CUDA devices are listed together in text, each once. A Python list may also repeat ``cpu``
    (``["cpu", "cpu"]``: two models on two threads), which the scheduler's tests use; the command line
    refuses it because two CPU models share the same cores and only double the memory.
    """
    if isinstance(names, str):
        text = names.strip()
        entries = [entry.strip().lower() for entry in text.split(",")]
        if len(entries) == 1:
            return [resolve_device(entries[0])]
        if any(not entry for entry in entries):
            raise TinySRError(f"{{opt:device}} {text}: an empty entry in the list", hint=_LIST_HINT, option="device")
        if any(entry.split(":")[0] in {"cpu", "mps", "auto"} for entry in entries):
            raise TinySRError(
                f"{{opt:device}} {text}: only CUDA GPUs can be listed together (one CPU model already uses every core)",
                hint=_LIST_HINT, option="device",
            )
        expanded = []
        for entry in entries:
            name = entry if entry.startswith("cuda") else f"cuda:{entry}"
            if not name.removeprefix("cuda:").isdigit():
                raise TinySRError(f"{{opt:device}} {text}: {entry!r} names no GPU index", hint=_LIST_HINT, option="device")
            expanded.append(name)
        repeat_cpu = False
    else:
        expanded = [str(name).strip().lower() for name in names]
        if not expanded:
            raise TinySRError("{opt:device}: the list of devices is empty", option="device")
        if len(expanded) == 1:
            return [resolve_device(expanded[0])]
        repeat_cpu = True
        text = ",".join(expanded)
    devices = [resolve_device(name) for name in expanded]
    if len({device.type for device in devices}) > 1:
        raise TinySRError(f"{{opt:device}} {text}: mixes device types; list GPUs only, or one CPU", option="device")
    if "auto" in expanded or devices[0].type not in {"cuda", "cpu"} or (devices[0].type == "cpu" and not repeat_cpu):
        raise TinySRError(f"{{opt:device}} {text}: only CUDA GPUs can be listed together", hint=_LIST_HINT, option="device")
    if devices[0].type == "cuda":
        devices = [torch.device("cuda", device.index if device.index is not None else 0) for device in devices]
        if len(set(devices)) != len(devices):
            twice = next(str(device) for device in devices if devices.count(device) > 1)
            raise TinySRError(f"{{opt:device}} {text}: {twice} is listed twice", hint=_LIST_HINT, option="device")
    return devices


_LIST_HINT = "several GPUs are written cuda:0,1 or cuda:0,cuda:1"


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
