"""Training data: HR crops of real photos and their degraded pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import photo
from tinysr_cli.errors import TinySRError
from training.data import HRCrops, SyntheticPairs, pad_to_size
from training.degradations import MILD

CROP = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three real photos, one nested and one smaller than the crop, plus a file that is no image."""
    root = tmp_path_factory.mktemp("hr")
    (root / "nested").mkdir()
    Image.fromarray(photo("astronaut", (96, 128))).save(root / "astronaut.png")
    Image.fromarray(photo("coffee", (80, 120))).save(root / "nested" / "coffee.png")
    Image.fromarray(photo("chelsea", (40, 50))).save(root / "chelsea.png")
    (root / "notes.txt").write_text("not an image")
    return root


def source_of(path) -> np.ndarray:
    """The file as the crop sees it: reflect-padded (numpy, mirror without edge repeat) to the crop."""
    image = np.asarray(Image.open(path).convert("RGB")).astype(np.float32) / 255
    height, width = image.shape[:2]
    return np.pad(image, ((0, max(0, CROP - height)), (0, max(0, CROP - width)), (0, 0)), mode="reflect")


def is_window_of(crop: torch.Tensor, source: np.ndarray) -> bool:
    """Whether ``crop`` [3, s, s] equals some s x s window of ``source`` (H, W, 3), or its mirror."""
    size = crop.shape[-1]
    windows = np.lib.stride_tricks.sliding_window_view(source, (size, size), axis=(0, 1))  # [h, w, 3, s, s]
    candidate = crop.numpy()
    return any(np.all(windows == c, axis=(2, 3, 4)).any() for c in (candidate, candidate[..., ::-1]))


def test_crops_are_windows_of_their_files_padded_where_small(photos):
    crops = HRCrops([photos], CROP, seed=3)
    assert len(crops) == 3  # the text file is skipped, the nested photo found
    for sample in range(9):
        item = crops[sample]
        assert item["hr"].shape == (3, CROP, CROP) and item["sample"] == sample
        assert is_window_of(item["hr"], source_of(crops.file_of(sample)))


def test_flips_happen_with_their_probability(photos):
    never = HRCrops([photos], CROP, seed=3, flip_prob=0.0)
    always = HRCrops([photos], CROP, seed=3, flip_prob=1.0)
    for sample in range(6):
        assert torch.equal(never[sample]["hr"].flip(-1), always[sample]["hr"])


def test_each_epoch_visits_every_file_once(photos):
    crops = HRCrops([photos], CROP, seed=5)
    for epoch in range(4):
        assert sorted(crops.file_of(3 * epoch + i) for i in range(3)) == crops.files
    assert crops.locate(7) == (2, 1)


def test_crops_are_fixed_by_the_seed(photos):
    first, again, other = HRCrops([photos], CROP, seed=1), HRCrops([photos], CROP, seed=1), HRCrops([photos], CROP, seed=2)
    same = [torch.equal(first[g]["hr"], again[g]["hr"]) for g in range(6)]
    differ = [not torch.equal(first[g]["hr"], other[g]["hr"]) for g in range(6)]
    assert all(same) and any(differ)


def test_pad_to_size_reflects_repeatedly_for_tiny_images():
    image = torch.arange(12.0).view(1, 3, 4)
    padded = pad_to_size(image, 9)
    assert padded.shape == (1, 9, 9)
    assert torch.equal(padded[:, :3, :4], image)
    assert torch.equal(padded[0, 0, :9], torch.tensor([0.0, 1, 2, 3, 2, 1, 0, 1, 2]))  # mirrored twice


def test_missing_or_empty_folders_are_one_clear_error(tmp_path):
    with pytest.raises(TinySRError, match="no images found"):
        HRCrops([tmp_path], CROP, seed=0)
    with pytest.raises(TinySRError, match="not a folder"):
        HRCrops([tmp_path / "absent"], CROP, seed=0)


# ----------------------------------------------------------------------------- synthetic pairs


def test_pairs_depend_on_the_sample_only(photos):
    pairs = SyntheticPairs(HRCrops([photos], CROP, seed=4), MILD)
    hr, lq = pairs.pairs([5, 2], torch.device("cpu"))
    assert hr.shape == (2, 3, CROP, CROP) and lq.shape == (2, 3, CROP // 4, CROP // 4)
    alone_hr, alone_lq = pairs.pairs([2], torch.device("cpu"))
    assert torch.equal(hr[1], alone_hr[0]) and torch.equal(lq[1], alone_lq[0])
    assert torch.equal(lq * 255, (lq * 255).round())


def test_identity_names_the_files_and_the_degradation(photos):
    mild = SyntheticPairs(HRCrops([photos], CROP, seed=4), MILD).identity()
    default = SyntheticPairs(HRCrops([photos], CROP, seed=4)).identity()
    assert mild["files"] == 3 and mild["crop_size"] == CROP and mild["seed"] == 4
    assert mild["degradation"]["jpeg_range2"] == (60.0, 100.0) and mild != default
