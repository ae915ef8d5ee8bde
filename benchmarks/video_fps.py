"""Frames per second of `upscale_video` on a 480p clip (-> 1920p) with the full TinySR architecture.

Usage: python benchmarks/video_fps.py [--frames 8] [--size 640x480] [--batch-size 4]
                                      [--precision fp32] [--codec h264] [--threads N]
       python benchmarks/video_fps.py --config tiny --frames 2 --size 64x48   # plumbing check only

The clip (a moving pattern with a sine audio track) is generated in a temporary folder, the
weights are random (speed does not depend on their values), and the output is deleted. One JSON
line: end-to-end frames/s, the share of the wall time spent inside the model (close to 1 when
decoding and encoding overlap with it), and peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path


def make_clip(path: Path, frames: int, width: int, height: int, fps: int = 25) -> None:
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        audio = container.add_stream("aac", rate=48000)
        audio.codec_context.layout = "stereo"
        ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
        for index in range(frames):
            image = np.broadcast_to(ramp, (height, width, 3)).copy()
            image[:, (index * 16) % width : (index * 16) % width + 32] = 255
            image[..., 2] = np.linspace(0, 255, height)[:, None]
            frame = av.VideoFrame.from_ndarray(image.astype(np.uint8), format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
        samples = frames * 48000 // fps
        tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(samples) / 48000)).astype(np.float32)
        for start in range(0, samples, 1024):
            chunk = np.ascontiguousarray(np.stack([tone[start : start + 1024]] * 2))
            sound = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
            sound.sample_rate, sound.pts = 48000, start
            container.mux(audio.encode(sound))
        container.mux(audio.encode(None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", default="640x480", help="input WIDTHxHEIGHT (the output is 4x)")
    parser.add_argument("--batch-size", type=int, default=4, help="frames per upscaler call")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--codec", default="h264")
    parser.add_argument("--config", default="full", help="model architecture (tiny: plumbing check)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))

    import torch

    from tinysr_cli.engine.device import PRECISIONS
    from tinysr_cli.engine.upscaler import Upscaler
    from tinysr_cli.io.video import upscale_video
    from tinysr_cli.weights.format import init_weights

    if args.threads:
        torch.set_num_threads(args.threads)
    upscaler = Upscaler(init_weights(args.config, seed=0), device=args.device, dtype=PRECISIONS[args.precision])
    model_seconds = 0.0

    def timed_upscale(frames: torch.Tensor) -> torch.Tensor:
        nonlocal model_seconds
        start = time.perf_counter()
        out = upscaler.upscale_batch(frames)
        model_seconds += time.perf_counter() - start
        return out

    def report(progress) -> None:
        eta = f", ETA {progress.eta:.0f} s" if progress.eta is not None else ""
        print(f"  {progress.frames} frames, {progress.fps:.3f} frames/s{eta}", file=sys.stderr)

    with tempfile.TemporaryDirectory() as folder:
        source, output = Path(folder) / "in.mp4", Path(folder) / "out.mp4"
        make_clip(source, args.frames, width, height)
        start = time.perf_counter()
        result = upscale_video(source, output, timed_upscale, codec=args.codec, batch_size=args.batch_size, progress=report)
        wall = time.perf_counter() - start
        output_bytes = output.stat().st_size

    print(json.dumps({
        "input": f"{width}x{height}",
        "output": f"{result.width}x{result.height}",
        "frames": result.frames,
        "frames_per_s": round(result.frames / wall, 4),
        "s_per_frame": round(wall / result.frames, 2),
        "model_share_of_wall": round(model_seconds / wall, 3),
        "config": args.config,
        "precision": args.precision,
        "device": args.device,
        "batch_size": args.batch_size,
        "encoder": result.encoder,
        "output_mib": round(output_bytes / 2**20, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "threads": torch.get_num_threads(),
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
