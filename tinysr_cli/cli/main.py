"""Entry point: wires the commands and holds the one error boundary.

Each command lives in its own module; this file only registers them. Heavy imports (torch,
diffusers, training code) happen inside the command modules, so ``tinysr --help`` stays fast.
"""

from __future__ import annotations

import os
import signal
import sys

import typer

from tinysr_cli import __version__
from tinysr_cli.cli import console
from tinysr_cli.errors import TinySRError

app = typer.Typer(
    name="tinysr",
    help="Upscale photos, folders and videos 4x with TinySR (one-step diffusion super-resolution).",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    add_completion=False,
)
weights_app = typer.Typer(
    help="Create, inspect, import, download and verify model weights.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(weights_app, name="weights")
metrics_app = typer.Typer(
    help="The offline perceptual metrics' weights (LPIPS, DISTS, NIQE) for tinysr eval.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(metrics_app, name="metrics")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tinysr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """tinysr: 4x super-resolution with TinySR."""


def _register() -> None:
    from tinysr_cli.cli import bench, compare, eval, hub, info, metrics, official, train, upscale, weights

    app.command("upscale", no_args_is_help=True)(upscale.upscale_command)
    app.command("train", no_args_is_help=True)(train.train_command)
    app.command("bench")(bench.bench_command)
    app.command("eval")(eval.eval_command)
    app.command("compare", no_args_is_help=True)(compare.compare_command)
    app.command("info")(info.info_command)
    weights_app.command("init")(weights.init_command)
    weights_app.command("info")(weights.info_command)
    weights_app.command("import-official", no_args_is_help=True)(official.import_official_command)
    weights_app.command("list")(hub.list_command)
    weights_app.command("download")(hub.download_command)
    weights_app.command("verify")(hub.verify_command)
    weights_app.command("path")(hub.path_command)
    weights_app.command("push")(hub.push_command)
    weights_app.command("remove")(hub.remove_command)
    metrics_app.command("fetch")(metrics.fetch_command)


_register()


def _is_usage_error(exc: Exception) -> bool:
    """Click's own errors (bad option, unknown command): Typer >= 0.26 vendors Click, so match by shape."""
    return callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so that every clean-up path runs; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP end a run the way Ctrl-C does: temporary files removed, summary printed."""
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _raise_interrupted)


def _signal_exit_code(exc: BaseException | None) -> int:
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt):
            return 128 + int(getattr(exc, "signum", signal.SIGINT))
        exc = exc.__cause__ or exc.__context__
    return 130


def main() -> None:
    """Run the CLI; known errors become one line on stderr and exit code 1."""
    install_signal_handlers()
    try:
        code = app(standalone_mode=False)
    except TinySRError as exc:
        console.error(exc.cli_message(), hint=exc.cli_hint())
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort as exc:  # Click turns KeyboardInterrupt into Abort
        console.error("interrupted")
        sys.exit(_signal_exit_code(exc))
    except KeyboardInterrupt as exc:
        console.error("interrupted")
        sys.exit(_signal_exit_code(exc))
    except Exception as exc:  # the boundary: no traceback unless asked for
        if _is_usage_error(exc):
            exc.show()
            sys.exit(exc.exit_code)
        if os.environ.get("TINYSR_DEBUG"):
            raise
        console.error(f"{type(exc).__name__}: {exc}", hint="set TINYSR_DEBUG=1 for the traceback")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
