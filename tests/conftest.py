"""Shared fixtures: tiny random models and real photos from scikit-image's bundled data."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A tiny-config weights file with a fixed seed and well-conditioned weights (see ``condition``)."""
    from tinysr_cli.weights.format import init_weights, save_weights

    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_weights(condition(init_weights("tiny", seed=0), seed=0), path, provenance={"source": "test"})
    return path


@torch.no_grad()
def condition(model, seed: int = 0, image_std: float = 0.2):
    """Re-initialise every conv and linear layer of a TinySR so that its output depends on its input.

    PyTorch's default init shrinks activations layer after layer, so a default tiny VAE decodes
    nearly the same image whatever latent it gets, and a decoder fed the wrong latent goes unseen.
    Here each layer gets seeded N(0, 2 / fan_in) weights and N(0, 0.1) biases, then, in one forward
    pass over a real photo in data-flow order (encoder, backbone, decoder), is rescaled so that its
    output has unit variance (LSUV); the decoder's last conv is set to give each colour channel mean
    0.5 and standard deviation ``image_std`` in [0, 1], so images use the range without clipping.
    """
    from torch import nn

    generator = torch.Generator().manual_seed(seed)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for layer in layers:
        fan_in = layer.weight[0].numel()
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * 0.1)
    last = [m for m in model.vae.decoder.modules() if isinstance(m, nn.Conv2d)][-1]

    def rescale(layer, inputs, output):
        if layer is last:  # per colour channel: mean 0.5, std image_std, in the decoder's [0, 1] units
            dims = [0, 2, 3]
            mean, std = output.mean(dim=dims), output.std(dim=dims)
            gain = image_std / std
            layer.weight.mul_(gain.view(-1, *[1] * (layer.weight.dim() - 1)))
            layer.bias.copy_((layer.bias - mean) * gain + 0.5)
            shape = [1, -1, 1, 1]
            return (output - mean.view(shape)) * gain.view(shape) + 0.5
        std = output.std()
        layer.weight.div_(std)
        if layer.bias is not None:
            layer.bias.div_(std)
        return output / std

    hooks = [layer.register_forward_hook(rescale) for layer in layers]
    try:
        lr = torch.from_numpy(photo("astronaut", (64, 64))).permute(2, 0, 1)[None].float() / 255
        bicubic = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False)
        model.eval()(bicubic.clamp(0, 1) * 2 - 1)  # encoder -> backbone -> decoder, each layer once
    finally:
        for hook in hooks:
            hook.remove()
    return model


def photo(name: str = "astronaut", size: tuple[int, int] | None = None) -> np.ndarray:
    """A real RGB photo from scikit-image as uint8 HxWx3, optionally cropped to (height, width)."""
    from skimage import data

    image = getattr(data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    image = image[..., :3]
    if size is not None:
        image = image[: size[0], : size[1]]
    return np.ascontiguousarray(image)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is faster than two, and kinder to a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def local_ray(**env: str) -> Iterator[str]:
    """A local Ray instance with 2 CPUs, yielding its address. Its worker processes inherit this
    environment: the repository first on PYTHONPATH, one OpenMP thread, and ``env``; all restored after."""
    import ray

    repo = str(Path(__file__).resolve().parents[1])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
        patch.setenv("OMP_NUM_THREADS", "1")
        for key, value in env.items():
            patch.setenv(key, value)
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()
