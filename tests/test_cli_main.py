"""The entry point: every command's help renders, usage errors exit 2."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli_helpers import run_cli
from tinysr_cli.cli.main import app, weights_app

COMMANDS = [[c.name] for c in app.registered_commands] + [["weights", c.name] for c in weights_app.registered_commands]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_renders(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_expected_commands_exist():
    names = {" ".join(c) for c in COMMANDS}
    assert {"upscale", "info", "bench", "train", "weights init", "weights import-official", "weights download"} <= names


def test_usage_errors_exit_2_with_clicks_message():
    result = run_cli("upscale", "--no-such-option", "x.png")
    assert result.returncode == 2
    assert "No such option: --no-such-option" in result.stderr and "Traceback" not in result.stderr
