"""What every training stage shares: accelerate setup, step-indexed data order, checkpoints, logs.

A run lives in one output folder::

    recipe.toml          the recipe the run started with (a resumption must match it)
    checkpoints/step-N/  accelerate state: models, optimisers, schedulers, grad scaler, RNG states,
                         and the run's step counter; the newest ``keep_checkpoints`` are kept
    metrics.csv          one row per ``log_every`` steps (window means); TensorBoard too if installed

The data order is a function of the step: global batch ``s`` holds positions ``[s*B, (s+1)*B)`` of
an endless sequence of seeded per-epoch permutations, each process taking its slice. Resuming at
step ``s`` therefore needs nothing beyond the step counter, and gives the same batches.

Several processes (``accelerate launch --multi_gpu``, or ``torchrun``; on CPUs with
``ACCELERATE_USE_CPU=1``) train data-parallel: each takes its slice of the global batch, DDP averages
the gradients, and the logged metrics are the means over the processes. A launch whose processes do
not form one group is refused (``check_launch``) rather than run as unsynchronised copies.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from tinysr_cli.errors import TinySRError
from training.discriminator import DiscriminatorSpec, build_discriminator
from training.losses import hinge_discriminator_loss, hinge_generator_loss
from training.recipe_io import tomllib
from training.stages.recipe import OptimSpec, Recipe, resumable_view

if TYPE_CHECKING:
    from accelerate import Accelerator

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
RECIPE_COPY = "recipe.toml"
METRICS_FILE = "metrics.csv"


class Reporter(Protocol):
    """How stages talk to the user: the CLI renders these on stderr; library callers may ignore them."""

    def note(self, message: str) -> None: ...

    def progress(self, task: str, completed: int, total: int, metrics: dict[str, float]) -> None: ...


class SilentReporter:
    def note(self, message: str) -> None:
        pass

    def progress(self, task: str, completed: int, total: int, metrics: dict[str, float]) -> None:
        pass


@dataclass(frozen=True)
class StageResult:
    """What a stage produced; ``finished`` is False when it stopped early at ``stop_at_step``."""

    output: Path
    step: int
    finished: bool


class StepCounter:
    """The run's position, checkpointed with accelerate's custom-state mechanism."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


class StepBatches(torch.utils.data.Sampler):
    """Index lists of this process's share of every global batch from ``start_step`` on (endless)."""

    def __init__(self, length: int, global_batch: int, seed: int, start_step: int, rank: int = 0, world: int = 1) -> None:
        if global_batch % world:
            raise TinySRError(f"the batch size {global_batch} does not divide among {world} processes")
        self.length, self.global_batch, self.seed = length, global_batch, seed
        self.start_step, self.rank, self.per_process = start_step, rank, global_batch // world

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def batch_indices(self, step: int) -> list[int]:
        first = step * self.global_batch + self.rank * self.per_process
        out, cache = [], {}
        for position in range(first, first + self.per_process):
            epoch, offset = divmod(position, self.length)
            if epoch not in cache:
                cache = {epoch: self._permutation(epoch)}
            out.append(int(cache[epoch][offset]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield self.batch_indices(step)
            step += 1


def data_loader(dataset: torch.utils.data.Dataset, batches: StepBatches, num_workers: int) -> Iterator[dict[str, torch.Tensor]]:
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0
    )
    return iter(loader)


# ----------------------------------------------------------------------------- logs


class MetricsLog:
    """Window means of the step metrics, written to CSV (and TensorBoard when it is installed)."""

    def __init__(self, folder: Path, every: int, enabled: bool, resume_step: int) -> None:
        self.path, self.every, self.enabled = folder / METRICS_FILE, every, enabled
        self.window: dict[str, list[float]] = {}
        self.columns: list[str] | None = None
        self.writer = None
        if not enabled:
            return
        if self.path.exists():
            self._truncate_after(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        self.writer = SummaryWriter(str(folder / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """Rows after the resumed step belong to a run that was cut short: drop them."""
        with open(self.path, newline="") as handle:
            rows = list(csv.reader(handle))
        if not rows:
            return
        self.columns = rows[0][1:]
        kept = [rows[0]] + [row for row in rows[1:] if int(row[0]) <= step]
        with open(self.path, "w", newline="") as handle:
            csv.writer(handle).writerows(kept)

    def add(self, step: int, metrics: dict[str, float]) -> dict[str, float] | None:
        """Record one step's metrics; returns the window means when a row is written."""
        for name, value in metrics.items():
            self.window.setdefault(name, []).append(value)
        if step % self.every:
            return None
        means = {name: sum(values) / len(values) for name, values in self.window.items()}
        self.window = {}
        if self.enabled:
            self._write(step, means)
        return means

    def _write(self, step: int, means: dict[str, float]) -> None:
        new_file = not self.path.exists()
        if self.columns is None:
            self.columns = sorted(means)
        elif not set(means) <= set(self.columns):
            # A metric that starts later (a new phase, validation): widen the file, old rows blank there.
            self.columns = sorted(set(self.columns) | set(means))
            if not new_file:
                with open(self.path, newline="") as handle:
                    rows = list(csv.DictReader(handle))
                with open(self.path, "w", newline="") as handle:
                    writer = csv.DictWriter(handle, fieldnames=["step", *self.columns], restval="")
                    writer.writeheader()
                    writer.writerows(rows)
        with open(self.path, "a", newline="") as handle:
            writer = csv.writer(handle)
            if new_file:
                writer.writerow(["step", *self.columns])
            writer.writerow([step, *(repr(means[c]) if c in means else "" for c in self.columns)])
        if self.writer is not None:
            for name, value in means.items():
                self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of a metrics.csv as dicts (``step`` included), for reports and tests."""
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]


# ----------------------------------------------------------------------------- launches

CPU_LAUNCH = "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {n} -m tinysr_cli train ..."


class LaunchError(TinySRError):
    """The processes of a multi-process launch did not form one group; every process raises it."""


def _launcher_processes(argv: Sequence[str]) -> int | None:
    """``--num_processes`` of an ``accelerate launch`` command line (None for anything else)."""
    launch = any(
        (Path(token).name == "accelerate" and following == "launch") or Path(token).name == "accelerate-launch"
        or token == "accelerate.commands.launch"
        for token, following in zip(argv, [*argv[1:], ""])
    )
    if not launch:
        return None
    for index, token in enumerate(argv):
        if token in ("-m", "--module") or token.endswith(".py"):
            break  # the training script and its own arguments
        name, _, value = token.partition("=")
        if name in ("--num_processes", "--num-processes"):
            value = value or (argv[index + 1] if index + 1 < len(argv) else "")
            return int(value) if value.isdigit() else None
    return None


def _parent_argv() -> list[str]:
    try:
        import psutil  # an accelerate dependency

        return psutil.Process(os.getppid()).cmdline()
    except Exception:  # no psutil, no permission, parent gone: nothing to check
        return []


def launch_problem(num_processes: int, env: dict[str, str] | None = None, parent_argv: Sequence[str] | None = None) -> str | None:
    """Why this launch is not the data-parallel group it was asked to be, or None when it is.

    ``num_processes`` is what accelerate set up; the launcher's intent is read from ``WORLD_SIZE``
    (torchrun, ``accelerate launch --multi_gpu``) or from the parent ``accelerate launch`` command
    line (whose ``--cpu`` runs one process whatever ``--num_processes`` says).
    """
    env = os.environ if env is None else env
    world = env.get("WORLD_SIZE", "")
    if world.isdigit() and int(world) > 1 and int(world) != num_processes:
        n = int(world)
        why = "no GPU is visible and ACCELERATE_USE_CPU is not set" if num_processes == 1 else f"accelerate sees {num_processes}"
        return (
            f"the {n} launched processes did not form one training group ({why}), so each would train alone "
            f"into the same folder; on CPUs run: {CPU_LAUNCH.format(n=n)}"
        )
    if not world:
        asked = _launcher_processes(_parent_argv() if parent_argv is None else parent_argv)
        if asked is not None and asked > 1 and num_processes == 1:
            return (
                f"accelerate launch started 1 process, not {asked} (with --cpu, or without --multi_gpu, it runs one "
                f"process whatever --num_processes says); on CPUs run: {CPU_LAUNCH.format(n=asked)}"
            )
    return None


def check_launch(accelerator: Accelerator) -> None:
    """Refuse a launch whose processes do not form one group (see ``launch_problem``)."""
    problem = launch_problem(accelerator.num_processes)
    if problem is not None:
        raise LaunchError(problem)


# ----------------------------------------------------------------------------- the run


def resolve_mixed_precision(name: str) -> tuple[str, str | None]:
    """(precision accelerate gets, a note when it differs from the recipe's)."""
    if name == "fp16" and not torch.cuda.is_available():
        return "no", "fp16 mixed precision needs a GPU; training in float32"
    return name, None


def _forget_other_precision(precision: str) -> None:
    """Let a process that ran a stage in another precision run this one.

    accelerate keeps one process-wide ``AcceleratorState`` and refuses a second ``Accelerator`` with
    another ``mixed_precision``; a Python caller (or the tests) may run a bf16 stage after an fp32 one.
    Only that state is dropped: the process group (``PartialState``) stays.
    """
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != precision:
        AcceleratorState._reset_state(reset_partial_state=False)


class Run:
    """One stage's run: accelerate, output folder, step counter, checkpoints and logs."""

    def __init__(self, recipe: Recipe, output_dir: Path, resume: bool, reporter: Reporter) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        recipe.require("run")
        self.recipe, self.spec = recipe, recipe.run
        self.output_dir, self.reporter = Path(output_dir), reporter
        precision, note = resolve_mixed_precision(self.spec.mixed_precision)
        _forget_other_precision(precision)
        self.accelerator = Accelerator(mixed_precision=precision, step_scheduler_with_optimizer=False)
        check_launch(self.accelerator)
        if note and self.is_main:
            reporter.note(note)
        self.counter = StepCounter()
        self.accelerator.register_for_checkpointing(self.counter)
        self.checkpoint_to_load = self._prepare_folder(resume)
        set_seed(self.spec.seed)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def step(self) -> int:
        return self.counter.step

    @property
    def resuming(self) -> bool:
        return self.checkpoint_to_load is not None

    def _prepare_folder(self, resume: bool) -> Path | None:
        """Check the folder against ``resume``; save the recipe with a fresh run. Returns the checkpoint to load."""
        checkpoint = latest_checkpoint(self.output_dir)
        saved_recipe = self.output_dir / RECIPE_COPY
        if not resume and checkpoint is not None:
            raise TinySRError(
                f"{self.output_dir} already holds a run", hint="pass --resume to continue it, or choose another output folder"
            )
        if checkpoint is not None and saved_recipe.exists():
            if resumable_view(tomllib.loads(saved_recipe.read_text(encoding="utf-8"))) != resumable_view(self.recipe.raw):
                raise TinySRError(
                    f"{self.output_dir} was started with a different recipe",
                    hint=f"resume with the recipe saved in {saved_recipe}, or use another output folder",
                )
        self.accelerator.wait_for_everyone()
        if self.is_main and checkpoint is None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.recipe.path, saved_recipe)
        self.accelerator.wait_for_everyone()
        return checkpoint

    def restore_checkpoint(self) -> None:
        """Call after ``accelerator.prepare``: loads the newest checkpoint, if resuming."""
        if self.checkpoint_to_load is not None:
            self.accelerator.load_state(str(self.checkpoint_to_load))
            self.reporter.note(f"resumed from {self.checkpoint_to_load.name}")

    def save_checkpoint(self) -> Path:
        final = self.output_dir / CHECKPOINT_DIR / f"{CHECKPOINT_PREFIX}{self.step:08d}"
        partial = final.with_name(final.name + ".partial")
        if self.is_main and partial.exists():
            shutil.rmtree(partial)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(partial))
        self.accelerator.wait_for_everyone()
        if self.is_main:
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)
            for old in list_checkpoints(self.output_dir)[: -self.spec.keep_checkpoints]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return final

    def mean_over_processes(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each metric averaged over the processes (every process gets the means; one process: as is)."""
        if self.accelerator.num_processes == 1 or not metrics:
            return metrics
        names = sorted(metrics)
        values = torch.tensor([float(metrics[name]) for name in names], dtype=torch.float64, device=self.device)
        values = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(names, values.tolist()))

    def train(
        self,
        total_steps: int,
        batches: Iterator[dict[str, torch.Tensor]],
        step_fn: Callable[[dict[str, torch.Tensor], int], dict[str, float]],
        stop_at_step: int | None = None,
        task: str = "train",
    ) -> bool:
        """Run ``step_fn(batch, step)`` from the current step to ``total_steps``; True when finished.

        Checkpoints every ``checkpoint_every`` steps and when stopping (finished or at ``stop_at_step``).
        """
        log = MetricsLog(self.output_dir, self.spec.log_every, self.is_main, self.step)
        end = total_steps if stop_at_step is None else min(total_steps, stop_at_step)
        saved_at = self.step
        try:
            self.reporter.progress(task, self.step, total_steps, {})
            while self.step < end:
                batch = {name: value.to(self.device, non_blocking=True) for name, value in next(batches).items()}
                metrics = self.mean_over_processes(step_fn(batch, self.step))
                self.counter.step += 1
                means = log.add(self.step, metrics)
                self.reporter.progress(task, self.step, total_steps, means or {})
                if self.step % self.spec.checkpoint_every == 0:
                    self.save_checkpoint()
                    saved_at = self.step
            if saved_at != self.step:
                self.save_checkpoint()
        finally:
            log.close()
        return self.step >= total_steps


def list_checkpoints(output_dir: Path) -> list[Path]:
    folder = Path(output_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


# ----------------------------------------------------------------------------- optimisation


def make_optimizer(
    params: Sequence[torch.nn.Parameter], spec: OptimSpec, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW plus diffusers' LR schedule (``constant``, ``constant_with_warmup``, ``cosine``, ``linear``)."""
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(list(params), lr=spec.lr, weight_decay=spec.weight_decay)
    scheduler = get_scheduler(spec.lr_scheduler, optimizer, num_warmup_steps=spec.warmup_steps, num_training_steps=max(total_steps, 1))
    return optimizer, scheduler


def optimizer_step(
    run: Run, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, params: Sequence[torch.nn.Parameter]) -> float:
    """Unscale (fp16), clip to ``max_grad_norm``, step, advance the schedule; returns the gradient norm."""
    run.accelerator.unscale_gradients(optimizer=optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, run.spec.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def set_trainable(params: Sequence[torch.nn.Parameter], flag: bool) -> None:
    for param in params:
        param.requires_grad_(flag)


def finite_or_raise(value: float, what: str, step: int) -> float:
    if not math.isfinite(value):
        raise TinySRError(f"the {what} became {value} at step {step}", hint="lower the learning rate or use bf16/fp32")
    return value


class Adversary:
    """A stage's hinge-GAN discriminator: built, given its optimiser and prepared once; active from ``start_step``.

    ``model`` is the prepared (DDP-wrapped) module the discriminator's own step runs; the generator's
    term goes through the unwrapped module, so that it does not join DDP's gradient averaging twice.
    """

    def __init__(self, run: Run, spec: DiscriminatorSpec | None, optim: OptimSpec, steps: int, start_step: int) -> None:
        discriminator = build_discriminator(spec or DiscriminatorSpec())
        self.params = [p for p in discriminator.parameters() if p.requires_grad]
        optimizer, scheduler = make_optimizer(self.params, optim, steps - start_step)
        self.model, self.optimizer, self.scheduler = run.accelerator.prepare(discriminator, optimizer, scheduler)
        self.plain = run.accelerator.unwrap_model(self.model)
        self.run, self.start_step = run, start_step

    def active(self, step: int) -> bool:
        return step >= self.start_step

    def generator_loss(self, image: torch.Tensor) -> torch.Tensor:
        """The generator's hinge term; the discriminator's parameters get no gradient from it."""
        set_trainable(self.params, False)
        try:
            return hinge_generator_loss(self.plain(image))
        finally:
            set_trainable(self.params, True)

    def step(self, real: torch.Tensor, fake: torch.Tensor) -> float:
        """One hinge-loss step of the discriminator on real and (detached) generated images."""
        accelerator = self.run.accelerator
        with accelerator.autocast():
            real_logits, fake_logits = self.model(torch.cat([real, fake.detach()])).chunk(2)
            loss = hinge_discriminator_loss(real_logits, fake_logits)
        accelerator.backward(loss)
        optimizer_step(self.run, self.optimizer, self.scheduler, self.params)
        return loss.item()


def make_adversary(run: Run, recipe: Recipe, optim: OptimSpec, weight: float, steps: int, start_step: int) -> Adversary | None:
    """The recipe's discriminator when the GAN term is on (``weight > 0``) and starts before ``steps``."""
    if weight <= 0 or steps <= start_step:
        return None
    return Adversary(run, recipe.discriminator, optim, steps, start_step)


def image_terms(
    image: torch.Tensor,
    target: torch.Tensor,
    metrics: dict[str, float],
    *,
    perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    perceptual_weight: float,
    adversary: Adversary | None,
    gan_weight: float,
) -> torch.Tensor:
    """The perceptual and generator-GAN terms on a decoded image (zero when both are off)."""
    loss = image.new_zeros(())
    if perceptual is not None:
        term = perceptual(image, target)
        loss = loss + perceptual_weight * term
        metrics["perceptual_loss"] = term.item()
    if adversary is not None:
        term = adversary.generator_loss(image)
        loss = loss + gan_weight * term
        metrics["generator_loss"] = term.item()
    return loss
