"""Shared fixtures: tiny random models and real photos from scikit-image's bundled data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A tiny-config weights file with a fixed seed."""
    from tinysr_cli.weights.format import init_weights, save_weights

    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_weights(init_weights("tiny", seed=0), path, provenance={"source": "test"})
    return path


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
