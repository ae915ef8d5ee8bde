"""Make tests/data/metric_*.png and tests/data/metric_goldens.json with BasicSR's and pyiqa's own code.

Nothing of tinysr is imported here: the pairs come from scikit-image photos and numpy degradations,
and the numbers from BasicSR 1.4.2's ``basicsr/metrics/psnr_ssim.py`` and pyiqa 0.1.16's
``pyiqa/archs/psnr_arch.py`` / ``ssim_arch.py``, loaded file by file from their unpacked release
archives (their package ``__init__`` files import training code with many more dependencies, so
they are not run; every module the metric functions use is the released file, unmodified).

    pip download --no-deps --no-build-isolation --no-binary :all: basicsr==1.4.2 -d /tmp/bsr
    pip download --no-deps pyiqa==0.1.16 -d /tmp/bsr
    tar xzf /tmp/bsr/basicsr-1.4.2.tar.gz -C /tmp/bsr
    (cd /tmp/bsr && mkdir pyiqa-0.1.16 && cd pyiqa-0.1.16 && unzip -q ../pyiqa-0.1.16-py3-none-any.whl)
    python tests/data/make_metric_goldens.py /tmp/bsr/basicsr-1.4.2 /tmp/bsr/pyiqa-0.1.16

It needs numpy, opencv, scipy, torch, Pillow and scikit-image (the project's own environment has them).
"""

from __future__ import annotations

import importlib.util
import json
import platform
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import scipy
import torch
from PIL import Image
from skimage import data

HERE = Path(__file__).resolve().parent
SIZE = (48, 64)  # height, width: small PNGs, and 40 x 56 left after BasicSR's 4 px crop


def pairs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (prediction, ground truth), uint8 RGB, all deterministic."""
    rng = np.random.default_rng(15)
    h, w = SIZE

    def crop(name, top, left):
        image = getattr(data, name)()[..., :3]
        return np.ascontiguousarray(image[top : top + h, left : left + w])

    out = {}
    gt = crop("astronaut", 30, 150)  # face and hair
    noisy = gt.astype(np.float64) + rng.normal(0, 6, gt.shape)
    out["noise"] = (np.clip(np.round(noisy), 0, 255).astype(np.uint8), gt)
    gt = crop("coffee", 120, 200)
    # 4x box downscale then nearest upscale: blocky, the error an SR model makes at its worst
    small = gt.reshape(h // 4, 4, w // 4, 4, 3).astype(np.float64).mean(axis=(1, 3))
    out["blocks"] = (np.round(small).astype(np.uint8).repeat(4, axis=0).repeat(4, axis=1), gt)
    gt = crop("chelsea", 100, 140)
    # one pixel shift right and a colour cast: small, structured errors
    shifted = np.concatenate([gt[:, :1], gt[:, :-1]], axis=1).astype(np.int16) + np.array([6, -3, 2])
    out["shift"] = (np.clip(shifted, 0, 255).astype(np.uint8), gt)
    gt = crop("rocket", 200, 200)
    # contrast-reversed left half: negative contrast-structure terms (pyiqa clamps them, BasicSR does not)
    flipped = gt.copy()
    flipped[:, : w // 2] = 255 - flipped[:, : w // 2]
    out["reversed"] = (flipped, gt)
    return out


def load(name: str, path: Path, package: bool = False) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(
        name, path / "__init__.py" if package else path, submodule_search_locations=[str(path)] if package else None
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def stub(name: str, path: Path) -> types.ModuleType:
    """A package whose __init__ is not run, so only the submodules loaded from it exist."""
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    sys.modules[name] = module
    return module


def basicsr_functions(root: Path):
    src = root / "basicsr"
    stub("basicsr", src)
    utils = stub("basicsr.utils", src / "utils")
    color_util = load("basicsr.utils.color_util", src / "utils" / "color_util.py")
    load("basicsr.utils.registry", src / "utils" / "registry.py")
    utils.bgr2ycbcr, utils.rgb2ycbcr_pt = color_util.bgr2ycbcr, color_util.rgb2ycbcr_pt  # what psnr_ssim uses
    stub("basicsr.metrics", src / "metrics")
    load("basicsr.metrics.metric_util", src / "metrics" / "metric_util.py")
    module = load("basicsr.metrics.psnr_ssim", src / "metrics" / "psnr_ssim.py")
    return module.calculate_psnr, module.calculate_ssim


def pyiqa_classes(root: Path):
    src = root / "pyiqa"
    stub("pyiqa", src)
    stub("pyiqa.utils", src / "utils")
    load("pyiqa.utils.registry", src / "utils" / "registry.py")
    load("pyiqa.utils.color_util", src / "utils" / "color_util.py")
    load("pyiqa.matlab_utils", src / "matlab_utils", package=True)
    stub("pyiqa.archs", src / "archs")
    load("pyiqa.archs.func_util", src / "archs" / "func_util.py")
    psnr_arch = load("pyiqa.archs.psnr_arch", src / "archs" / "psnr_arch.py")
    ssim_arch = load("pyiqa.archs.ssim_arch", src / "archs" / "ssim_arch.py")
    return psnr_arch.PSNR, ssim_arch.SSIM


def main(basicsr_root: Path, pyiqa_root: Path) -> None:
    torch.set_num_threads(1)
    calculate_psnr, calculate_ssim = basicsr_functions(basicsr_root)
    PSNR, SSIM = pyiqa_classes(pyiqa_root)
    # as the OSEDiff / TSD-SR / AdcSR evaluation scripts create them: pyiqa.create_metric('psnr',
    # test_y_channel=True, color_space='ycbcr') and the same for 'ssim'
    pyiqa_psnr = PSNR(test_y_channel=True, color_space="ycbcr")
    pyiqa_ssim = SSIM(test_y_channel=True, color_space="ycbcr")
    goldens = {
        "made_by": "tests/data/make_metric_goldens.py",
        "versions": {
            "basicsr": "1.4.2",
            "pyiqa": "0.1.16",
            "python": platform.python_version(),
            "numpy": np.__version__,
            "opencv": cv2.__version__,
            "scipy": scipy.__version__,
            "torch": torch.__version__,
        },
        "pairs": {},
    }
    for name, (pred, gt) in pairs().items():
        for role, image in (("pred", pred), ("gt", gt)):
            Image.fromarray(image).save(HERE / f"metric_{name}_{role}.png", optimize=True)
        # BasicSR reads images with cv2.imread: BGR, HWC, uint8 in [0, 255]
        bgr_pred, bgr_gt = pred[..., ::-1], gt[..., ::-1]
        # pyiqa reads them as RGB float tensors in [0, 1] (torchvision's ToTensor: float / 255)
        t_pred, t_gt = (torch.from_numpy(x.copy()).permute(2, 0, 1)[None].float().div(255) for x in (pred, gt))
        with torch.no_grad():
            goldens["pairs"][name] = {
                "basicsr": {
                    "psnr": float(calculate_psnr(bgr_pred, bgr_gt, crop_border=4, test_y_channel=True)),
                    "ssim": float(calculate_ssim(bgr_pred, bgr_gt, crop_border=4, test_y_channel=True)),
                },
                "pyiqa": {
                    "psnr": float(pyiqa_psnr(t_pred, t_gt)),
                    "ssim": float(pyiqa_ssim(t_pred, t_gt)),
                },
            }
    (HERE / "metric_goldens.json").write_text(json.dumps(goldens, indent=2) + "\n")
    print(json.dumps(goldens["pairs"], indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
