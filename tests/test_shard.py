"""`tinysr upscale --shard K/N`: job arrays without Ray; the shards' union is the full run, disjoint."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from cli_helpers import tree_digest
from conftest import photo
from tinysr_cli.cli.upscale_run import run_batch
from tinysr_cli.pipeline import BatchOptions, plan_inputs
from tinysr_cli.engine.upscaler import UpscaleOptions
from tinysr_cli.distributed import parse_shard, shard_of, shard_plan
from tinysr_cli.errors import TinySRError
from tinysr_cli.io.paths import Job, Plan


def test_parse_shard():
    assert parse_shard("0/1") == (0, 1) and parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "-1/4", "1/0", "1", "a/b", "1/2/3"):
        with pytest.raises(TinySRError):
            parse_shard(bad)


def test_shard_of_is_a_stable_partition():
    # sha256 of the path, not Python's salted hash(): the same in every process and on every machine.
    assert shard_of("photos/a.png", 7) == int.from_bytes(hashlib.sha256(b"photos/a.png").digest()[:8], "big") % 7
    jobs = [Job(Path(f"in/{i}.png"), Path(f"out/{i}.png")) for i in range(200)]
    plan = Plan(jobs, [])
    parts = [shard_plan(plan, k, 3).jobs for k in range(3)]
    assert sorted(j.source for part in parts for j in part) == sorted(j.source for j in jobs)  # union, no repeats
    assert all(40 < len(part) < 95 for part in parts)  # roughly even
    # A file keeps its shard when others are added (the reason for a hash, not the list index).
    assert shard_plan(Plan(jobs[:50], []), 1, 3).jobs == [j for j in parts[1] if j in jobs[:50]]


def test_union_of_shards_is_the_full_run(tmp_path, tiny_weights, one_thread):
    """In process (the `--shard` option only filters the plan before `run_batch`): a CLI run per shard
    costs a Python start and a torch import each, minutes on the loaded test machine."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i, name in enumerate(["astronaut", "coffee", "chelsea", "rocket"]):
        Image.fromarray(photo(name, (24 + i, 20))).save(folder / f"{name}.png")
    options = BatchOptions(
        model=str(tiny_weights), device="cpu", precision="fp32", engine=UpscaleOptions(), scale=None, width=None,
        height=None, quality=95, overwrite=False, quiet=True,
    )

    def plan(out):
        return plan_inputs([str(folder)], tmp_path / out, video_only=False, images_only=False)

    assert run_batch(plan("full"), options) == []
    parts = [shard_plan(plan("sharded"), k, 2) for k in range(2)]
    assert not {j.source for j in parts[0].jobs} & {j.source for j in parts[1].jobs}  # disjoint
    assert sorted(j.source for p in parts for j in p.jobs) == sorted(j.source for j in plan("sharded").jobs)
    for part in parts:
        assert run_batch(part, options) == []
    assert tree_digest(tmp_path / "sharded") == tree_digest(tmp_path / "full")  # byte-identical union
