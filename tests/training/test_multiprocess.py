"""Two real CPU processes (torchrun, gloo) train data-parallel; launches that would not form one group are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import photo

pytest.importorskip("accelerate")
pytest.importorskip("peft")

from training.stages.common import launch_problem, list_checkpoints, read_metrics  # noqa: E402
from training.teacher import write_random_teacher  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_CPU")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """restore-stage1-tiny for 2 steps, listing its kept layers (no pruning run needed)."""
    root = tmp_path_factory.mktemp("ddp")
    write_random_teacher(root / "teacher", seed=5)
    (root / "photos").mkdir()
    for name in ("astronaut", "coffee"):
        Image.fromarray(photo(name)).save(root / "photos" / f"{name}.png")
    text = (ROOT / "training" / "recipes" / "restore-stage1-tiny.toml").read_text()
    for old, new in {'kept_layers = "runs/prune/prune_decision.json"': "kept_layers = [0, 2]", "steps = 6": "steps = 2", "samples = 8": "samples = 4", "checkpoint_every = 3": "checkpoint_every = 2"}.items():
        assert old in text, old
        text = text.replace(old, new)
    path = root / "restore.toml"
    path.write_text(text)
    return path


@pytest.mark.slow  # about 45-75 s on 2 shared cores: two processes each import torch and build the student
def test_two_cpu_processes_train_data_parallel(recipe):
    root = recipe.parent
    command = [*TORCHRUN, str(Path(__file__).with_name("ddp_driver.py")), "restore", str(recipe), str(root / "run"), str(root / "record")]
    done = subprocess.run(command, capture_output=True, text=True, env=_env(ACCELERATE_USE_CPU="1"), timeout=240, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((root / "record" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world"], r["finished"]) for r in ranks] == [(0, 2, True), (1, 2, True)]
    # Each process drew its own half of every global batch of 4.
    for step in (0, 1):
        halves = [dict(r["batches"])[step] for r in ranks]
        assert len(halves[0]) == len(halves[1]) == 2 and not set(halves[0]) & set(halves[1])
    # metrics.csv holds the means of the two processes' own metrics, one row per step, written once.
    rows = read_metrics(root / "run" / "metrics.csv")
    assert [row["step"] for row in rows] == [1.0, 2.0]
    for row, (step, mine), (_, theirs) in zip(rows, ranks[0]["metrics"], ranks[1]["metrics"]):
        assert mine["loss"] != theirs["loss"]
        for name in ("loss", "latent_loss", "hidden_loss", "grad_norm"):
            assert row[name] == pytest.approx((mine[name] + theirs[name]) / 2, rel=1e-12, abs=0), (step, name)
    checkpoints = list_checkpoints(root / "run")
    assert [c.name for c in checkpoints] == ["step-00000002"]
    names = sorted(p.name for p in checkpoints[0].iterdir())
    assert names.count("model.safetensors") == 1 and {"random_states_0.pkl", "random_states_1.pkl"} <= set(names)
    assert (root / "run" / "student.safetensors").is_file() and not list((root / "run").glob("*.partial"))


def test_processes_that_form_no_group_are_refused(recipe):
    """torchrun without ACCELERATE_USE_CPU on a CPU machine: two "process 0 of 1" copies, refused by one line."""
    root = recipe.parent
    output = root / "refused"
    command = [*TORCHRUN, "-m", "tinysr_cli", "train", "--stage", "restore", "--config", str(recipe), "-o", str(output)]
    done = subprocess.run(command, capture_output=True, text=True, env=_env(CUDA_VISIBLE_DEVICES=""), timeout=240, cwd=root)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "did not form one training group" in errors[0], done.stderr[-3000:]
    assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2" in errors[0]
    assert not output.exists()


def test_launch_problems_are_named():
    assert launch_problem(2, {"WORLD_SIZE": "2"}) is None
    assert launch_problem(1, {}, ["python", "-m", "tinysr_cli", "train"]) is None
    assert "did not form one training group" in launch_problem(1, {"WORLD_SIZE": "4"})
    accelerate = ["/venv/bin/python", "/venv/bin/accelerate", "launch", "--num_processes", "2", "--cpu", "-m", "tinysr_cli", "train"]
    message = launch_problem(1, {}, accelerate)
    assert "started 1 process, not 2" in message and "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2" in message
    assert "not 3" in launch_problem(1, {}, ["accelerate", "launch", "--num_processes=3", "x.py"])
    assert launch_problem(1, {}, ["accelerate", "launch", "--num_processes", "1", "x.py"]) is None
    assert launch_problem(1, {}, ["accelerate", "launch", "x.py", "--num_processes", "2"]) is None  # the script's own argument
