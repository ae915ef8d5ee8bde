"""A visual comparison of super-resolution methods: aligned crops and a metric table in one HTML page.

``build_comparison`` pairs the images of several folders by name (the stem, any image extension, as
``tinysr eval`` does), picks the most detailed windows of each image (gradient energy of the ground
truth, or of the first method without one), cuts the same window from every column (the LR window is
the HR box divided by the scale, enlarged with nearest neighbour) and scores each method.
``render_html`` turns the result into one self-contained page: PNG data URIs, inline CSS, no script.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tinysr_cli.pipeline import ITEM_ERRORS

LR_LABEL = "LR"
GT_LABEL = "GT"
THUMBNAIL_SIDE = 256  # longest side of the overview, in pixels
_BOX_COLOURS = ((255, 64, 64), (64, 160, 255), (255, 200, 0), (64, 220, 120), (220, 80, 255), (255, 140, 0))


@dataclass(frozen=True)
class Box:
    """A window of the HR image: top-left corner and side, in HR pixels."""

    x: int
    y: int
    size: int

    def scaled(self, scale: int) -> Box:
        """The same window in an image ``scale`` times smaller."""
        return Box(self.x // scale, self.y // scale, self.size // scale)

    def cut(self, image: np.ndarray) -> np.ndarray:
        return image[self.y : self.y + self.size, self.x : self.x + self.size]


@dataclass
class Tile:
    """One column of one crop: its label and the pixels shown (HR size, uint8 RGB)."""

    label: str
    pixels: np.ndarray


@dataclass
class Crop:
    box: Box
    tiles: list[Tile]


@dataclass
class ImageComparison:
    """One image: its crops, an overview with the boxes drawn, and the scores by method and metric."""

    name: str
    width: int
    height: int
    crops: list[Crop]
    thumbnail: np.ndarray
    scores: dict[str, dict[str, float]]


@dataclass
class Comparison:
    """Everything the page shows; ``failed`` holds one line per image that could not be compared."""

    methods: list[str]
    columns: list[str]
    metrics: list[str]
    images: list[ImageComparison] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # files without a partner in every folder, and non-images
    unavailable: dict[str, str] = field(default_factory=dict)  # metric -> why it is not shown
    scale: int = 4
    crop_size: int = 128
    description: str = ""

    @property
    def mean(self) -> dict[str, dict[str, float]]:
        """Mean of each method's scores over the images compared."""
        result: dict[str, dict[str, float]] = {}
        for method in self.methods:
            result[method] = {}
            for metric in self.metrics:
                values = [image.scores[method][metric] for image in self.images if metric in image.scores.get(method, {})]
                if values:
                    result[method][metric] = math.inf if any(math.isinf(v) for v in values) else math.fsum(values) / len(values)
        return result


class ComparisonError(ValueError):
    """An image (or the whole comparison) that cannot be compared; the message is one line."""


# --- building ----------------------------------------------------------------------------------


def build_comparison(
    preds: list[tuple[str, Path]],
    *,
    gt: Path | None = None,
    lr: Path | None = None,
    scale: int = 4,
    crops: int = 2,
    crop_size: int = 128,
    metrics: list[str] | None = None,
    convention: str = "basicsr",
    crop_border: int | None = None,
    learned: dict[str, Any] | None = None,
    on_error: Callable[[str], None] | None = None,
) -> Comparison:
    """Pair the folders (or single files) by stem and compare every image found in all of them.

    ``preds`` are (method name, folder) in column order; ``learned`` maps metric names to loaded
    ``tinysr_cli.metrics.LearnedMetric`` objects. ``crop_border`` defaults to the scale under BasicSR's
    convention and to 0 under pyiqa's. ``on_error(message)`` is called once per image that fails.
    """
    from tinysr_cli import metrics as m

    if not preds:
        raise ComparisonError("give at least one method's predictions")
    if scale < 1 or crops < 0 or crop_size < 1:
        raise ComparisonError("scale and crop size must be positive and crops not negative")
    learned = learned or {}
    names = list(metrics or ["psnr", "ssim"])
    border = (scale if convention == "basicsr" else 0) if crop_border is None else crop_border
    comparison = Comparison(
        methods=[name for name, _ in preds],
        columns=[*([LR_LABEL] if lr is not None else []), *(name for name, _ in preds), *([GT_LABEL] if gt is not None else [])],
        metrics=[],
        scale=scale,
        crop_size=crop_size,
        description=f"PSNR/SSIM on Y of BT.601 YCbCr, {'BasicSR' if convention == 'basicsr' else 'pyiqa'}'s convention, "
        f"crop border {border}",
    )
    for name in names:
        if name in m.FULL_REFERENCE and gt is None:
            comparison.unavailable[name] = "needs the ground truth (--gt)"
        elif name in m.FOLDER_METRICS:
            comparison.unavailable[name] = "compares whole folders, not single images (see tinysr eval)"
        elif name in m.CORE_METRICS or name in learned:
            comparison.metrics.append(name)

    sources = [*((label, path) for label, path in preds), *([(GT_LABEL, gt)] if gt is not None else []),
               *([(LR_LABEL, lr)] if lr is not None else [])]
    for name, files in _pair_sources(sources, comparison).items():
        try:
            comparison.images.append(
                _compare_one(name, files, comparison, crops=crops, border=border, convention=convention, learned=learned)
            )
        except ITEM_ERRORS as exc:  # a ComparisonError is a ValueError
            message = str(exc) if str(exc).startswith(name) else f"{name}: {exc}"
            comparison.failed.append((name, message))
            if on_error is not None:
                on_error(message)
    return comparison


def _pair_sources(sources: list[tuple[str, Path]], comparison: Comparison) -> dict[str, dict[str, Path] | str]:
    """name -> {column label: file}, for the names found in every source; an error string when ambiguous.

    Single files always pair with each other, whatever their names; the ground truth's names the image.
    """
    from tinysr_cli.evaluation import Pairing, images_by_name

    if all(path.is_file() for _, path in sources):
        reference = dict(sources).get(GT_LABEL, sources[0][1])
        return {reference.stem: {label: path for label, path in sources}}
    skipped = Pairing()
    found = {label: images_by_name(path, "", skipped) for label, path in sources}
    comparison.left_out.extend(f"{path}: not an image" for path in skipped.not_images)
    everywhere = set.intersection(*(set(files) for files in found.values()))
    paired: dict[str, dict[str, Path] | str] = {}
    for name in sorted(set().union(*found.values())):
        if name not in everywhere:
            missing = [label for label in comparison.columns if name not in found[label]]  # in column order
            for label, files in found.items():
                comparison.left_out.extend(f"{file}: no file of the same name for {', '.join(missing)}" for file in files.get(name, []))
            continue
        shared = [file for files in found.values() for file in files[name] if len(files[name]) > 1]
        if shared:
            paired[name] = f"{name}: several files share this name: {', '.join(str(f) for f in shared)}"
        else:
            paired[name] = {label: files[name][0] for label, files in found.items()}
    return paired


def _compare_one(
    name: str, files: dict[str, Path] | str, comparison: Comparison, *, crops: int, border: int, convention: str,
    learned: dict[str, Any],
) -> ImageComparison:
    """Load, check sizes, crop and score one image."""
    from tinysr_cli import metrics as m
    from tinysr_cli.io.images import load_image, to_uint8

    if isinstance(files, str):
        raise ComparisonError(files)
    loaded = {label: load_image(path) for label, path in files.items()}
    pixels = {label: to_uint8(image.rgb) for label, image in loaded.items()}
    reference = GT_LABEL if GT_LABEL in pixels else comparison.methods[0]
    height, width = pixels[reference].shape[:2]
    scale = comparison.scale
    for label in comparison.methods:
        h, w = pixels[label].shape[:2]
        if (h, w) != (height, width):
            raise ComparisonError(
                f"{name}: sizes differ: {files[label].name} ({label}) is {w}x{h}, "
                f"{files[reference].name} ({reference}) is {width}x{height}"
            )
    if LR_LABEL in pixels:
        h, w = pixels[LR_LABEL].shape[:2]
        if (h * scale, w * scale) != (height, width):
            raise ComparisonError(
                f"{name}: {files[LR_LABEL].name} (LR) is {w}x{h}, times {scale} is {w * scale}x{h * scale}, "
                f"but {files[reference].name} ({reference}) is {width}x{height}"
            )

    boxes = select_boxes(pixels[reference], crops, comparison.crop_size, scale if LR_LABEL in pixels else 1)
    crop_list = []
    for box in boxes:
        tiles = []
        for label in comparison.columns:
            if label == LR_LABEL:
                small = box.scaled(scale).cut(pixels[LR_LABEL])
                tiles.append(Tile(label, np.repeat(np.repeat(small, scale, axis=0), scale, axis=1)))
            else:
                tiles.append(Tile(label, box.cut(pixels[label])))
        crop_list.append(Crop(box, tiles))

    scores: dict[str, dict[str, float]] = {}
    for label in comparison.methods:
        scores[label] = {}
        for metric in comparison.metrics:
            if metric == "psnr":
                scores[label][metric] = m.psnr(pixels[label], pixels[GT_LABEL], crop_border=border, convention=convention)
            elif metric == "ssim":
                scores[label][metric] = m.ssim(pixels[label], pixels[GT_LABEL], crop_border=border, convention=convention)
            elif learned[metric].needs_reference:
                scores[label][metric] = learned[metric].score(loaded[label].rgb, loaded[GT_LABEL].rgb)
            else:
                scores[label][metric] = learned[metric].score(loaded[label].rgb)
    return ImageComparison(name, width, height, crop_list, _thumbnail(pixels[reference], boxes), scores)


def gradient_energy(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel squared gradient of the BT.601 luma, H x W float64 (forward differences, 0 at the far edges)."""
    y = rgb[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    energy = np.zeros_like(y)
    energy[:, :-1] += np.diff(y, axis=1) ** 2
    energy[:-1, :] += np.diff(y, axis=0) ** 2
    return energy


def select_boxes(reference: np.ndarray, count: int, size: int, grid: int = 1) -> list[Box]:
    """The ``count`` most detailed square windows of ``reference``, most detailed first.

    Windows have side ``size`` (at most the shorter image side, a multiple of ``grid``) and corners
    on multiples of ``grid``, so that an image ``grid`` times smaller holds the same window exactly.
    Detail is the summed gradient energy; windows are taken greedily, each not overlapping those
    already taken while such remain, else the best remaining one. Ties go to the top-left-most.
    """
    height, width = reference.shape[:2]
    size = min(size, height, width) // grid * grid
    if count <= 0 or size <= 0:
        return []
    integral = np.pad(gradient_energy(reference), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    stride = max(grid, size // 8 // grid * grid)
    ys = _positions(height - size, stride, grid)
    xs = _positions(width - size, stride, grid)
    y0, x0 = np.meshgrid(ys, xs, indexing="ij")
    sums = integral[y0 + size, x0 + size] - integral[y0, x0 + size] - integral[y0 + size, x0] + integral[y0, x0]
    candidates = sorted(((-float(s), int(y), int(x)) for s, y, x in zip(sums.ravel(), y0.ravel(), x0.ravel())))
    chosen: list[Box] = []
    while len(chosen) < count and len(chosen) < len(candidates):
        taken = {(b.y, b.x) for b in chosen}
        free = [c for c in candidates if (c[1], c[2]) not in taken]
        apart = [c for c in free if all(abs(c[1] - b.y) >= size or abs(c[2] - b.x) >= size for b in chosen)]
        _, y, x = (apart or free)[0]
        chosen.append(Box(x, y, size))
    return chosen


def _positions(span: int, stride: int, grid: int) -> np.ndarray:
    """Corners from 0 to ``span`` every ``stride``, with the last possible (grid-aligned) one included."""
    last = span // grid * grid
    return np.unique(np.append(np.arange(0, last + 1, stride), last))


def _thumbnail(reference: np.ndarray, boxes: list[Box]) -> np.ndarray:
    """The reference image shrunk to at most THUMBNAIL_SIDE, each crop's box outlined in its colour."""
    from PIL import Image, ImageDraw

    height, width = reference.shape[:2]
    factor = min(1.0, THUMBNAIL_SIDE / max(height, width))
    image = Image.fromarray(reference)
    if factor < 1:
        image = image.resize((max(1, round(width * factor)), max(1, round(height * factor))), Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(image)
    for index, box in enumerate(boxes):
        corners = [box.x * factor, box.y * factor, (box.x + box.size) * factor - 1, (box.y + box.size) * factor - 1]
        draw.rectangle(corners, outline=_BOX_COLOURS[index % len(_BOX_COLOURS)], width=2)
    return np.asarray(image)


# --- rendering ---------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { margin-bottom: 0.2em; } .meta { color: #555; margin-top: 0; }
section.image { border-top: 1px solid #ccc; padding-top: 0.5em; margin-top: 1.5em; }
.row { display: flex; flex-wrap: wrap; gap: 8px; align-items: flex-start; margin: 0.6em 0; }
figure { margin: 0; text-align: center; font-size: 0.85em; }
img.crop { image-rendering: pixelated; display: block; border: 3px solid transparent; }
img.thumb { display: block; }
table { border-collapse: collapse; margin: 0.5em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; } td.num { text-align: right; }
.failed { color: #b00; } .note { color: #666; }
"""


def encode_png(pixels: np.ndarray) -> str:
    """A data URI holding ``pixels`` (H x W x 3 uint8) as PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def format_score(value: float) -> str:
    """How a score is shown: four decimals, ``inf`` for identical images."""
    return "inf" if math.isinf(value) else f"{value:.4f}"


def render_html(comparison: Comparison, title: str = "tinysr compare") -> str:
    """One self-contained HTML page: the mean table, then each image's overview, crops and scores."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="meta">{len(comparison.images)} image(s); columns: {esc(", ".join(comparison.columns))}; '
        f"crops of {comparison.crop_size} px"
        + (f"; LR enlarged {comparison.scale}x with nearest neighbour" if LR_LABEL in comparison.columns else "")
        + (f"; {esc(comparison.description)}" if comparison.metrics else "")
        + ". Best value per column in bold.</p>",
    ]
    for metric, why in comparison.unavailable.items():
        parts.append(f'<p class="note">{esc(metric)}: not computed: {esc(why)}</p>')
    if comparison.failed:
        parts.append('<h2 class="failed">Failed</h2><ul class="failed">')
        parts.extend(f"<li>{esc(message)}</li>" for _, message in comparison.failed)
        parts.append("</ul>")
    if comparison.left_out:
        parts.append('<details class="note"><summary>Left out</summary><ul>')
        parts.extend(f"<li>{esc(line)}</li>" for line in comparison.left_out)
        parts.append("</ul></details>")
    if comparison.metrics and comparison.images:
        parts.append(f"<h2>Mean over {len(comparison.images)} image(s)</h2>")
        parts.append(_score_table(comparison.methods, comparison.metrics, comparison.mean, "mean"))

    for image in comparison.images:
        anchor = esc(image.name, quote=True)
        parts.append(f'<section class="image" id="image-{anchor}"><h2>{esc(image.name)}</h2>')
        parts.append(f'<p class="meta">{image.width}x{image.height}</p><div class="row">')
        parts.append(f'<figure><img class="thumb" alt="{anchor}, crop boxes" src="{encode_png(image.thumbnail)}">'
                     "<figcaption>overview</figcaption></figure></div>")
        for index, crop in enumerate(image.crops):
            colour = "#%02x%02x%02x" % _BOX_COLOURS[index % len(_BOX_COLOURS)]
            box = crop.box
            display = box.size * max(1, 256 // box.size)  # small crops shown enlarged, in whole pixels
            parts.append(f'<p class="meta">crop {index + 1}: x {box.x}, y {box.y}, {box.size}x{box.size} px</p><div class="row">')
            for tile in crop.tiles:
                label = esc(tile.label, quote=True)
                parts.append(
                    f'<figure><img class="crop" alt="{anchor} crop {index + 1} {label}" data-image="{anchor}" '
                    f'data-crop="{index}" data-column="{label}" data-box="{box.x},{box.y},{box.size}" '
                    f'width="{display}" height="{display}" style="border-color:{colour}" src="{encode_png(tile.pixels)}">'
                    f"<figcaption>{esc(tile.label)}</figcaption></figure>"
                )
            parts.append("</div>")
        if comparison.metrics:
            parts.append(_score_table(comparison.methods, comparison.metrics, image.scores, image.name))
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _score_table(methods: list[str], metrics: list[str], scores: dict[str, dict[str, float]], caption: str) -> str:
    """Methods as rows, metrics as columns; the best of each column in bold (ties all bold)."""
    from tinysr_cli import metrics as m

    esc = html.escape
    best = {}
    for metric in metrics:
        values = [scores[method][metric] for method in methods if metric in scores.get(method, {})]
        if values:
            best[metric] = min(values) if metric in m.LOWER_IS_BETTER else max(values)
    head = "".join(f"<th>{esc(metric.upper())} {'↓' if metric in m.LOWER_IS_BETTER else '↑'}</th>" for metric in metrics)
    rows = [f'<table data-table="{esc(caption, quote=True)}"><tr><th>method</th>{head}</tr>']
    for method in methods:
        cells = []
        for metric in metrics:
            value = scores.get(method, {}).get(metric)
            if value is None:
                cells.append('<td class="num">-</td>')
                continue
            text = format_score(value)
            if value == best.get(metric):
                text = f"<b>{text}</b>"
            cells.append(f'<td class="num" data-metric="{esc(metric)}" title="{value!r}">{text}</td>')
        rows.append(f"<tr><th>{esc(method)}</th>{''.join(cells)}</tr>")
    rows.append("</table>")
    return "".join(rows)
