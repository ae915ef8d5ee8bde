"""Inputs and outputs on object storage: a local S3-compatible server (moto) started here, and file://."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from cli_helpers import run_cli, tree_digest
from conftest import photo

pafs = pytest.importorskip("pyarrow.fs")
moto_server = pytest.importorskip("moto.server")

from tinysr_cli.cli.upscale import plan_uri_inputs  # noqa: E402
from tinysr_cli.cli.upscale_run import run_batch  # noqa: E402
from tinysr_cli.pipeline import BatchOptions, plan_inputs  # noqa: E402
from tinysr_cli.engine.upscaler import UpscaleOptions  # noqa: E402

BUCKET = "photos"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free local port; pyarrow (here and in subprocesses) finds it through
    AWS_ENDPOINT_URL. Yields a filesystem on it and the bucket's URI prefix."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    settings = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
    }
    try:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in settings.items():
                patch.setenv(key, value)
            filesystem = pafs.S3FileSystem(endpoint_override=settings["AWS_ENDPOINT_URL"], allow_bucket_creation=True)
            filesystem.create_dir(BUCKET)
            yield filesystem
    finally:
        server.stop()


def upload(filesystem, folder: Path, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with filesystem.open_output_stream(f"{prefix}/{path.relative_to(folder).as_posix()}") as stream:
                stream.write(path.read_bytes())


def bucket_digest(filesystem, prefix: str) -> dict[str, str]:
    """sha256 of every object below ``prefix`` (hidden ones too), keyed by relative key."""
    found = {}
    for info in filesystem.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            with filesystem.open_input_stream(info.path) as stream:
                found[info.path[len(prefix) + 1:]] = hashlib.sha256(stream.read()).hexdigest()
    return found


def options(weights, **changes) -> BatchOptions:
    return BatchOptions(
        model=str(weights), device="cpu", precision="fp32", engine=UpscaleOptions(), scale=None, width=None,
        height=None, quality=95, overwrite=False, quiet=True, **changes,
    )


@pytest.fixture
def folder(tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(photo("astronaut", (24, 20))).save(folder / "astronaut.png")
    Image.fromarray(photo("coffee", (20, 28))).save(folder / "sub" / "coffee.jpg", quality=90)
    Image.fromarray(photo("camera", (20, 24))).save(folder / "done.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"never listed")
    return folder


def test_s3_folder_to_s3_matches_the_local_run(tmp_path, folder, s3, tiny_weights, one_thread):
    reference = tmp_path / "ref"
    plan = plan_inputs([str(folder)], reference, video_only=False, images_only=False, recursive=True)
    assert [p.name for p, _ in run_batch(plan, options(tiny_weights))] == ["broken.png"]
    expected = tree_digest(reference)

    upload(s3, folder, f"{BUCKET}/in")
    with s3.open_output_stream(f"{BUCKET}/out/done.png") as stream:  # an earlier run's output
        stream.write(b"already done")
    result = run_cli("upscale", f"s3://{BUCKET}/in/", "-o", f"s3://{BUCKET}/out", "-r", "--model", tiny_weights)

    assert result.returncode == 1, result.stderr
    assert sorted(result.stdout.split()) == [f"s3://{BUCKET}/out/astronaut.png", f"s3://{BUCKET}/out/sub/coffee.jpg"]
    assert f"Error: s3://{BUCKET}/in/broken.png: " in result.stderr  # the URI, not the scratch copy
    assert f"failed: s3://{BUCKET}/in/broken.png" in result.stderr
    assert "2 upscaled, 1 skipped, 1 failed" in result.stderr
    assert f"skipped s3://{BUCKET}/in/notes.txt: not an image or video" in result.stderr
    got = bucket_digest(s3, f"{BUCKET}/out")
    assert got.pop("done.png") == hashlib.sha256(b"already done").hexdigest()  # skipped, untouched
    del expected["done.png"]
    assert got == expected  # byte-identical to the local run, no temporary key left

    again = run_cli("upscale", f"s3://{BUCKET}/in/", "-o", f"s3://{BUCKET}/out", "-r", "--model", tiny_weights)
    assert again.returncode == 1 and again.stdout == ""  # a re-run does nothing (the bad file fails again)
    assert "0 upscaled, 3 skipped, 1 failed" in again.stderr
    assert bucket_digest(s3, f"{BUCKET}/out") == {**got, "done.png": hashlib.sha256(b"already done").hexdigest()}


def test_planning_names_outputs_like_local_paths(folder, s3):
    upload(s3, folder, f"{BUCKET}/plan")
    uri = f"s3://{BUCKET}/plan"

    def names(inputs, output, **naming):
        plan = plan_uri_inputs(inputs, output, video_only=False, images_only=False, **naming)
        return [(job.source, job.output) for job in plan.jobs], [str(p) for p, _ in plan.skipped], [m for _, m in plan.failed]

    jobs, skipped, failed = names([uri], f"s3://{BUCKET}/x4", recursive=True)
    assert jobs == [
        (f"{uri}/astronaut.png", f"s3://{BUCKET}/x4/astronaut.png"),
        (f"{uri}/broken.png", f"s3://{BUCKET}/x4/broken.png"),
        (f"{uri}/done.png", f"s3://{BUCKET}/x4/done.png"),
        (f"{uri}/sub/coffee.jpg", f"s3://{BUCKET}/x4/sub/coffee.jpg"),
    ]
    assert skipped == [f"{uri}/notes.txt"] and failed == []
    # Beside the input with _x4, a glob, --format, a missing input, and the query string kept.
    jobs, _, failed = names([f"{uri}/*.png?region=us-east-1", f"{uri}/nope.png"], None, output_format="webp")
    assert jobs == [(f"{uri}/{n}.png?region=us-east-1", f"{uri}/{n}_x4.webp?region=us-east-1") for n in ("astronaut", "broken", "done")]
    assert failed == [f"{uri}/nope.png: no such file or folder"]
    # tinysr's own outputs found by a scan are left out.
    with s3.open_output_stream(f"{BUCKET}/plan/astronaut_x4.png") as stream:
        stream.write(b"x")
    jobs, skipped, _ = names([uri], None)
    assert f"{uri}/astronaut_x4.png" in skipped and [o for _, o in jobs][0] == f"{uri}/astronaut_x4.png"


def test_file_uris_publish_whole_files_only(tmp_path, folder, tiny_weights, one_thread):
    from tinysr_cli.distributed import run_local, triage

    out = tmp_path / "out"
    plan = plan_uri_inputs([f"file://{folder}/astronaut.png", f"file://{folder}/broken.png"], f"file://{out}", video_only=False, images_only=False)
    pending, decided = triage(plan, options(tiny_weights))
    assert decided == [] and len(pending) == 2
    outcomes = {Path(o.source).name: o for o in run_local(pending, options(tiny_weights))}
    assert outcomes["astronaut.png"].status == "done", outcomes["astronaut.png"].message
    assert outcomes["astronaut.png"].output == f"file://{out}/astronaut.png"
    assert outcomes["broken.png"].status == "failed" and outcomes["broken.png"].message.startswith(f"file://{folder}/broken.png: ")
    reference = tmp_path / "ref"
    run_batch(plan_inputs([str(folder / "astronaut.png")], reference, video_only=False, images_only=False), options(tiny_weights))
    assert (out / "astronaut.png").read_bytes() == (reference / "astronaut.png").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["astronaut.png"]  # no temporary file left
