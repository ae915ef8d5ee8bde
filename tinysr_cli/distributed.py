"""The batch job beyond one process: `--shard K/N` job arrays and a Ray Data pipeline.

Both run the per-file code path of `tinysr upscale` (``process_image`` / ``process_video``) unchanged,
so outputs are byte-identical to a single-process run with the same options: same names, atomic
writes (temporary name + rename), existing outputs skipped unless ``overwrite`` (re-runs resume),
and one outcome per input with the failure message of the single-process path.

Python API::

    from tinysr_cli.distributed import Worker, run_ray, shard_plan
    from tinysr_cli.pipeline import BatchOptions, plan_inputs

    worker = Worker(options)          # one upscaler, loaded on first use
    outcome = worker(job)             # Outcome(source, output, status, message, seconds, worker)
    outcomes = run_ray(plan, options, address="auto", workers=8)

Sharding (``--shard K/N``, K counted from 0 like ``SLURM_ARRAY_TASK_ID`` with ``--array=0-N-1``
and Kubernetes' ``JOB_COMPLETION_INDEX``): a job belongs to shard ``sha256(source path) mod N``,
the source path as planned from the INPUT arguments (give every shard the same arguments, from the
same working directory). A hash rather than the list index keeps a file in the same shard when
files are added or removed between the shards' start times, so no file is missed or done twice.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tinysr_cli.errors import TinySRError
from tinysr_cli.io.paths import Job, Plan
from tinysr_cli import storage
from tinysr_cli.storage import UriJob, job_for

if TYPE_CHECKING:
    from collections.abc import Callable

    from tinysr_cli.pipeline import BatchOptions, Upscalers

__all__ = [
    "Outcome",
    "Worker",
    "parse_shard",
    "shard_of",
    "shard_plan",
    "triage",
    "run_local",
    "run_ray",
    "run_here",
    "report",
]

# Fault injection for tests and chaos drills: "NAME=MARKER" makes a worker process exit hard
# (os._exit) when it starts the input called NAME while the file MARKER does not exist (it is
# created first, so the retry succeeds).
FAULT_ENV = "TINYSR_FAULT_EXIT"


@dataclass(frozen=True)
class Outcome:
    """What happened to one input. ``status``: "done", "skipped" or "failed"."""

    source: str
    output: str | None  # the file written (its format may have switched) or, when skipped, the existing one
    status: str
    message: str = ""
    seconds: float = 0.0
    worker: str = ""  # host:pid that processed it
    chunk: int = -1  # the chunk of a video cut for several workers (``run_ray(chunk_seconds=...)``); -1: a whole file


# --------------------------------------------------------------------------------------------- sharding


def parse_shard(text: str) -> tuple[int, int]:
    """"K/N" -> (K, N) with 0 <= K < N."""
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise TinySRError(f"--shard {text!r}: expected K/N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise TinySRError(f"--shard {text!r}: K counts from 0 and must be below N (0/{max(count, 1)} .. {max(count, 1) - 1}/{max(count, 1)})")
    return index, count


def shard_of(source: Path | str, count: int) -> int:
    """The shard (0 .. count-1) of an input: a stable hash of its path, the same in every process."""
    digest = hashlib.sha256(Path(source).as_posix().encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % count


def shard_plan(plan: Plan, index: int, count: int) -> Plan:
    """The part of ``plan`` shard ``index`` of ``count`` does (skipped notes partitioned the same way)."""
    return Plan(
        [job for job in plan.jobs if shard_of(job.source, count) == index],
        [(path, reason) for path, reason in plan.skipped if shard_of(path, count) == index],
    )


# ------------------------------------------------------------------------------------- the per-file path


def triage(plan: Plan, options: BatchOptions) -> tuple[list[Job], list[Outcome]]:
    """The checks `tinysr upscale` makes before loading the model: jobs to run, and outcomes decided
    already (output is the input, two inputs sharing an output, existing outputs skipped)."""
    pending: list[Job | UriJob] = []
    decided: list[Outcome] = []
    claimed: dict[str, str] = {}
    for job in plan.jobs:
        key = storage.identity(job.output)
        if key == storage.identity(job.source):
            decided.append(Outcome(str(job.source), None, "failed", f"{job.source}: the output path is the input file"))
        elif key in claimed:
            message = f"{job.source}: output {job.output} is also the output of {claimed[key]}"
            decided.append(Outcome(str(job.source), None, "failed", message))
        elif storage.exists(job.output) and not options.overwrite:
            decided.append(Outcome(str(job.source), str(job.output), "skipped", f"{job.output} exists (use --overwrite)"))
        else:
            claimed[key] = job.source
            pending.append(job)
    return pending, decided


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _maybe_fault(source: Path) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec or "=" not in spec:
        return
    name, marker = spec.split("=", 1)
    if source.name == name and not os.path.exists(marker):
        Path(marker).write_text(_worker_name())
        os._exit(1)


class Worker:
    """One upscaler per process, loaded on first use; ``worker(job)`` runs the single-process path."""

    def __init__(self, options):
        self.options = options
        self._upscaler = None

    @property
    def upscaler(self) -> Upscalers:
        if self._upscaler is None:
            from tinysr_cli.pipeline import load_upscaler

            self._upscaler = load_upscaler(self.options)
        return self._upscaler

    def __call__(self, job: Job | UriJob) -> Outcome:
        if isinstance(job, UriJob):
            return self._call_uri(job)

        from tinysr_cli.pipeline import input_kind, process_image, process_video

        source = str(job.source)
        if job.output.exists() and not self.options.overwrite:  # done meanwhile (another shard, a retry)
            return Outcome(source, str(job.output), "skipped", f"{job.output} exists (use --overwrite)", worker=_worker_name())
        started = time.perf_counter()
        try:
            _maybe_fault(job.source)
            if input_kind(job.source) == "video":
                written = process_video(self.upscaler, job, self.options).output
            else:
                written = process_image(self.upscaler, job, self.options).output
        except TinySRError as exc:
            message = str(exc) + (f" ({exc.hint})" if getattr(exc, "hint", None) else "")
            return Outcome(source, None, "failed", message, time.perf_counter() - started, _worker_name())
        except (OSError, ValueError, RuntimeError, MemoryError) as exc:
            message = f"{job.source}: {type(exc).__name__}: {exc}"
            return Outcome(source, None, "failed", message, time.perf_counter() - started, _worker_name())
        seconds = time.perf_counter() - started
        if written is None:
            return Outcome(source, None, "skipped", "the output exists (use --overwrite)", seconds, _worker_name())
        return Outcome(source, str(written), "done", "", seconds, _worker_name())

    def run_chunk(self, job: Job, chunk_json: str, parts: Path) -> Outcome:
        """One chunk of a video into ``parts`` (the driver joins them); a chunk done already is skipped."""
        from tinysr_cli.io import video, video_chunks
        from tinysr_cli.pipeline import ITEM_ERRORS

        chunk = video_chunks.Chunk.from_json(chunk_json)
        target = video_chunks.chunk_path(parts, chunk, job.output)
        source = str(job.source)
        if target.exists() or (job.output.exists() and not self.options.overwrite):
            return Outcome(source, str(target), "skipped", "done already", worker=_worker_name(), chunk=chunk.index)
        started = time.perf_counter()
        try:
            _maybe_fault(job.source)
            upscaler = self.upscaler
            video_chunks.upscale_chunk(
                job.source, chunk, target, upscaler.upscale_batch, codec=self.options.codec or video.default_codec(job.output),
                crf=self.options.crf, pix_fmt=self.options.pix_fmt,
                batch_size=1 if upscaler.device.type == "cpu" else video.DEFAULT_BATCH_SIZE,
            )
        except ITEM_ERRORS as exc:
            message = str(exc) if isinstance(exc, TinySRError) else f"{job.source}: {type(exc).__name__}: {exc}"
            return Outcome(source, None, "failed", message, time.perf_counter() - started, _worker_name(), chunk.index)
        return Outcome(source, str(target), "done", "", time.perf_counter() - started, _worker_name(), chunk.index)

    def _call_uri(self, job: UriJob) -> Outcome:
        """The local path on a scratch copy of the input, the result published to the output URI."""
        if not self.options.overwrite and storage.exists(job.output):
            return Outcome(job.source, job.output, "skipped", f"{job.output} exists (use --overwrite)", worker=_worker_name())
        started = time.perf_counter()
        local = None
        try:
            with storage.staged(job) as local:
                outcome = self(local)
                if outcome.status == "done":
                    published = storage.publish(Path(outcome.output), job, self.options.overwrite)
                    if published is None:
                        outcome = replace(outcome, output=None, status="skipped", message="the output exists (use --overwrite)")
                    else:
                        outcome = replace(outcome, output=published)
        except TinySRError as exc:
            return Outcome(job.source, None, "failed", str(exc), time.perf_counter() - started, _worker_name())
        message = outcome.message.replace(str(local.source), job.source).replace(str(local.output), job.output)
        output = job.output if outcome.status == "skipped" and outcome.output == str(local.output) else outcome.output
        return replace(outcome, source=job.source, output=output, message=message, seconds=time.perf_counter() - started)


def run_local(jobs: Iterable[Job], options: BatchOptions) -> Iterator[Outcome]:
    """The jobs one after another in this process (what a shard without Ray runs)."""
    worker = Worker(options)
    for job in jobs:
        yield worker(job)


# ---------------------------------------------------------------------------------------------- on Ray


def _require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise TinySRError("--ray needs Ray Data", hint="pip install 'tinysr[ray]'") from None
    return ray


class _RayUpscaler:
    """The Ray Data actor: one ``Worker`` (so one model) per actor process, rows in, outcomes out."""

    def __init__(self, options):
        self.worker = Worker(options)

    def __call__(self, batch: dict) -> dict:
        outcomes = [
            self.worker.run_chunk(Job(Path(str(s)), Path(str(o))), str(c), Path(str(p))) if str(c) else self.worker(job_for(str(s), str(o)))
            for s, o, c, p in zip(batch["source"], batch["output"], batch["chunk"], batch["parts"])
        ]
        import numpy as np

        columns = {key: [value if value is not None else "" for value in values] for key, values in _columns(outcomes).items()}
        return {key: np.asarray(values) for key, values in columns.items()}


def _columns(outcomes: list[Outcome]) -> dict[str, list]:
    return {key: [asdict(o)[key] for o in outcomes] for key in Outcome.__dataclass_fields__}


def connect(address: str | None) -> None:
    """Join ``address`` ("auto": the cluster `ray start` made; "ray://host:10001": a remote one), or start
    a private instance on this machine for "local"/None. Does nothing when Ray is initialised already."""
    ray = _require_ray()
    if ray.is_initialized():
        return
    if address in (None, "", "local"):
        ray.init(include_dashboard=False, log_to_driver=True, configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=True, configure_logging=False)


def _uses_gpu(options, resources: dict) -> bool:
    device = str(options.device)
    if device.startswith("cuda"):
        return True
    return device == "auto" and resources.get("GPU", 0) >= 1


def run_ray(
    plan: Plan,
    options: BatchOptions,
    *,
    address: str | None = None,
    workers: int | None = None,
    items_per_block: int = 16,
    chunk_seconds: float = 0,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Every job of ``plan`` through an actor pool on Ray; returns one outcome per job.

    The pool has ``workers`` actors (default: one per GPU of the cluster when the device is a GPU,
    else one per CPU), each holding one model. A worker process that dies (OOM killer, segfault,
    node lost) is restarted and its rows are retried up to three times; rows still lost after that
    are reported as failed, and the rest of the job goes on. ``on_outcome(outcome)`` is called as
    results stream in. With ``chunk_seconds``, videos are cut at keyframes into chunks of at least
    that length, upscaled on any workers and joined here (``tinysr_cli.io.video_chunks``).
    """
    ray = _require_ray()
    pending, outcomes = triage(plan, options)
    for outcome in outcomes:
        if on_outcome is not None:
            on_outcome(outcome)
    if not pending:
        return outcomes
    connect(address)
    from ray.data import DataContext

    resources = ray.cluster_resources()
    gpu = _uses_gpu(options, resources)
    if workers is None:
        workers = int(resources.get("GPU", 0)) if gpu else int(resources.get("CPU", 1))
    rows, videos = _rows(pending, options, chunk_seconds)
    workers = max(1, min(workers, len(rows)))
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.max_errored_blocks = -1  # a block lost after its retries fails its rows, not the job
    if hasattr(context, "print_on_execution_start"):
        context.print_on_execution_start = False
    blocks = max(1, min(len(rows), -(-len(rows) // items_per_block), 1_000_000))
    blocks = max(blocks, min(len(rows), workers * 2))
    with warnings.catch_warnings():  # Ray >= 2.5x deprecates passing max_restarts this way but has no other
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")  # (finite retries: a file that always kills its worker)
        dataset = _pipeline(ray, rows, blocks, options, workers, gpu)
    seen: set[str] = set()
    for row in dataset.iter_rows():
        outcome = Outcome(
            source=str(row["source"]),
            output=str(row["output"]) or None,
            status=str(row["status"]),
            message=str(row["message"]),
            seconds=float(row["seconds"]),
            worker=str(row["worker"]),
            chunk=int(row["chunk"]),
        )
        if outcome.chunk >= 0:
            outcome = videos[outcome.source].add(outcome)
            if outcome is None:  # chunks still to come
                continue
        seen.add(outcome.source)
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
    for job in pending:
        if str(job.source) not in seen:
            lost = Outcome(str(job.source), None, "failed", f"{job.source}: the worker was lost and its retries ran out")
            outcomes.append(lost)
            if on_outcome is not None:
                on_outcome(lost)
    return outcomes


# ------------------------------------------------------------------------------- videos in chunks


def _rows(pending: list, options, chunk_seconds: float) -> tuple[list[dict], dict[str, _SplitVideo]]:
    """Ray rows: one per file, or one per chunk of a video that ``chunk_seconds`` cuts in several."""
    from tinysr_cli.pipeline import input_kind
    from tinysr_cli.io import video_chunks

    rows, videos = [], {}
    for job in pending:
        row = {"source": str(job.source), "output": str(job.output), "chunk": "", "parts": ""}
        whole_only = isinstance(job, UriJob) or options.scale is not None or options.width or options.height
        if chunk_seconds and not whole_only and input_kind(job.source) == "video":
            try:
                chunks, _ = video_chunks.plan_chunks(job.source, job.output, chunk_seconds)
            except TinySRError:
                chunks = []  # the worker reports it, as the single-process path does
            if len(chunks) > 1:
                settings = repr((options.model, options.device, options.precision, options.engine, options.codec, options.crf, options.pix_fmt, chunk_seconds))
                parts = video_chunks.parts_folder(job.source, job.output, settings)
                videos[str(job.source)] = _SplitVideo(job, parts, chunks)
                rows.extend({**row, "chunk": chunk.to_json(), "parts": str(parts)} for chunk in chunks)
                continue
        rows.append(row)
    return rows, videos


class _SplitVideo:
    """The chunks of one video as they come back; joined when the last one is in."""

    def __init__(self, job: Job, parts: Path, chunks: list):
        self.job, self.parts, self.chunks, self.count = job, parts, chunks, len(chunks)
        self.outcomes: list[Outcome] = []

    def add(self, outcome: Outcome) -> Outcome | None:
        from tinysr_cli.io import video_chunks

        self.outcomes.append(outcome)
        if len(self.outcomes) < self.count:
            return None
        seconds = sum(o.seconds for o in self.outcomes)
        workers = ",".join(sorted({o.worker for o in self.outcomes if o.worker}))
        failed = [o for o in self.outcomes if o.status == "failed"]
        if failed:  # the chunks done are kept in the parts folder: a re-run does the rest
            return Outcome(str(self.job.source), None, "failed", failed[0].message, seconds, workers)
        if self.job.output.exists() and not any(o.status == "done" for o in self.outcomes):
            return Outcome(str(self.job.source), str(self.job.output), "skipped", f"{self.job.output} exists (use --overwrite)", seconds, workers)
        parts = [(self.chunks[o.chunk], Path(o.output)) for o in sorted(self.outcomes, key=lambda o: o.chunk)]
        started = time.perf_counter()
        try:
            video_chunks.join_chunks(self.job.source, parts, self.job.output)
        except (TinySRError, OSError) as exc:
            return Outcome(str(self.job.source), None, "failed", str(exc), seconds, workers)
        video_chunks.remove_parts(self.parts)
        return Outcome(str(self.job.source), str(self.job.output), "done", "", seconds + time.perf_counter() - started, workers)


def _pipeline(ray, rows: list[dict], blocks: int, options, workers: int, gpu: bool):
    from ray.data import ActorPoolStrategy

    return ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        _RayUpscaler,
        fn_constructor_kwargs={"options": options},
        batch_size=1,
        compute=ActorPoolStrategy(size=workers),
        num_gpus=1 if gpu else 0,
        num_cpus=0 if gpu else 1,
        max_restarts=3,
        max_task_retries=3,
    )


# ------------------------------------------------------------------------------------------- reporting


def report(outcome: Outcome, quiet: bool) -> None:
    """Print one outcome as `tinysr upscale` does: written paths on stdout, the rest on stderr."""
    from tinysr_cli.cli import console

    if outcome.status == "done":
        console.stdout.print(outcome.output, markup=False)
        if not quiet:
            console.note(f"{outcome.source} -> {outcome.output} ({outcome.seconds:.1f} s)")
    elif outcome.status == "failed":
        console.error(outcome.message)
    elif not quiet:
        console.note(f"skipped {outcome.source}: {outcome.message}")


def summarise(outcomes: list[Outcome], quiet: bool) -> list[tuple[Path, str]]:
    """The closing summary; returns the failures as (input, message) like ``run_batch``."""
    from tinysr_cli.cli import console

    failed = [o for o in outcomes if o.status == "failed"]
    done = sum(o.status == "done" for o in outcomes)
    skipped = sum(o.status == "skipped" for o in outcomes)
    if not quiet or failed:
        console.note(f"{done} upscaled, {skipped} skipped, {len(failed)} failed")
    for outcome in failed:  # as given: a URI is not a Path
        console.note(f"  failed: {outcome.source}")
    return [(Path(o.source), o.message) for o in failed]


def run_cluster(plan: Plan, options: BatchOptions, *, address: str | None, workers: int | None, chunk_seconds: float = 0) -> list[tuple[Path, str]]:
    """`tinysr upscale --ray`: the plan on Ray, reported like the single-process batch."""
    from tinysr_cli.cli import console

    if not options.quiet:
        for path, reason in plan.skipped:
            console.note(f"skipped {path}: {reason}")
    missing = _planning_failures(plan)
    outcomes = run_ray(
        plan, options, address=address, workers=workers, chunk_seconds=chunk_seconds, on_outcome=lambda o: report(o, options.quiet)
    )
    return summarise(missing + outcomes, options.quiet)


def _planning_failures(plan: Plan) -> list[Outcome]:
    """The inputs planning found missing (no such file, a pattern matching nothing), reported."""
    failures = [Outcome(str(path), None, "failed", message) for path, message in plan.failed]
    for outcome in failures:
        report(outcome, quiet=True)
    return failures


def run_here(plan: Plan, options: BatchOptions) -> list[tuple[Path, str]]:
    """`tinysr upscale` with URIs and without Ray: the jobs one after another in this process."""
    from tinysr_cli.cli import console

    if not options.quiet:
        for path, reason in plan.skipped:
            console.note(f"skipped {path}: {reason}")
    missing = _planning_failures(plan)
    pending, outcomes = triage(plan, options)
    for outcome in outcomes:
        report(outcome, options.quiet)
    for outcome in run_local(pending, options):
        report(outcome, options.quiet)
        outcomes.append(outcome)
    return summarise(missing + outcomes, options.quiet)
