"""One command that checks and times tinysr on a CUDA machine, for a session that gets one.

Usage: python benchmarks/gpu_check.py OUT_DIR                 # on a CUDA machine, <= 8 minutes
       python benchmarks/gpu_check.py OUT_DIR --dry-run-cpu   # the same code paths, tiny, on the CPU

Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md (rewritten after every part, so a run cut
short still leaves a report) and OUT_DIR/cuda_tests.xml (pytest's JUnit report). Parts, each
time-boxed and wrapped so that a failing part is recorded and the rest still runs:

1. tests        the suite's CUDA-marked tests (tests/test_cuda.py; two GPUs in
                test_multi_device.py), in a pytest subprocess
2. side_by_side one 512x512 output in fp16, batch 1 and the best batch: our engine (eager;
                compiled in part 6), the official-style pipeline, the TSD-SR architecture,
                Real-ESRGAN x4plus and SPAN; latency, images/s, peak device memory
3. large_image  a 4000x3000 input (16000x12000 output): wall time and peak device memory
4. video        960x540 -> 3840x2160, 30 frames of a synthetic clip, through the product's video path
5. roofline     the backbone's achieved TFLOP/s against the device's dense fp16 peak
6. compiled     part 2's rows for our engine through torch.compile and CUDA graphs (last: compiling
                is the slowest step, so it cannot crowd out the other parts)

Models have random weights of the real (full) architecture: speed does not depend on the values.
Needs only the standard library and the package (plus diffusers for TSD-SR, spandrel and
tinysr_cli.weights.peers for the pixel-space peers, av for the video part: each part or row
records "not available" when its import fails). Exit status: 0 all parts ok, 1 some part failed
or ran out of time, 2 no CUDA device (one line, at once).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PAPER_V100_MS = {"tinysr": 26, "tsdsr-architecture": 147}  # the paper's 512x512 latencies on a V100
# Dense fp16/bf16 tensor-core peaks (vendor datasheets), matched against the device name in order.
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("V100", 125.0))
LARGE_GOAL_GIB = 8
VIDEO_GOAL_FPS = 8
PARTS = ("tests", "side_by_side", "large_image", "video", "roofline", "compiled")


@dataclass(frozen=True)
class Scale:
    """Sizes and time boxes of one run: the real check on a GPU, or the CPU rehearsal."""

    dry: bool
    size: int  # output side of the side-by-side test
    batches: tuple[int, ...]  # images per call tried for "the best batch"
    runs: int
    large: tuple[int, int]  # input width, height
    video: tuple[int, int]
    video_frames: int
    roofline_batch: int
    compile_modes: tuple[str, ...]
    boxes: dict = field(default_factory=dict)  # seconds per part
    budget_s: float = 480.0


GPU = Scale(
    dry=False, size=512, batches=(1, 2, 4, 8, 16, 32), runs=10, large=(4000, 3000), video=(960, 540), video_frames=30,
    roofline_batch=16, compile_modes=("inductor", "cudagraphs"),
    boxes={"tests": 150, "side_by_side": 100, "large_image": 70, "video": 50, "roofline": 20, "compiled": 80}, budget_s=475,
)
DRY = Scale(
    dry=True, size=128, batches=(1, 2), runs=1, large=(160, 120), video=(64, 48), video_frames=3,
    roofline_batch=2, compile_modes=("dynamo-eager", "cudagraphs"),
    boxes={"tests": 60, "side_by_side": 60, "large_image": 30, "video": 30, "roofline": 15, "compiled": 30}, budget_s=200,
)


def dry_model():
    """A minute TinySR of the real structure (32-pixel LR tiles) for the CPU rehearsal."""
    from tinysr_cli.models.tinysr import TinySR, TinySRConfig
    from tinysr_cli.models.transformer import TransformerConfig
    from tinysr_cli.models.vae import VAEConfig

    import torch

    config = TinySRConfig(
        TransformerConfig(num_layers=1, hidden_size=32, num_heads=2, pos_grid=8),
        VAEConfig(encoder_channels=(8,) * 4, decoder_channels=(8,) * 4, encoder_blocks=(1,) * 4, decoder_blocks=(1,) * 4),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TinySR(config).eval()


def make_model(scale: Scale):
    from tinysr_cli.weights.format import init_weights

    return dry_model() if scale.dry else init_weights("full", seed=0)


class PartTimeout(Exception):
    pass


class Box:
    """A part's time box: steps call ``check`` between measurements."""

    def __init__(self, seconds: float, publish=None) -> None:
        self.seconds, self.start = seconds, time.monotonic()
        self._publish = publish

    def publish(self, partial: dict) -> None:
        """Write what the part has so far into the report (kept if the global budget runs out)."""
        if self._publish is not None:
            self._publish(partial)

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def check(self, what: str) -> None:
        if self.left() <= 0:
            raise PartTimeout(f"time box of {self.seconds:.0f} s spent before {what}")


class Report:
    """The report, rewritten (JSON and markdown) after every part and by the global watchdog."""

    def __init__(self, out: Path, scale: Scale, device: str, device_name: str) -> None:
        import torch

        self.out, self.lock = out, threading.RLock()
        self.data = {
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dry_run_cpu": scale.dry,
            "device": device,
            "device_name": device_name,
            "precision": "float32" if scale.dry else "float16",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu": f"{platform.machine()}, {os.cpu_count()} cores",
            "paper_v100_ms": PAPER_V100_MS,
            "parts": {},
        }

    def part(self, name: str, result: dict) -> None:
        with self.lock:
            self.data["parts"][name] = result
            self.write()

    def write(self) -> None:
        with self.lock:
            self.data["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=2) + "\n")
            (self.out / "gpu_check.md").write_text(markdown(self.data))


# --------------------------------------------------------------------------------------------
# Measuring


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device, runs: int) -> float:
    from tinysr_cli.bench import time_call

    return statistics.median(time_call(fn, device, runs))


def _peak(device):
    from tinysr_cli.bench import peak_memory

    return peak_memory(device)


def _row(name: str, note: str = "") -> dict:
    return {"pipeline": name, "status": "ok", "batch1_ms": None, "batch1_images_per_s": None, "best_batch": None,
            "best_images_per_s": None, "peak_device_mib": None, "peak_host_mib": None, "note": note}


def _sweep(row: dict, call, make_input, batches, device, runs: int, box: Box) -> None:
    """Fill ``row`` with batch-1 latency and the best images/s over ``batches`` (images per call)."""
    with _peak(device) as peak:
        for batch in batches:
            box.check(f"{row['pipeline']} batch {batch}")
            images = make_input(batch)
            try:
                seconds = _median_seconds(lambda: call(images), device, runs)
            except Exception as exc:  # noqa: BLE001 - a batch that does not fit ends the sweep
                if "out of memory" not in str(exc).lower() or batch == batches[0]:
                    raise
                row["note"] = (row["note"] + f"; batch {batch} out of memory").lstrip("; ")
                break
            rate = batch / seconds
            if batch == 1:
                row["batch1_ms"], row["batch1_images_per_s"] = round(seconds * 1000, 2), round(rate, 2)
            if row["best_images_per_s"] is None or rate > row["best_images_per_s"]:
                row["best_batch"], row["best_images_per_s"] = batch, round(rate, 2)
    for key, value in (("peak_device_mib", peak["device_mib"]), ("peak_host_mib", peak["host_mib"])):
        if value is not None:
            row[key] = max(row[key] or 0, value)


def part_tests(scale: Scale, device, out: Path, box: Box) -> dict:
    """The CUDA-marked tests, in a pytest subprocess; per-test outcomes from its JUnit report."""
    junit = out / "cuda_tests.xml"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={junit}",
               str(ROOT / "tests" / "test_cuda.py"), str(ROOT / "tests" / "test_multi_device.py")]
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(box.left(), 1))
    except subprocess.TimeoutExpired as exc:
        raise PartTimeout(f"pytest ran past the {box.seconds:.0f} s time box") from exc
    tests = {}
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                element = case.find(tag)
                if element is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    message = (element.get("message") or "")[:300]
            tests[case.get("name")] = {"outcome": outcome, "seconds": round(float(case.get("time") or 0), 2), "message": message}
    failed = [name for name, t in tests.items() if t["outcome"] in {"failed", "error"}]
    return {
        "status": "ok" if done.returncode in (0, 5) and not failed else "failed",
        "pytest_exit": done.returncode,
        "tests": tests,
        "output_tail": (done.stdout + done.stderr)[-1500:],
    }


def part_side_by_side(scale: Scale, device, out: Path, box: Box) -> dict:
    import torch

    from tinysr_cli import bench
    from tinysr_cli.engine.upscaler import UpscaleOptions, Upscaler
    from tinysr_cli.models.tinysr import UPSCALE

    dtype = torch.float32 if scale.dry else torch.float16
    lr = scale.size // UPSCALE
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(max(scale.batches), 3, lr, lr, generator=generator)
    rows: list[dict] = []
    result = {"status": "ok", "size": scale.size, "rows": rows}

    def attempt(row: dict, body) -> None:
        rows.append(row)
        box.publish(result)
        try:
            body(row)
        except PartTimeout as exc:
            row["status"], row["note"] = "skipped", str(exc)
        except ImportError as exc:
            row["status"], row["note"] = "not available", f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - one pipeline's failure is recorded, the others still run
            row["status"], row["note"] = "failed", f"{type(exc).__name__}: {exc}"[:400]
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            box.publish(result)

    model = make_model(scale)
    ours = Upscaler(model, device=device, dtype=dtype)

    def engine(upscaler: Upscaler, batches):
        def body(row: dict) -> None:
            _sweep(row, upscaler.upscale_batch, lambda n: base[:n], batches, device, scale.runs, box)
        return body

    attempt(_row("tinysr", f"eager; up to {ours.batch_size} tiles x images per pass, chosen from free memory"), engine(ours, scale.batches))
    best = next((r["best_batch"] for r in rows if r["best_batch"]), 1)
    pair = tuple(sorted({1, best}))

    def official(row: dict) -> None:
        slow = Upscaler(bench.official_style(ours.model), device=device, dtype=dtype, options=UpscaleOptions(batch_size=1))
        _sweep(row, slow.upscale_batch, lambda n: base[:n], pair, device, scale.runs, box)

    attempt(_row("official-style", "run-time modulation, unmerged rank-64 LoRA, one tile per pass"), official)

    def tsdsr(row: dict) -> None:
        box.check("TSD-SR")
        configs = (TSDSR_DRY_TRANSFORMER, TSDSR_DRY_VAE, 5) if scale.dry else (None, None, bench.TSD_SR_PROMPT_TOKENS)
        with _peak(device) as peak:
            run = bench.tsdsr_pipeline(device, dtype, *configs)
            seconds = _median_seconds(lambda: run(base[0]), device, max(1, min(scale.runs, 5)))
        row.update(batch1_ms=round(seconds * 1000, 2), batch1_images_per_s=round(1 / seconds, 2), best_batch=1,
                   best_images_per_s=round(1 / seconds, 2), peak_device_mib=peak["device_mib"], peak_host_mib=peak["host_mib"])

    attempt(_row("tsdsr-architecture", "random SD3-medium + SD3 VAE, 333 text tokens, batch 1"), tsdsr)

    for name in ("realesrgan-x4plus", "span-x4"):
        def peer(row: dict, name=name) -> None:
            module = peer_module(name, scale.dry).to(device, dtype).eval().requires_grad_(False)

            @torch.inference_mode()
            def call(images: torch.Tensor) -> torch.Tensor:
                return module(images.to(device, dtype)).float().cpu()

            _sweep(row, call, lambda n: base[:n], pair, device, scale.runs, box)
            del module

        attempt(_row(name, "random weights of the real architecture (spandrel)"), peer)

    return _finish_rows(result, rows[0]["batch1_ms"])


def _finish_rows(result: dict, reference_ms: float | None) -> dict:
    for row in result["rows"]:
        row["paper_v100_ms"] = PAPER_V100_MS.get(row["pipeline"])
        row["batch1_vs_tinysr"] = round(row["batch1_ms"] / reference_ms, 2) if reference_ms and row["batch1_ms"] else None
    if any(row["status"] == "failed" for row in result["rows"]):
        result["status"] = "failed"
    return result


def part_compiled(scale: Scale, device, out: Path, box: Box, earlier: dict) -> dict:
    """Our engine through torch.compile and CUDA graphs: last, since compiling takes the longest.

    Batch 1 for every mode first, then the eager engine's best batch (one compilation per shape).
    """
    import torch

    from tinysr_cli.engine.upscaler import UpscaleOptions, Upscaler
    from tinysr_cli.models.tinysr import UPSCALE

    dtype = torch.float32 if scale.dry else torch.float16
    eager = next((r for r in earlier.get("rows", []) if r["pipeline"] == "tinysr"), {})
    best = eager.get("best_batch") or 1
    lr = scale.size // UPSCALE
    base = torch.rand(best, 3, lr, lr, generator=torch.Generator().manual_seed(0))
    model = make_model(scale)
    rows, upscalers = [], {}
    for mode in scale.compile_modes:
        row = _row(f"tinysr+{mode}", f"torch.compile ({mode}), fixed tile shape")
        rows.append(row)
        if mode == "cudagraphs" and device.type != "cuda":
            row["status"], row["note"] = "skipped", "CUDA graphs need a CUDA device"
            continue
        upscalers[mode] = Upscaler(model, device=device, dtype=dtype, options=UpscaleOptions(compile=mode))
    for batch in sorted({1, best}):
        for row, mode in zip(rows, scale.compile_modes):
            if mode not in upscalers or row["status"] != "ok":
                continue
            try:
                _sweep(row, upscalers[mode].upscale_batch, lambda n: base[:n], (batch,), device, scale.runs, box)
            except PartTimeout as exc:
                row["note"] += f"; {exc}"
            except Exception as exc:  # noqa: BLE001 - one mode's failure is recorded, the others still run
                row["status"], row["note"] = "failed", f"{type(exc).__name__}: {exc}"[:400]
            box.publish({"size": scale.size, "rows": rows})
    return _finish_rows({"status": "ok", "size": scale.size, "rows": rows}, eager.get("batch1_ms"))


TSDSR_DRY_TRANSFORMER = dict(
    sample_size=32, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8, num_attention_heads=2,
    joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=16, pos_embed_max_size=32,
)
TSDSR_DRY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
    scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False,
)


def peer_module(name: str, dry: bool):
    """A pixel-space peer with random weights of its real architecture (tiny widths when ``dry``).

    ``tinysr_cli.weights.peers`` is imported only to learn whether the peers are part of this
    build; its ``load_peer_model`` needs the weights wheels, which a bare GPU machine lacks.
    """
    import importlib

    import torch

    importlib.import_module("tinysr_cli.weights.peers")
    from spandrel.architectures.ESRGAN import ESRGAN
    from spandrel.architectures.SPAN import SPAN

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if name == "realesrgan-x4plus":
            return ESRGAN(in_nc=3, out_nc=3, num_filters=8 if dry else 64, num_blocks=1 if dry else 23, scale=4)
        return SPAN(num_in_ch=3, num_out_ch=3, feature_channels=8 if dry else 48, upscale=4)


def part_large_image(scale: Scale, device, out: Path, box: Box) -> dict:
    import torch

    from tinysr_cli.engine.upscaler import Upscaler

    dtype = torch.float32 if scale.dry else torch.float16
    width, height = scale.large
    upscaler = Upscaler(make_model(scale), device=device, dtype=dtype)
    warm = torch.rand(3, upscaler.min_lr_side, upscaler.min_lr_side)
    upscaler.upscale(warm)  # kernels chosen, allocator warm: the timing is the image's own
    box.check("the large image")
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0))
    tiles = []
    with _peak(device) as peak:
        _sync(device)
        start = time.perf_counter()
        result = upscaler.upscale(image, lambda stage, done, total: tiles.append(total))
        _sync(device)
        seconds = time.perf_counter() - start
    peak_gib = None if peak["device_mib"] is None else round(peak["device_mib"] / 1024, 2)
    return {
        "status": "ok",
        "input": f"{width}x{height}",
        "output": f"{result.shape[-1]}x{result.shape[-2]}",
        "backbone_tiles": tiles[-1] if tiles else None,
        "tiles_per_pass": upscaler.tiles_per_pass(1),
        "wall_s": round(seconds, 2),
        "peak_device_gib": peak_gib,
        "peak_host_mib": peak["host_mib"],
        "goal": f"peak device memory within {LARGE_GOAL_GIB} GB",
        "goal_met": None if peak_gib is None else peak_gib <= LARGE_GOAL_GIB,
    }


def part_video(scale: Scale, device, out: Path, box: Box) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from video_fps import make_clip

    from tinysr_cli.engine.upscaler import Upscaler
    from tinysr_cli.io.video import DEFAULT_BATCH_SIZE, upscale_video

    dtype = torch.float32 if scale.dry else torch.float16
    width, height = scale.video
    upscaler = Upscaler(make_model(scale), device=device, dtype=dtype)
    model_seconds = 0.0

    def timed(frames: torch.Tensor) -> torch.Tensor:
        nonlocal model_seconds
        start = time.perf_counter()
        result = upscaler.upscale_batch(frames)
        model_seconds += time.perf_counter() - start
        return result

    with tempfile.TemporaryDirectory() as folder:
        source, output = Path(folder) / "in.mp4", Path(folder) / "out.mp4"
        make_clip(source, scale.video_frames, width, height)
        upscaler.upscale_batch(torch.rand(1, 3, height, width))  # warm-up outside the timing
        box.check("the video")
        model_seconds = 0.0
        start = time.perf_counter()
        result = upscale_video(source, output, timed, batch_size=DEFAULT_BATCH_SIZE)
        wall = time.perf_counter() - start
    fps = result.frames / wall
    return {
        "status": "ok",
        "input": f"{width}x{height}",
        "output": f"{result.width}x{result.height}",
        "frames": result.frames,
        "frames_per_s": round(fps, 3),
        "model_share_of_wall": round(model_seconds / wall, 3),
        "model_only_frames_per_s": round(result.frames / model_seconds, 3) if model_seconds else None,
        "encoder": result.encoder,
        "frames_per_call": DEFAULT_BATCH_SIZE,
        "goal": f">= {VIDEO_GOAL_FPS} frames/s on one H100",
        "goal_met": None if scale.dry else fps >= VIDEO_GOAL_FPS,
    }


def device_peak_tflops(name: str) -> float | None:
    """Dense fp16/bf16 tensor-core peak by device name, None when unknown."""
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


def backbone_flops(config, batch: int, tile: int) -> int:
    """FLOPs of one backbone pass over ``batch`` tiles, counted on the meta device (attention included)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tinysr_cli.models.transformer import TinySRTransformer

    with torch.device("meta"):
        backbone = TinySRTransformer(config)
        crops = torch.empty(batch, config.latent_channels, tile, tile)
    with FlopCounterMode(display=False) as counter:
        backbone(crops)
    return counter.get_total_flops()


def part_roofline(scale: Scale, device, out: Path, box: Box, device_name: str) -> dict:
    import torch

    dtype = torch.float32 if scale.dry else torch.float16
    model = make_model(scale)
    config = model.config.transformer
    tile, batch = config.max_latent_size, scale.roofline_batch
    flops = backbone_flops(config, batch, tile)
    backbone = model.transformer.to(device, dtype).eval().requires_grad_(False)
    crops = torch.randn(batch, config.latent_channels, tile, tile, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    box.check("timing the backbone")
    with torch.inference_mode():
        seconds = _median_seconds(lambda: backbone(crops), device, max(scale.runs, 3))
    achieved = flops / seconds / 1e12
    peak = None if scale.dry else device_peak_tflops(device_name)
    return {
        "status": "ok",
        "tiles": batch,
        "tile_latent_px": tile,
        "gflops_per_pass": round(flops / 1e9, 2),
        "ms_per_pass": round(seconds * 1000, 3),
        "achieved_tflops": round(achieved, 3),
        "peak_tflops": peak if peak is not None else "unknown",
        "share_of_peak": round(achieved / peak, 3) if peak else None,
        "sdpa_flash_enabled": bool(torch.backends.cuda.flash_sdp_enabled()) if device.type == "cuda" else None,
        "note": "eager backbone, FLOPs from FlopCounterMode on the meta device (matmuls, convs, attention)",
    }


# --------------------------------------------------------------------------------------------
# Report


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def markdown(data: dict) -> str:
    lines = [
        "# tinysr GPU check" + (" (CPU dry run: tiny model, tiny sizes, numbers mean nothing)" if data["dry_run_cpu"] else ""),
        "",
        f"Device: {data['device_name']} ({data['device']}), {data['precision']}, torch {data['torch']}, "
        f"Python {data['python']}, {data['cpu']}. Started {data['started']}, last written {data.get('finished', '-')}.",
        "Weights are random (the real architecture): speed does not depend on their values.",
        "",
    ]
    parts = data["parts"]
    for name, part in parts.items():
        lines += [f"## {name}: {part['status']}" + (f" ({part['seconds']} s)" if "seconds" in part else ""), ""]
        if part.get("error"):
            lines += ["```", part["error"][-1200:], "```", ""]
        if name == "tests" and "tests" in part:
            lines += ["| test | outcome | s | message |", "|---|---|---|---|"]
            lines += [f"| {t} | {r['outcome']} | {r['seconds']} | {r['message'][:120].replace('|', '/')} |" for t, r in part["tests"].items()]
            lines.append("")
        elif "rows" in part:
            lines += [
                f"One {part['size']}x{part['size']} output. Paper (V100): TinySR {PAPER_V100_MS['tinysr']} ms, "
                f"TSD-SR {PAPER_V100_MS['tsdsr-architecture']} ms.",
                "",
                "| pipeline | status | batch 1 ms | x tinysr | images/s b1 | best batch | images/s best | peak device MiB | paper V100 ms | note |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in part["rows"]:
                cells = [r["pipeline"], r["status"], r["batch1_ms"], r.get("batch1_vs_tinysr"), r["batch1_images_per_s"],
                         r["best_batch"], r["best_images_per_s"], r["peak_device_mib"], r.get("paper_v100_ms"), r["note"]]
                lines.append("| " + " | ".join(_cell(c).replace("|", "/") for c in cells) + " |")
            lines.append("")
        else:
            rows = [(k, v) for k, v in part.items() if k not in {"status", "seconds", "error"}]
            if rows:
                lines += ["| | |", "|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in rows] + [""]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Driver


def run_part(report: Report, name: str, scale: Scale, fn) -> None:
    import torch

    box = Box(scale.boxes[name], lambda partial: report.part(name, {**partial, "status": "running"}))
    report.data["running"] = name
    start = time.monotonic()
    try:
        result = fn(box)
    except PartTimeout as exc:
        result = {"status": "timed out", "error": str(exc)}
    except Exception:  # noqa: BLE001 - recorded; the next part still runs
        result = {"status": "failed", "error": traceback.format_exc()}
    finally:
        gc.collect()  # the part's models and compiled graphs, before the next part measures memory
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result["seconds"] = round(time.monotonic() - start, 1)
    report.data.pop("running", None)
    report.part(name, result)
    print(f"gpu_check: {name}: {result['status']} ({result['seconds']} s)", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for gpu_check.json, gpu_check.md and cuda_tests.xml")
    parser.add_argument("--dry-run-cpu", action="store_true", help="rehearse every part on the CPU with a tiny model")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset, run in this order")
    parser.add_argument("--budget-s", type=float, default=None, help="stop the whole check after this many seconds "
                        "(default 475 on a GPU, 200 for the dry run); the report marks the part that was running")
    args = parser.parse_args(argv)

    import torch

    scale = DRY if args.dry_run_cpu else GPU
    if args.budget_s is not None:
        scale = Scale(**{**scale.__dict__, "budget_s": args.budget_s})
    if not scale.dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; nothing checked (use --dry-run-cpu to rehearse on the CPU)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if scale.dry else "cuda:0")
    device_name = (platform.processor() or platform.machine()) if scale.dry else torch.cuda.get_device_name(device)
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out, scale, str(device), device_name)
    report.write()

    def out_of_time() -> None:
        try:
            with report.lock:
                running = report.data.pop("running", None)
                if running:
                    partial = dict(report.data["parts"].get(running, {}))
                    partial.update(status="timed out", error=f"the whole check's {scale.budget_s:.0f} s budget ran out here")
                    report.data["parts"][running] = partial
                report.data["aborted"] = f"stopped after {scale.budget_s:.0f} s"
                report.write()
            print(f"gpu_check: stopped after {scale.budget_s:.0f} s (report in {args.out})", file=sys.stderr, flush=True)
        finally:
            os._exit(1)

    watchdog = threading.Timer(scale.budget_s, out_of_time)
    watchdog.daemon = True
    watchdog.start()
    parts = {
        "tests": lambda box: part_tests(scale, device, args.out, box),
        "side_by_side": lambda box: part_side_by_side(scale, device, args.out, box),
        "large_image": lambda box: part_large_image(scale, device, args.out, box),
        "video": lambda box: part_video(scale, device, args.out, box),
        "roofline": lambda box: part_roofline(scale, device, args.out, box, device_name),
        "compiled": lambda box: part_compiled(scale, device, args.out, box, report.data["parts"].get("side_by_side", {})),
    }
    chosen = [name.strip() for name in args.parts.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in parts]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(parts)}")
    try:
        for name in chosen:
            run_part(report, name, scale, parts[name])
    finally:
        watchdog.cancel()
    statuses = [part["status"] for part in report.data["parts"].values()]
    print(f"gpu_check: report in {args.out / 'gpu_check.md'}", file=sys.stderr)
    return 0 if all(status == "ok" for status in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
