"""The batch job on a local Ray cluster started here: byte-identical to `tinysr upscale`, failures
listed, a killed worker retried, a re-run doing nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from cli_helpers import run_cli, tree_digest
from conftest import local_ray, photo

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from tinysr_cli.cli.upscale_run import run_batch  # noqa: E402
from tinysr_cli.pipeline import BatchOptions, plan_inputs  # noqa: E402
from tinysr_cli.distributed import FAULT_ENV, run_ray  # noqa: E402
from tinysr_cli.engine.upscaler import UpscaleOptions  # noqa: E402



@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray instance for the module (2 CPUs). Its worker processes inherit this environment:
    the repository on PYTHONPATH, and the fault injection (exit hard on the first try of victim.png)."""
    marker = tmp_path_factory.mktemp("fault") / "victim-crashed"
    with local_ray(**{FAULT_ENV: f"victim.png={marker}"}) as address:
        yield address, marker


def _options(weights) -> BatchOptions:
    return BatchOptions(
        model=str(weights), device="cpu", precision="fp32", engine=UpscaleOptions(), scale=None, width=None,
        height=None, quality=95, overwrite=False, quiet=True,
    )


@pytest.fixture
def folder(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name, crop in [("astronaut", (24, 20)), ("coffee", (20, 28)), ("chelsea", (22, 22))]:
        Image.fromarray(photo(name, crop)).save(folder / f"{name}.png")
    Image.fromarray(photo("rocket", (20, 20))).save(folder / "victim.png")
    Image.fromarray(photo("camera", (20, 24))).save(folder / "done.jpg", quality=90)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_python_api_matches_the_single_process_run(tmp_path, folder, cluster, tiny_weights, one_thread):
    address, marker = cluster
    # The reference: the single-process batch `tinysr upscale` runs, in this process.
    failures = run_batch(plan_inputs([str(folder)], tmp_path / "ref", video_only=False, images_only=False), _options(tiny_weights))
    assert [path.name for path, _ in failures] == ["broken.png"]

    out = tmp_path / "ray"
    out.mkdir()
    (out / "done.jpg").write_bytes(b"already done")  # an earlier run's output: skipped, untouched
    plan = plan_inputs([str(folder)], out, video_only=False, images_only=False)
    outcomes = run_ray(plan, _options(tiny_weights), workers=2)

    by_name = {Path(o.source).name: o for o in outcomes}
    assert sorted(by_name) == ["astronaut.png", "broken.png", "chelsea.png", "coffee.png", "done.jpg", "victim.png"]
    assert by_name["done.jpg"].status == "skipped"
    assert by_name["broken.png"].status == "failed" and "broken.png" in by_name["broken.png"].message
    assert by_name["victim.png"].status == "done"
    # A file that shared the killed worker's block was written before the kill: its retry finds it.
    assert {o.status for n, o in by_name.items() if n not in ("done.jpg", "broken.png")} <= {"done", "skipped"}
    assert marker.exists()  # victim.png killed its worker once; the restarted actor did it
    assert len({o.worker for o in outcomes if o.worker}) >= 2  # two actors, or one restarted

    expected = tree_digest(tmp_path / "ref")
    del expected["done.jpg"]
    got = tree_digest(out)
    assert got.pop("done.jpg") != expected.get("done.jpg")
    assert got == expected  # byte-identical to the single-process path
    assert not list(out.glob(".*"))  # no temporary files left

    again = run_ray(plan, _options(tiny_weights), workers=2)  # a re-run does nothing
    assert sorted(o.status for o in again) == ["failed"] + ["skipped"] * 5
    assert tree_digest(out) == {**got, "done.jpg": tree_digest(out)["done.jpg"]}


def test_cli_joins_the_cluster(tmp_path, folder, cluster, tiny_weights):
    address, _ = cluster
    for name in ("victim.png", "broken.png", "done.jpg", "chelsea.png"):
        (folder / name).unlink()
    result = run_cli("upscale", folder, "-o", tmp_path / "out", "--model", tiny_weights, "--ray", address, "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert sorted(Path(line).name for line in result.stdout.split()) == ["astronaut.png", "coffee.png"]
    assert "2 upscaled, 0 skipped, 0 failed" in result.stderr
    assert "skipped " + str(folder / "notes.txt") + ": not an image" in result.stderr
    shutil.rmtree(tmp_path / "out")
