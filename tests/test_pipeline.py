"""The library behind `tinysr upscale`: a Python caller upscales a folder without Typer or a terminal."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import photo
from tinysr_cli.pipeline import BatchOptions, upscale_files


def test_a_folder_upscales_to_results_equal_to_the_engine_on_each_image(tmp_path, tiny_weights):
    from tinysr_cli.engine.upscaler import Upscaler
    from tinysr_cli.io.images import load_image, to_uint8
    from tinysr_cli.weights.format import load_weights

    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    Image.fromarray(photo("astronaut", (24, 20))).save(folder / "a.png")
    Image.fromarray(photo("coffee", (20, 28))).save(folder / "b.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    options = BatchOptions(model=str(tiny_weights), device="cpu", precision="fp32")

    results = {r.source.name: r for r in upscale_files([folder], out, options)}

    assert {name: r.status for name, r in results.items()} == {"a.png": "done", "b.png": "done", "broken.png": "failed"}
    assert results["broken.png"].output is None and results["broken.png"].message.startswith(str(folder / "broken.png"))
    model, _ = load_weights(tiny_weights)
    engine = Upscaler(model)
    for name in ("a.png", "b.png"):
        assert results[name].output == out / name
        expected = to_uint8(engine.upscale(load_image(folder / name).rgb))
        assert np.array_equal(np.asarray(Image.open(out / name)), expected)

    again = {r.source.name: r for r in upscale_files([folder], out, options)}  # a re-run resumes: nothing redone
    assert again["a.png"].status == again["b.png"].status == "skipped"
    assert again["a.png"].message == f"skipped {folder / 'a.png'}: {out / 'a.png'} exists (use overwrite)"


def test_the_pipeline_imports_no_cli_library():
    code = "import sys, tinysr_cli.pipeline; print(sorted({'typer', 'rich', 'click'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_library_errors_name_the_argument_and_the_cli_names_the_flag(tmp_path, tiny_weights):
    from cli_helpers import run_cli

    from tinysr_cli.engine.upscaler import Upscaler
    from tinysr_cli.errors import TinySRError

    with pytest.raises(TinySRError) as caught:
        Upscaler.from_pretrained(str(tiny_weights), device="cpu", precision="fp16")
    assert caught.value.option == "precision" and caught.value.hint == "use precision bf16 or fp32"
    assert "--" not in str(caught.value) + caught.value.hint
    Image.fromarray(photo("astronaut", (24, 20))).save(tmp_path / "a.png")
    result = run_cli("upscale", tmp_path / "a.png", "--model", tiny_weights, "--device", "cpu", "--precision", "fp16")
    assert result.returncode == 1
    assert result.stderr.splitlines()[-2:] == [
        "Error: fp16 is not supported on the CPU (slow and inaccurate there)", "Hint: use --precision bf16 or fp32",
    ]
