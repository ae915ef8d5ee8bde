"""The single-file weights format: round trip and clear refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tinysr_cli.errors import WeightsError
from tinysr_cli.weights.format import init_weights, load_weights, read_info, save_weights


def test_round_trip_keeps_every_tensor_and_the_metadata(tmp_path):
    model = init_weights("tiny", seed=3)
    path = save_weights(model, tmp_path / "m.safetensors", color_fix="wavelet", provenance={"source": "test"})
    loaded, info = load_weights(path)
    assert info.config == model.config
    assert info.color_fix == "wavelet" and info.provenance == {"source": "test"} and info.dtype == torch.float32
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_same_seed_same_weights_and_fp16_storage(tmp_path):
    a = init_weights("tiny", seed=1).state_dict()
    b = init_weights("tiny", seed=1).state_dict()
    c = init_weights("tiny", seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    path = save_weights(init_weights("tiny", seed=1), tmp_path / "h.safetensors", dtype=torch.float16)
    assert read_info(path).dtype == torch.float16


def _rewrite(path, tensors=None, metadata=None):
    """Write the file again with some tensors or metadata changed."""
    with safe_open(path, framework="pt") as handle:
        meta = dict(handle.metadata())
    tensors = tensors if tensors is not None else load_file(path)
    save_file(tensors, path, metadata=metadata if metadata is not None else meta)


@pytest.fixture
def weights_file(tmp_path):
    return save_weights(init_weights("tiny", seed=0), tmp_path / "w.safetensors")


def test_missing_tensor_is_named(weights_file):
    tensors = load_file(weights_file)
    del tensors["transformer.blocks.1.mlp.fc2.bias"]
    _rewrite(weights_file, tensors=tensors)
    with pytest.raises(WeightsError, match=r"missing tensor 'transformer.blocks.1.mlp.fc2.bias'"):
        load_weights(weights_file)


def test_wrong_shape_is_named(weights_file):
    tensors = load_file(weights_file)
    tensors["vae.decoder.layers.0.pointwise.weight"] = torch.zeros(3, 3, 1, 1)
    _rewrite(weights_file, tensors=tensors)
    with pytest.raises(WeightsError, match=r"'vae.decoder.layers.0.pointwise.weight' has shape \(3, 3, 1, 1\)"):
        load_weights(weights_file)


def test_unexpected_tensor_is_named(weights_file):
    tensors = load_file(weights_file)
    tensors["transformer.extra"] = torch.zeros(1)
    _rewrite(weights_file, tensors=tensors)
    with pytest.raises(WeightsError, match="unexpected tensor 'transformer.extra'"):
        load_weights(weights_file)


def test_mixed_dtypes_are_refused(weights_file):
    tensors = load_file(weights_file)
    tensors["transformer.proj_out.bias"] = tensors["transformer.proj_out.bias"].half()
    _rewrite(weights_file, tensors=tensors)
    with pytest.raises(WeightsError, match="share one of fp32/fp16/bf16"):
        read_info(weights_file)


def test_foreign_safetensors_and_bad_metadata(tmp_path, weights_file):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(WeightsError, match="not a tinysr weights file"):
        read_info(foreign)
    with safe_open(weights_file, framework="pt") as handle:
        meta = dict(handle.metadata())
    meta["config"] = json.dumps({"transformer": {"bogus": 1}})
    _rewrite(weights_file, metadata=meta)
    with pytest.raises(WeightsError, match="malformed 'config' metadata"):
        read_info(weights_file)


def test_not_safetensors_and_pickles(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello world, not a header")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        read_info(junk)
    pickle = tmp_path / "model.pth"
    torch.save({"a": torch.zeros(1)}, pickle)
    with pytest.raises(WeightsError, match="pickled checkpoints are not loaded") as caught:
        read_info(pickle)
    assert "import-official" in caught.value.hint


def _with_config(tmp_path, edit) -> "Path":
    """The tiny weights with their config metadata edited by ``edit(dict)``."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from tinysr_cli.weights.format import init_weights, save_weights

    source = save_weights(init_weights("tiny", seed=0), tmp_path / "tiny.safetensors")
    with safe_open(source, framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    config = json.loads(metadata["config"])
    edit(config)
    metadata["config"] = json.dumps(config)
    path = tmp_path / "edited.safetensors"
    save_file(tensors, path, metadata=metadata)
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["transformer"].update(num_layers=10**7), "transformer.num_layers = 10000000, expected an integer from 1 to 256"),
        (lambda c: c["transformer"].update(num_layers=3), "transformer.num_layers = 3, the file holds 2 transformer blocks"),
        (lambda c: c["transformer"].update(num_heads=0), "transformer.num_heads = 0, expected an integer from 1 to 1024"),
        (lambda c: c["transformer"].update(num_heads=3), "transformer.hidden_size 64 is not divisible by transformer.num_heads 3"),
        (lambda c: c["transformer"].update(pos_grid=100000), "transformer.pos_grid = 100000, expected an integer from 1 to 1024"),
        (lambda c: c["transformer"].update(pos_grid=16), "the config implies transformer.pos_embed of shape (1, 256, 64)"),
        (lambda c: c["transformer"].update(hidden_size="64"), "transformer.hidden_size = '64', expected an integer"),
        (lambda c: c["vae"].update(encoder_blocks=[1, 1, 10**6, 1]), "vae.encoder_blocks = [1, 1, 1000000, 1], expected 1 to 8 integers"),
        (lambda c: c["vae"].update(scaling_factor=float("nan")), "vae.scaling_factor = nan, expected a positive number"),
        (lambda c: c["vae"].update(extra=1), "unknown key vae.extra"),
    ],
)
def test_config_values_are_validated_before_building(tmp_path, edit, message):
    from tinysr_cli.errors import WeightsError
    from tinysr_cli.weights.format import load_weights

    path = _with_config(tmp_path, edit)
    with pytest.raises(WeightsError) as raised:
        load_weights(path)
    assert str(raised.value).startswith(f"{path}: malformed 'config' metadata: {message}")
