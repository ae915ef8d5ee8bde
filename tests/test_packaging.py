"""pyproject.toml lists packages by hand (for the weights/ mapping): keep the list complete."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("tinysr_cli", "training")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert found <= listed, f"add to pyproject packages: {sorted(found - listed)}"
    assert config["package-dir"]["tinysr_cli._registry"] == "weights"


def test_inference_imports_no_training_code():
    import subprocess
    import sys

    code = (
        "import sys, tinysr_cli.cli.main, tinysr_cli.engine.upscaler, tinysr_cli.weights.format;"
        "bad = [m for m in sys.modules if m.split('.')[0] in {'training', 'accelerate', 'peft'}];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
