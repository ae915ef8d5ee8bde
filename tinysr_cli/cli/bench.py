"""`tinysr bench`: our engine vs the official-style pipeline, the TSD-SR architecture and pixel-space peers."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from tinysr_cli.cli import console


def bench_command(
    model: Annotated[Optional[str], typer.Option(help="Weights to time (default: random weights of --config).")] = None,
    config: Annotated[str, typer.Option(help="Named architecture when no --model is given: full or tiny.")] = "full",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto, fp32, fp16 or bf16.")] = "auto",
    size: Annotated[int, typer.Option(help="Output side of the latency test, pixels.")] = 512,
    large: Annotated[Optional[int], typer.Option(help="Output side of the throughput test (default 1024 on CPU, 2048 on GPU; 0 skips).")] = None,
    runs: Annotated[Optional[int], typer.Option(help="Timed runs after one warm-up (default 3 on CPU, 10 on GPU).")] = None,
    batch_size: Annotated[int, typer.Option(help="Our engine's tiles per pass; 0 = automatic.")] = 0,
    official: Annotated[bool, typer.Option(help="Also time the official-style pipeline.")] = True,
    tsdsr: Annotated[
        bool, typer.Option(help="Also time the TSD-SR architecture (builds 2.1 B random parameters: minutes on CPU; needs diffusers).")
    ] = False,
    span: Annotated[bool, typer.Option(help="Also time SPAN x4 (426 k params; needs tinysr\\[peers]).")] = False,
    realesrgan: Annotated[bool, typer.Option(help="Also time Real-ESRGAN x4plus (16.7 M params; needs tinysr\\[peers]).")] = False,
    compile_model: Annotated[bool, typer.Option("--compile", help="Also time our engine with torch.compile.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Time one SIZE x SIZE output and a large image, with peak memory, side by side.

    Ctrl-C stops the run and prints what was measured so far.
    """
    from tinysr_cli import bench
    from tinysr_cli.engine.device import resolve_device, resolve_precision
    from tinysr_cli.engine.upscaler import UpscaleOptions, Upscaler
    from tinysr_cli.errors import TinySRError
    from tinysr_cli.weights.format import init_weights

    if size % 16 or size < 16:
        raise TinySRError("--size must be a positive multiple of 16")
    target = resolve_device(device)
    dtype = resolve_precision(precision, target)
    on_gpu = target.type != "cpu"
    large = (2048 if on_gpu else 1024) if large is None else large
    runs = (10 if on_gpu else 3) if runs is None else runs
    engine = UpscaleOptions(batch_size=batch_size)
    if model:
        ours = Upscaler.from_pretrained(model, device=target, precision=dtype, options=engine, warn=console.warn)
    else:
        ours = Upscaler(init_weights(config, seed=0), device=target, dtype=dtype, options=engine)

    def step(message: str) -> None:
        if not json_output:
            console.note(message)

    results = []
    suite = bench.run_suite(
        ours, size, large, runs, official=official, tsdsr=tsdsr, span=span, realesrgan=realesrgan,
        compile_model=compile_model, step=step,
    )
    try:
        for measurement in suite:  # one at a time: Ctrl-C keeps what was measured
            results.append(measurement)
    except KeyboardInterrupt:
        if not results:
            raise
        console.note(f"interrupted: printing the {len(results)} result(s) measured so far")
    except TinySRError as exc:
        if exc.option != "official":
            raise
        raise TinySRError(exc.template, hint=f"{exc.hint_template}, or pass --no-official", option=exc.option) from None
    _report(results, target, dtype, size, large, json_output)


def _report(results, target, dtype, size, large, json_output) -> None:
    import json

    from rich.table import Table

    reference = results[0].latency_s
    rows = [{**r.to_dict(), "latency_vs_tinysr": round(r.latency_s / reference, 2)} for r in results]
    header = {"device": str(target), "precision": str(dtype).removeprefix("torch."), "size": size, "large": large}
    if json_output:
        console.stdout.print(json.dumps({**header, "results": rows}, indent=2), markup=False)
        return
    table = Table(title=f"{size}x{size} output on {target} ({header['precision']})")
    for column in ("pipeline", "latency (s)", "x tinysr", f"MP/s at {large}", "peak host MiB", "peak device MiB", "note"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["pipeline"], f"{row['latency_s']:.3f}", f"{row['latency_vs_tinysr']:.2f}",
            "-" if row["megapixels_per_s"] is None else f"{row['megapixels_per_s']:.3f}",
            f"{row['peak_host_mib']:.0f}", "-" if row["peak_device_mib"] is None else f"{row['peak_device_mib']:.0f}",
            row["note"],
        )
    console.stdout.print(table)
