"""On a local Ray cluster started here: one video cut at keyframes over two workers and joined, against
the single-machine result; a folder on a local S3-compatible server (moto) in and out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_helpers import tree_digest
from conftest import local_ray, photo

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
av = pytest.importorskip("av")
moto_server = pytest.importorskip("moto.server")

from test_storage import BUCKET, bucket_digest, options, upload  # noqa: E402
from test_video import audio_packets, make_clip  # noqa: E402
from tinysr_cli.cli.upscale import plan_uri_inputs  # noqa: E402
from tinysr_cli.cli.upscale_run import run_batch  # noqa: E402
from tinysr_cli.pipeline import plan_inputs  # noqa: E402
from tinysr_cli.distributed import run_ray  # noqa: E402
from tinysr_cli.io import video_chunks  # noqa: E402



@pytest.fixture(scope="module")
def cluster(s3):
    """A local Ray instance (2 CPUs) started after the S3 server, so its workers inherit its settings."""
    with local_ray():
        yield


from test_storage import s3  # noqa: E402,F401  (the module-scoped server fixture)


def decoded(path: Path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [(f.pts, f.duration, f.to_ndarray(format="rgb24").astype(np.float64)) for f in container.decode(stream)]
        return stream.time_base, stream.codec_context.pix_fmt, (stream.width, stream.height), frames


def test_video_in_chunks_on_two_workers_matches_the_single_machine_result(tmp_path, cluster, tiny_weights, one_thread):
    clip = tmp_path / "in" / "clip.mp4"
    clip.parent.mkdir()
    # 16 frames at 25 fps, a closed GOP every 4 frames (0.16 s) with B-frames, AAC audio.
    make_clip(clip, frames=16, options={"g": "4", "keyint_min": "4", "sc_threshold": "0", "bf": "2"})
    chunks, reason = video_chunks.plan_chunks(clip, tmp_path / "x.mp4", 0.15)
    assert reason is None and [(c.start, c.end) for c in chunks] == [(0, 2560), (2560, 5120), (5120, 7680), (7680, None)]

    # Lossless H.264 (--crf 0): then each chunk's fresh encoder changes no pixel, and the frames must be
    # equal exactly. (At the default CRF 18 the two encodes of this noisy tiny-model output differ by
    # 28-33 dB PSNR per frame: each chunk starts with a keyframe and its own rate control.)
    lossless = options(tiny_weights, crf=0)
    run_batch(plan_inputs([str(clip)], tmp_path / "ref", video_only=False, images_only=False), lossless)
    plan = plan_inputs([str(clip)], tmp_path / "out", video_only=False, images_only=False)
    [outcome] = run_ray(plan, lossless, workers=2, chunk_seconds=0.15)
    assert outcome.status == "done", outcome.message
    reference, joined = decoded(tmp_path / "ref" / "clip.mp4"), decoded(tmp_path / "out" / "clip.mp4")

    assert joined[:3] == reference[:3]  # time base, pixel format, 256x192
    assert [f[:2] for f in joined[3]] == [f[:2] for f in reference[3]]  # 16 frames, each pts and duration
    assert audio_packets(tmp_path / "out" / "clip.mp4") == audio_packets(clip)  # byte-identical, same times
    assert all(np.array_equal(a[2], b[2]) for a, b in zip(joined[3], reference[3]))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["clip.mp4"]  # the chunks are gone

    [again] = run_ray(plan, lossless, workers=2, chunk_seconds=0.15)
    assert again.status == "skipped"


def test_s3_folder_on_ray_matches_the_local_run(tmp_path, cluster, s3, tiny_weights, one_thread):
    folder = tmp_path / "in"
    folder.mkdir()
    for name, crop in [("astronaut", (24, 20)), ("coffee", (20, 28))]:
        Image.fromarray(photo(name, crop)).save(folder / f"{name}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    run_batch(plan_inputs([str(folder)], tmp_path / "ref", video_only=False, images_only=False), options(tiny_weights))
    upload(s3, folder, f"{BUCKET}/ray-in")

    plan = plan_uri_inputs([f"s3://{BUCKET}/ray-in"], f"s3://{BUCKET}/ray-out", video_only=False, images_only=False)
    outcomes = {Path(o.source).name: o for o in run_ray(plan, options(tiny_weights), workers=2)}
    assert {n: o.status for n, o in outcomes.items()} == {"astronaut.png": "done", "coffee.png": "done", "broken.png": "failed"}
    assert outcomes["broken.png"].message.startswith(f"s3://{BUCKET}/ray-in/broken.png: ")
    assert bucket_digest(s3, f"{BUCKET}/ray-out") == tree_digest(tmp_path / "ref")
    again = run_ray(plan, options(tiny_weights), workers=2)
    assert sorted(o.status for o in again) == ["failed", "skipped", "skipped"]
