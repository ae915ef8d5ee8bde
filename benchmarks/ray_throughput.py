"""Images per second of the Ray batch job with 1, 2, ... workers (issue 17).

    python benchmarks/ray_throughput.py --images 32 --size 48 --workers 1 2

Makes N small synthetic images and a tiny-config model (seeded, random weights: throughput only),
starts a local Ray instance with as many CPUs as the largest worker count, and times
``tinysr_cli.distributed.run_ray`` into a fresh folder per worker count (actor start-up and the
model load are included: that is what a user waits for). The single-process path
(``run_local``, what `tinysr upscale` runs) is timed first as the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tinysr_cli, not an installed one


def make_images(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        base = np.stack([np.sin(6 * xx + i), np.cos(5 * yy - i), np.sin(4 * (xx + yy))], axis=-1)
        noisy = (base * 0.4 + 0.5 + rng.normal(0, 0.03, base.shape)).clip(0, 1)
        Image.fromarray((noisy * 255).astype(np.uint8)).save(folder / f"img{i:04d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=48, help="square input side, pixels")
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import ray
    import torch

    from tinysr_cli.pipeline import BatchOptions, plan_inputs
    from tinysr_cli.distributed import run_local, run_ray
    from tinysr_cli.engine.upscaler import UpscaleOptions
    from tinysr_cli.weights.format import init_weights, save_weights

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="tinysr-ray-bench-"))
    (root / "in").mkdir()
    make_images(root / "in", args.images, args.size)
    weights = save_weights(init_weights(args.config, seed=0), root / "model.safetensors", provenance={"source": "bench"})
    options = BatchOptions(
        model=str(weights), device="cpu", precision="fp32", engine=UpscaleOptions(), scale=None, width=None,
        height=None, quality=95, overwrite=False, quiet=True,
    )
    # The repository first on the workers' path (they are separate processes).
    repo = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))

    results = []
    plan = plan_inputs([str(root / "in")], root / "single", video_only=False, images_only=False)
    started = time.perf_counter()
    outcomes = list(run_local(plan.jobs, options))
    seconds = time.perf_counter() - started
    assert all(o.status == "done" for o in outcomes), outcomes
    results.append({"mode": "single process", "workers": 1, "seconds": seconds, "images_per_s": args.images / seconds})

    ray.init(num_cpus=max(args.workers), include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        for workers in args.workers:
            plan = plan_inputs([str(root / "in")], root / f"ray{workers}", video_only=False, images_only=False)
            started = time.perf_counter()
            outcomes = run_ray(plan, options, workers=workers)
            seconds = time.perf_counter() - started
            assert all(o.status == "done" for o in outcomes), outcomes
            results.append({"mode": "ray", "workers": workers, "seconds": seconds, "images_per_s": args.images / seconds})
    finally:
        ray.shutdown()

    base = next(r for r in results if r["mode"] == "ray")["images_per_s"]
    print(f"# {args.images} images {args.size}x{args.size} -> {4 * args.size}x{4 * args.size}, config {args.config}, "
          f"{platform.node()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d')}")
    print("| mode | workers | wall (s) | images/s | x ray 1 worker |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['workers']} | {r['seconds']:.1f} | {r['images_per_s']:.2f} | {r['images_per_s'] / base:.2f} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
