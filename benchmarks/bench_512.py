"""Time one 512x512 output (128x128 LR) with the full TinySR architecture and random weights.

Usage: python benchmarks/bench_512.py [--precision fp32 bf16] [--runs 5] [--threads N]
Each precision runs in its own subprocess so that its peak memory (max RSS) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time


def measure(precision: str, runs: int, size: int) -> dict:
    import torch

    from tinysr_cli.engine.device import PRECISIONS
    from tinysr_cli.engine.upscaler import Upscaler
    from tinysr_cli.weights.format import init_weights

    upscaler = Upscaler(init_weights("full", seed=0), dtype=PRECISIONS[precision])
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, size // 4, size // 4, generator=generator)
    upscaler.upscale(image)  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        upscaler.upscale(image)
        times.append(time.perf_counter() - start)
    return {
        "precision": precision,
        "output": f"{size}x{size}",
        "median_s": round(statistics.median(times), 3),
        "min_s": round(min(times), 3),
        "runs": runs,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.runs, args.size)))
        return
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    for precision in args.precision:
        out = subprocess.run(
            [sys.executable, __file__, "--child", precision, "--runs", str(args.runs), "--size", str(args.size)],
            capture_output=True, text=True, check=True,
        )
        print(out.stdout.strip())


if __name__ == "__main__":
    main()
