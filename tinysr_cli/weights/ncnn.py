"""Read ncnn ``.param`` / ``.bin`` pairs into PyTorch state dicts that spandrel recognises.

Only what the two peer models need is understood: the graph text is parsed, every layer type
is checked against an allow-list, and the weights of each ``Convolution`` (a 4-byte tag, then
fp16 or fp32 OIHW data) and ``MemoryData`` (raw fp32) are read in layer order. The biases are
raw fp32 without a tag. Anything else (another tag, a size that does not add up, bytes left
over) raises :class:`NcnnError` naming the file.

Two converters turn the convolution list into a spandrel state dict:

* :func:`rrdbnet_state_dict` - Real-ESRGAN's RRDBNet, keys as in its own state dict;
* :func:`span_state_dict` - SPAN's reparameterised eval graph, each folded 3x3 conv placed in a
  ``Conv3XC`` so that spandrel's eval-time re-fold reproduces it exactly.

Nothing here imports ncnn; the ncnn runtime is only a test oracle.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tinysr_cli.errors import WeightsError

MAGIC = 7767517
TAG_FP16 = 0x01306B47
TAG_FP32 = 0
_ARRAY_KEY_BASE = -23300


class NcnnError(WeightsError):
    """An ncnn model file is malformed or is not the network we expect."""


@dataclass(frozen=True)
class Layer:
    """One line of a ``.param`` file."""

    type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: dict[int, int | float | tuple[float, ...]] = field(default_factory=dict)

    def param(self, key: int, default: int | float = 0) -> int | float:
        value = self.params.get(key, default)
        if isinstance(value, tuple):
            raise ValueError(f"param {key} of {self.name} is an array")
        return value


@dataclass(frozen=True)
class Conv:
    """One convolution's weights as read from the ``.bin`` (weight OIHW fp32, bias fp32)."""

    name: str
    weight: torch.Tensor
    bias: torch.Tensor
    activation: int  # ncnn activation_type: 0 none, 2 leaky ReLU
    activation_params: tuple[float, ...]


@dataclass(frozen=True)
class NcnnModel:
    """A parsed ncnn model: its layers, convolutions in file order, and MemoryData blobs."""

    param_path: Path
    bin_path: Path
    layers: tuple[Layer, ...]
    convs: tuple[Conv, ...]
    memory: dict[str, torch.Tensor]


def _number(text: str) -> int | float:
    if any(ch in text for ch in ".eE") and not text.lstrip("-").isdigit():
        return float(text)
    return int(text)


def parse_param(path: Path) -> tuple[Layer, ...]:
    """The layers of a text ``.param`` file."""
    try:
        lines = path.read_text(encoding="ascii").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise NcnnError(f"{path}: cannot read the ncnn .param file ({exc})") from None
    lines = [line for line in lines if line.strip()]
    if len(lines) < 2 or lines[0].strip() != str(MAGIC):
        raise NcnnError(f"{path}: not a text ncnn .param file (no magic {MAGIC})")
    try:
        layer_count, _blob_count = (int(v) for v in lines[1].split())
    except ValueError:
        raise NcnnError(f"{path}: bad layer/blob count line {lines[1]!r}") from None
    layers = []
    for number, line in enumerate(lines[2:], start=3):
        parts = line.split()
        try:
            n_in, n_out = int(parts[2]), int(parts[3])
            inputs = tuple(parts[4 : 4 + n_in])
            outputs = tuple(parts[4 + n_in : 4 + n_in + n_out])
            if len(outputs) != n_out:
                raise ValueError("too few blob names")
            params: dict[int, int | float | tuple[float, ...]] = {}
            for item in parts[4 + n_in + n_out :]:
                key_text, value_text = item.split("=", 1)
                key = int(key_text)
                if key <= _ARRAY_KEY_BASE:
                    values = value_text.split(",")
                    params[_ARRAY_KEY_BASE - key] = tuple(float(v) for v in values[1 : 1 + int(values[0])])
                else:
                    params[key] = _number(value_text)
        except (IndexError, ValueError) as exc:
            raise NcnnError(f"{path}:{number}: cannot parse layer line ({exc})") from None
        layers.append(Layer(parts[0], parts[1], inputs, outputs, params))
    if len(layers) != layer_count:
        raise NcnnError(f"{path}: header says {layer_count} layers, found {len(layers)}")
    return tuple(layers)


class _Reader:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.data = path.read_bytes()
        except OSError as exc:
            raise NcnnError(f"{path}: cannot read the ncnn .bin file ({exc})") from None
        self.pos = 0

    def take(self, size: int, what: str) -> bytes:
        if self.pos + size > len(self.data):
            raise NcnnError(
                f"{self.path}: truncated or does not match its .param: {what} needs {size} bytes at offset {self.pos}, "
                f"the file has {len(self.data)}"
            )
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def raw_fp32(self, count: int, what: str) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(self.take(4 * count, what), dtype="<f4").astype(np.float32))

    def tagged(self, count: int, what: str) -> torch.Tensor:
        (tag,) = struct.unpack("<I", self.take(4, f"{what} tag"))
        if tag == TAG_FP16:
            size = 2 * count
            raw = self.take(size + (-size % 4), what)[:size]
            return torch.from_numpy(np.frombuffer(raw, dtype="<f2").astype(np.float32))
        if tag == TAG_FP32:
            return self.raw_fp32(count, what)
        raise NcnnError(
            f"{self.path}: {what} has storage tag 0x{tag:08X} at offset {self.pos - 4}; only fp16 (0x{TAG_FP16:08X}) "
            "and fp32 (0) are supported (is the .bin quantised, or not the one its .param describes?)"
        )


def read_ncnn(param_path: str | Path, bin_path: str | Path, allowed_types: frozenset[str]) -> NcnnModel:
    """Parse a ``.param``/``.bin`` pair; every layer type must be in ``allowed_types``."""
    param_path, bin_path = Path(param_path), Path(bin_path)
    layers = parse_param(param_path)
    reader = _Reader(bin_path)
    convs: list[Conv] = []
    memory: dict[str, torch.Tensor] = {}
    for layer in layers:
        if layer.type not in allowed_types:
            raise NcnnError(f"{param_path}: unexpected layer type {layer.type!r} ({layer.name}); expected only {', '.join(sorted(allowed_types))}")
        if layer.type == "Convolution":
            convs.append(_read_conv(param_path, layer, reader))
        elif layer.type == "MemoryData":
            w, h, c = (int(layer.param(k)) for k in (0, 1, 2))
            count = max(w, 1) * max(h, 1) * max(c, 1)
            memory[layer.name] = reader.raw_fp32(count, f"MemoryData {layer.name}")
    if reader.pos != len(reader.data):
        raise NcnnError(
            f"{bin_path}: {len(reader.data) - reader.pos} bytes left over after the weights its .param describes "
            "(the .param and .bin do not belong together)"
        )
    return NcnnModel(param_path, bin_path, layers, tuple(convs), memory)


def _read_conv(path: Path, layer: Layer, reader: _Reader) -> Conv:
    try:
        out_ch = int(layer.param(0))
        kw = int(layer.param(1))
        kh = int(layer.param(11, kw))
        dilation, stride = int(layer.param(2, 1)), int(layer.param(3, 1))
        pad = int(layer.param(4, 0))
        bias_term, weight_size = int(layer.param(5)), int(layer.param(6))
        int8 = int(layer.param(8, 0))
        activation = int(layer.param(9, 0))
    except ValueError as exc:
        raise NcnnError(f"{path}: {exc}") from None
    act_params = layer.params.get(10, ())
    act_params = act_params if isinstance(act_params, tuple) else (float(act_params),)
    if kw != kh or kw not in (1, 3) or dilation != 1 or stride != 1 or pad != kw // 2 or bias_term != 1 or int8:
        raise NcnnError(f"{path}: convolution {layer.name} has an unsupported shape or option (kernel {kw}x{kh}, stride {stride}, pad {pad}, bias {bias_term}, int8 {int8})")
    if out_ch <= 0 or weight_size % (out_ch * kw * kh):
        raise NcnnError(f"{path}: convolution {layer.name}: weight size {weight_size} is not a multiple of {out_ch}x{kw}x{kh}")
    in_ch = weight_size // (out_ch * kw * kh)
    weight = reader.tagged(weight_size, f"weights of {layer.name}").reshape(out_ch, in_ch, kh, kw)
    bias = reader.raw_fp32(out_ch, f"bias of {layer.name}")
    return Conv(layer.name, weight, bias, activation, tuple(float(v) for v in act_params))


# --- Real-ESRGAN RRDBNet --------------------------------------------------------------------

RRDB_TYPES = frozenset({"Input", "Convolution", "Split", "Concat", "Eltwise", "BinaryOp", "Interp"})


def rrdbnet_keys(num_block: int) -> list[tuple[str, bool]]:
    """Real-ESRGAN's conv names in state-dict order, each with whether a LeakyReLU(0.2) follows."""
    keys = [("conv_first", False)]
    for block in range(num_block):
        for rdb in (1, 2, 3):
            keys += [(f"body.{block}.rdb{rdb}.conv{i}", i < 5) for i in range(1, 6)]
    keys += [("conv_body", False), ("conv_up1", True), ("conv_up2", True), ("conv_hr", True), ("conv_last", False)]
    return keys


def rrdbnet_state_dict(model: NcnnModel, num_feat: int = 64, num_grow: int = 32) -> dict[str, torch.Tensor]:
    """Real-ESRGAN x4 RRDBNet state dict (``conv_first``, ``body.N.rdbM.convK``, ...) from its ncnn export."""
    convs = model.convs
    if (len(convs) - 6) % 15 or len(convs) < 21:
        raise NcnnError(f"{model.param_path}: {len(convs)} convolutions is not an RRDBNet (6 + 15 per block)")
    interps = [layer for layer in model.layers if layer.type == "Interp"]
    if len(interps) != 2 or any(int(i.param(0)) != 1 or float(i.param(1)) != 2.0 or float(i.param(2)) != 2.0 for i in interps):
        raise NcnnError(f"{model.param_path}: expected two nearest x2 Interp layers (a 4x RRDBNet)")
    keys = rrdbnet_keys((len(convs) - 6) // 15)
    state: dict[str, torch.Tensor] = {}
    for (key, leaky), conv in zip(keys, convs):
        expected_out = num_grow if key.endswith(("conv1", "conv2", "conv3", "conv4")) and key.startswith("body") else num_feat
        if key == "conv_last":
            expected_out = 3
        if conv.weight.shape[0] != expected_out or conv.weight.shape[2] != 3:
            raise NcnnError(f"{model.param_path}: {conv.name} has shape {tuple(conv.weight.shape)}, expected {expected_out} 3x3 filters for {key}")
        has_leaky = conv.activation == 2 and conv.activation_params == (0.2,)
        if has_leaky != leaky or (not leaky and conv.activation != 0):
            raise NcnnError(f"{model.param_path}: {conv.name} activation {conv.activation} {conv.activation_params} does not fit {key} of RRDBNet")
        state[f"{key}.weight"], state[f"{key}.bias"] = conv.weight, conv.bias
    return state


# --- SPAN -----------------------------------------------------------------------------------

SPAN_TYPES = frozenset({"Input", "MemoryData", "BinaryOp", "Convolution", "Split", "Swish", "Sigmoid", "Concat", "PixelShuffle"})
SPAN_MEAN = (0.4488, 0.4371, 0.4040)
SPAN_RANGE = 255.0


def span_keys() -> list[str]:
    """SPAN's Conv3XC / conv names in the order of its eval graph."""
    keys = ["conv_1"]
    for block in range(1, 7):
        keys += [f"block_{block}.c{i}_r" for i in (1, 2, 3)]
    return [*keys, "conv_2", "conv_cat", "upsampler.0"]


def _conv3xc(prefix: str, weight: torch.Tensor, bias: torch.Tensor, gain: int = 2) -> dict[str, torch.Tensor]:
    """A ``Conv3XC``'s parameters whose eval-time fold equals ``weight``/``bias`` exactly.

    The 1x1 expand and squeeze convs select the first ``c_in`` / ``c_out`` channels (identity
    blocks, zeros elsewhere), the inner 3x3 holds the folded kernel and the skip 1x1 is zero, so
    spandrel's ``update_params`` only multiplies by one and adds zeros.
    """
    c_out, c_in = weight.shape[:2]
    expand = torch.zeros(c_in * gain, c_in, 1, 1)
    expand[:c_in, :, 0, 0] = torch.eye(c_in)
    inner = torch.zeros(c_out * gain, c_in * gain, 3, 3)
    inner[:c_out, :c_in] = weight
    squeeze = torch.zeros(c_out, c_out * gain, 1, 1)
    squeeze[:, :c_out, 0, 0] = torch.eye(c_out)
    return {
        f"{prefix}.sk.weight": torch.zeros(c_out, c_in, 1, 1),
        f"{prefix}.sk.bias": torch.zeros(c_out),
        f"{prefix}.conv.0.weight": expand,
        f"{prefix}.conv.0.bias": torch.zeros(c_in * gain),
        f"{prefix}.conv.1.weight": inner,
        f"{prefix}.conv.1.bias": torch.zeros(c_out * gain),
        f"{prefix}.conv.2.weight": squeeze,
        f"{prefix}.conv.2.bias": bias.clone(),
        f"{prefix}.eval_conv.weight": weight.clone(),
        f"{prefix}.eval_conv.bias": bias.clone(),
    }


def span_state_dict(model: NcnnModel) -> dict[str, torch.Tensor]:
    """A spandrel SPAN state dict computing the same function as SPAN's reparameterised ncnn export."""
    keys = span_keys()
    if len(model.convs) != len(keys):
        raise NcnnError(f"{model.param_path}: {len(model.convs)} convolutions, a SPAN export has {len(keys)}")
    if len(model.memory) != 1:
        raise NcnnError(f"{model.param_path}: expected one MemoryData (the RGB mean), found {len(model.memory)}")
    mean = next(iter(model.memory.values()))
    if mean.numel() != 3 or not torch.allclose(mean, torch.tensor(SPAN_MEAN), atol=1e-6):
        raise NcnnError(f"{model.param_path}: input mean {mean.tolist()} is not SPAN's {list(SPAN_MEAN)} (spandrel assumes it)")
    scales = [layer.param(2) for layer in model.layers if layer.type == "BinaryOp" and layer.name == "/Mul"]
    if scales != [SPAN_RANGE]:
        raise NcnnError(f"{model.param_path}: input scale {scales} is not SPAN's {SPAN_RANGE} (spandrel assumes it)")
    shuffle = [layer for layer in model.layers if layer.type == "PixelShuffle"]
    if len(shuffle) != 1:
        raise NcnnError(f"{model.param_path}: expected one PixelShuffle layer")
    state: dict[str, torch.Tensor] = {}
    for key, conv in zip(keys, model.convs):
        kernel = conv.weight.shape[2]
        if conv.activation != 0 or kernel != (1 if key == "conv_cat" else 3):
            raise NcnnError(f"{model.param_path}: {conv.name} (kernel {kernel}, activation {conv.activation}) does not fit SPAN's {key}")
        if key in ("conv_cat", "upsampler.0"):
            state[f"{key}.weight"], state[f"{key}.bias"] = conv.weight, conv.bias
        else:
            state.update(_conv3xc(key, conv.weight, conv.bias))
    return state
