"""Run one training stage as one process of a multi-process launch, recording what this process did.

Launched by tests/training/test_multiprocess.py as ``torchrun ... ddp_driver.py STAGE RECIPE OUTPUT
RECORD_DIR``. Besides the run itself it writes ``RECORD_DIR/rank-N.json``: the batch indices this
process drew and the metrics its own step function returned (before the mean over processes).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

import training.stages.common as common
from training.stages import run_stage

stage, recipe, output, record_dir = sys.argv[1:5]
rank = int(os.environ.get("RANK", "0"))
record = {"rank": rank, "world": int(os.environ.get("WORLD_SIZE", "1")), "batches": [], "metrics": []}

original_indices = common.StepBatches.batch_indices


def batch_indices(self, step):
    indices = original_indices(self, step)
    record["batches"].append([step, indices])
    return indices


original_train = common.Run.train


def train(self, total_steps, batches, step_fn, stop_at_step=None, task="train"):
    def recorded(batch, step):
        metrics = step_fn(batch, step)
        record["metrics"].append([step, dict(metrics)])
        return metrics

    return original_train(self, total_steps, batches, recorded, stop_at_step, task)


common.StepBatches.batch_indices = batch_indices
common.Run.train = train
torch.set_num_threads(1)
result = run_stage(stage, Path(recipe), output=Path(output))
record["finished"] = result.finished
Path(record_dir).mkdir(parents=True, exist_ok=True)
(Path(record_dir) / f"rank-{rank}.json").write_text(json.dumps(record))
