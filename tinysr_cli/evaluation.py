"""Score predictions against ground truth from Python: what `tinysr eval` does, without the terminal.

::

    from tinysr_cli.evaluation import evaluate

    report = evaluate("out/", "hr/", metrics=["psnr", "ssim"])
    print(report.mean, report.to_json())

Files pair by name (the stem; any image extension on either side). A pair that cannot be scored
(unreadable, sizes differ, two files with one name) lands in ``report.failed``; the others are still
scored. Files without a partner are listed in the report and left out. Learned metrics that cannot
be had (pyiqa missing, weights not cached and no internet) are listed in ``unavailable``. Without
pyiqa, lpips, lpips-vgg, dists and niqe come from tinysr's offline implementations
(``tinysr_cli.iqa``). Nothing here prints: failures reach ``on_error``, progress ``progress``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinysr_cli import metrics as m
from tinysr_cli.errors import TinySRError
from tinysr_cli.pipeline import ITEM_ERRORS

DATASET_LAYOUTS = (("test_LR", "test_HR"), ("LR", "HR"))  # StableSR's test sets use both
DEFAULT_METRICS = ("psnr", "ssim")

# (pair name, pairs done, pairs in all)
ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Settings:
    """What is scored and how PSNR/SSIM are computed."""

    metrics: list[str]
    convention: str
    crop_border: int

    @property
    def description(self) -> str:
        source = "BasicSR" if self.convention == "basicsr" else "pyiqa"
        return f"{source}'s convention: Y of BT.601 YCbCr, crop border {self.crop_border}"


def parse_metrics(values: Iterable[str] | None) -> list[str]:
    """Comma-separated or repeated names, ``all`` for every metric; order kept, duplicates dropped."""
    names: list[str] = []
    for value in values or [",".join(DEFAULT_METRICS)]:
        for name in (part.strip().lower() for part in value.split(",")):
            if not name:
                continue
            if name != "all" and name not in m.ALL_METRICS:
                raise TinySRError(f"unknown metric {name!r}; choose from {', '.join(m.ALL_METRICS)} or all", option="metrics")
            names.extend(n for n in (m.ALL_METRICS if name == "all" else [name]) if n not in names)
    return names


def check_convention(convention: str) -> str:
    if convention not in m.CONVENTIONS:
        raise TinySRError(f"{convention!r} is not one of {', '.join(m.CONVENTIONS)}", option="convention")
    return convention


def dataset_folders(root: Path) -> tuple[Path, Path]:
    """(LR folder, HR folder) of a paired test set."""
    if not root.is_dir():
        raise TinySRError(f"{root}: no such folder ({{opt:dataset}})", option="dataset", path=root)
    for lr, hr in DATASET_LAYOUTS:
        if (root / hr).is_dir():
            return root / lr, root / hr
    layouts = " or ".join(f"{lr}/ and {hr}/" for lr, hr in DATASET_LAYOUTS)
    raise TinySRError(f"{root}: no HR folder found", hint=f"a paired test set holds {layouts}", option="dataset", path=root)


# --- pairing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    name: str
    pred: Path
    gt: Path


@dataclass
class Pairing:
    pairs: list[Pair] = field(default_factory=list)
    pred_only: list[Path] = field(default_factory=list)
    gt_only: list[Path] = field(default_factory=list)
    ambiguous: dict[str, list[Path]] = field(default_factory=dict)  # name -> files sharing it
    not_images: list[Path] = field(default_factory=list)


def images_by_name(path: Path, suffix: str, pairing: Pairing) -> dict[str, list[Path]]:
    """Image files of a folder (or the one file) by stem, ``suffix`` removed from the end; other files
    are added to ``pairing.not_images``."""
    from tinysr_cli.io.images import is_image_path

    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    found: dict[str, list[Path]] = {}
    for file in files:
        if not is_image_path(file):
            pairing.not_images.append(file)
            continue
        stem = file.stem
        if suffix and stem.endswith(suffix) and stem != suffix:
            stem = stem[: -len(suffix)]
        found.setdefault(stem, []).append(file)
    return found


def pair(pred: Path, gt: Path, pred_suffix: str = "") -> Pairing:
    """Pairs by name; two single files always pair."""
    pairing = Pairing()
    if pred.is_file() and gt.is_file():
        pairing.pairs.append(Pair(pred.stem, pred, gt))
        return pairing
    preds = images_by_name(pred, pred_suffix, pairing)
    gts = images_by_name(gt, "", pairing)
    for name in sorted(preds.keys() | gts.keys()):
        pred_files, gt_files = preds.get(name, []), gts.get(name, [])
        if len(pred_files) > 1 or len(gt_files) > 1:
            pairing.ambiguous[name] = [*pred_files, *gt_files]
        elif not gt_files:
            pairing.pred_only.extend(pred_files)
        elif not pred_files:
            pairing.gt_only.extend(gt_files)
        else:
            pairing.pairs.append(Pair(name, pred_files[0], gt_files[0]))
    return pairing


# --- learned metrics ---------------------------------------------------------------------------


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """pyiqa prints download notices to stdout, which carries the CLI's results."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def load_learned(names: Iterable[str], device: str = "auto") -> tuple[dict[str, Any], dict[str, str]]:
    """The requested learned metrics that can be had, and why the others cannot."""
    wanted = [name for name in names if name in m.LEARNED_METRICS]
    if not wanted:
        return {}, {}
    from tinysr_cli.engine.device import resolve_device

    target = resolve_device(device)
    loaded, unavailable = {}, {}
    for name in wanted:
        try:
            with _stdout_to_stderr():
                loaded[name] = m.load_metric(name, target)
        except m.MetricUnavailable as exc:
            unavailable[name] = str(exc)
    return loaded, unavailable


# --- the report --------------------------------------------------------------------------------


def format_number(value: float, digits: int | None = None) -> str:
    """A score as text: full precision (or ``digits`` decimals), ``inf`` for identical images."""
    if math.isinf(value):
        return "inf"
    return repr(value) if digits is None else f"{value:.{digits}f}"


def _json_safe(value: Any) -> Any:
    """Infinite PSNR (identical images, BasicSR) becomes the string "inf": JSON has no infinity."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if not any(math.isinf(v) for v in values) else math.inf


@dataclass
class Report:
    """Per-image and mean scores of one evaluation. ``images``: one row per scored pair, ``{"name",
    "pred", "gt", metric: score, ...}``; ``failed``: ``{"name", "error"}`` per pair not scored."""

    settings: Settings
    pred: Path | None
    gt: Path
    model: str | None = None
    images: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    folder_scores: dict[str, float] = field(default_factory=dict)
    implementations: dict[str, str] = field(default_factory=dict)  # learned metric -> who computed it
    unavailable: dict[str, str] = field(default_factory=dict)  # metric -> why it was not computed
    pred_only: list[Path] = field(default_factory=list)
    gt_only: list[Path] = field(default_factory=list)
    not_images: list[Path] = field(default_factory=list)

    @property
    def metrics(self) -> list[str]:
        """The requested metrics that were scored, in the requested order."""
        return [
            name for name in self.settings.metrics if any(name in row for row in self.images) or name in self.folder_scores
        ]

    @property
    def mean(self) -> dict[str, float]:
        means = {
            name: _mean([row[name] for row in self.images if name in row]) for name in self.metrics if name not in self.folder_scores
        }
        means.update(self.folder_scores)
        return means

    def to_dict(self) -> dict[str, Any]:
        """The JSON report's schema (infinite PSNR kept as a float)."""
        from tinysr_cli import __version__

        return {
            "tinysr": __version__,
            "convention": self.settings.convention,
            "psnr_ssim": self.settings.description,
            "crop_border": self.settings.crop_border,
            "pred": None if self.pred is None else str(self.pred),
            "gt": str(self.gt),
            "model": self.model,
            "metrics": self.metrics,
            "images": self.images,
            "mean": self.mean,
            "implementations": self.implementations,
            "unavailable": self.unavailable,
            "failed": self.failed,
            "unmatched": {"pred_only": [str(p) for p in self.pred_only], "gt_only": [str(p) for p in self.gt_only]},
        }

    def to_json(self) -> str:
        return json.dumps(_json_safe(self.to_dict()), indent=2) + "\n"

    def to_csv(self) -> str:
        """One row per image at full precision, the mean as a last row."""
        names, mean = self.metrics, self.mean
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["name", "pred", "gt", *names])
        for row in self.images:
            writer.writerow([row["name"], row["pred"], row["gt"], *(format_number(row[n]) if n in row else "" for n in names)])
        writer.writerow(["mean", "", "", *(format_number(mean[n]) if n in mean else "" for n in names)])
        return buffer.getvalue()


# --- scoring -----------------------------------------------------------------------------------


class NothingToScore(TinySRError):
    """None of the requested metrics can be computed; ``unavailable``: metric -> why not."""

    def __init__(self, unavailable: dict[str, str]) -> None:
        super().__init__(
            "none of the requested metrics can be computed here",
            hint="psnr and ssim always can; lpips, lpips-vgg, dists and niqe once `tinysr metrics fetch` has run; "
            "the others need pyiqa and its weights, downloaded on first use",
        )
        self.unavailable = unavailable


class Evaluator:
    """Metrics loaded once, to score any number of folder pairs.

    ``metrics``: names as :func:`parse_metrics` reads them (default psnr and ssim); ``crop_border``
    defaults to the convention's (4 for basicsr, 0 for pyiqa). Raises :class:`NothingToScore` when
    none of them can be computed here; ``unavailable`` says why for each one left out.
    """

    def __init__(
        self, metrics: Iterable[str] | None = None, *, convention: str = "basicsr", crop_border: int | None = None,
        device: str = "auto",
    ) -> None:
        names = parse_metrics(metrics)
        check_convention(convention)
        border = m.DEFAULT_CROP_BORDER[convention] if crop_border is None else crop_border
        self.settings = Settings(names, convention, border)
        self.learned, self.unavailable = load_learned(names, device)
        if not any(name in m.CORE_METRICS or name in self.learned for name in names):
            raise NothingToScore(self.unavailable)

    @property
    def implementations(self) -> dict[str, str]:
        return {name: metric.implementation for name, metric in self.learned.items()}

    def evaluate(
        self,
        pred: Path | str,
        gt: Path | str,
        *,
        pred_suffix: str = "",
        model: str | None = None,
        record_pred: bool = True,
        upscale_failures: Mapping[str, str] | None = None,
        progress: ProgressCallback | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> Report:
        """Score ``pred`` (a folder or one image) against ``gt``. When no name pairs, nothing is scored:
        the report lists no image and no failure beyond ``upscale_failures``.

        ``upscale_failures``: name -> message of LR images that could not be upscaled into ``pred``;
        they count as failed pairs, and their ground truth is not listed as unmatched. ``model`` and
        ``record_pred`` only shape the report (``record_pred=False``: ``pred`` was temporary).
        """
        pred, gt = Path(pred), Path(gt)
        failures = dict(upscale_failures or {})
        pairing = pair(pred, gt, pred_suffix)
        report = Report(
            self.settings, pred if record_pred else None, gt, model,
            implementations=self.implementations, unavailable=dict(self.unavailable),
            pred_only=pairing.pred_only, gt_only=[path for path in pairing.gt_only if path.stem not in failures],
            not_images=pairing.not_images,
        )
        report.failed.extend({"name": name, "error": message} for name, message in failures.items())

        def fail(name: str, message: str) -> None:
            report.failed.append({"name": name, "error": message})
            if on_error is not None:
                on_error(message)

        if not pairing.pairs:
            return report
        for name, files in pairing.ambiguous.items():
            fail(name, f"{name}: several files share this name: {', '.join(str(f) for f in files)}")
        for done, item in enumerate(pairing.pairs):
            if progress is not None:
                progress(item.name, done, len(pairing.pairs))
            try:
                scores = self.score_pair(item)
            except ITEM_ERRORS as exc:
                fail(item.name, f"{item.name}: {exc}" if isinstance(exc, ValueError) else str(exc))
            else:
                report.images.append({"name": item.name, "pred": item.pred.name, "gt": item.gt.name, **scores})
        if progress is not None:
            progress("", len(pairing.pairs), len(pairing.pairs))
        self._add_folder_metrics(report, pred, gt)
        return report

    def score_pair(self, item: Pair) -> dict[str, float]:
        """Every per-image metric of one pair; sizes must match exactly."""
        from tinysr_cli.io.images import load_image, to_uint8

        pred, gt = load_image(item.pred), load_image(item.gt)
        if pred.size != gt.size:
            (ph, pw), (gh, gw) = pred.size, gt.size
            raise ValueError(f"sizes differ: {item.pred.name} is {pw}x{ph}, {item.gt.name} is {gw}x{gh}")
        pred_u8, gt_u8 = to_uint8(pred.rgb), to_uint8(gt.rgb)  # 8-bit, as both conventions read files
        settings = self.settings
        scores: dict[str, float] = {}
        for name in settings.metrics:
            if name == "psnr":
                scores[name] = m.psnr(pred_u8, gt_u8, crop_border=settings.crop_border, convention=settings.convention)
            elif name == "ssim":
                scores[name] = m.ssim(pred_u8, gt_u8, crop_border=settings.crop_border, convention=settings.convention)
            elif name in self.learned and name not in m.FOLDER_METRICS:
                with _stdout_to_stderr():
                    scores[name] = self.learned[name].score(pred.rgb, gt.rgb)
        return scores

    def _add_folder_metrics(self, report: Report, pred: Path, gt: Path) -> None:
        """FID compares the two folders as wholes."""
        for name in self.settings.metrics:
            if name not in m.FOLDER_METRICS or name not in self.learned:
                continue
            if not (pred.is_dir() and gt.is_dir()):
                report.unavailable[name] = "it compares two folders, not two images"
                continue
            try:
                with _stdout_to_stderr():
                    report.folder_scores[name] = self.learned[name].score_folders(pred, gt)
            except (OSError, ValueError, RuntimeError) as exc:
                report.unavailable[name] = str(exc)


def evaluate(
    pred: Path | str,
    gt: Path | str,
    metrics: Iterable[str] | None = None,
    *,
    convention: str = "basicsr",
    crop_border: int | None = None,
    device: str = "auto",
    pred_suffix: str = "",
    progress: ProgressCallback | None = None,
    on_error: Callable[[str], None] | None = None,
) -> Report:
    """Score the predictions ``pred`` (a folder or one image) against the ground truth ``gt``."""
    for path, option in ((Path(gt), "gt"), (Path(pred), "pred")):
        if not path.exists():
            raise TinySRError(f"{path}: no such file or folder ({{opt:{option}}})", option=option, path=path)
    evaluator = Evaluator(metrics, convention=convention, crop_border=crop_border, device=device)
    return evaluator.evaluate(pred, gt, pred_suffix=pred_suffix, progress=progress, on_error=on_error)
