"""Several devices in one process: the device list is parsed and checked, and the files of a batch are
shared among one model per device. Without a GPU the scheduler runs on two CPU "devices" (allowed in
the library only), which must give what one device gives; the two-GPU run is in ``test_two_gpus``."""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image

from cli_helpers import run_cli
from conftest import photo
from tinysr_cli.engine.device import resolve_devices
from tinysr_cli.errors import TinySRError, cli_text
from tinysr_cli.pipeline import BatchOptions, load_upscalers, upscale_files


@pytest.fixture
def two_visible_gpus(monkeypatch):
    """What torch reports on a two-GPU machine; nothing here touches a GPU (only names are checked)."""
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def _refusal(spec) -> str:
    with pytest.raises(TinySRError) as caught:
        resolve_devices(spec)
    assert caught.value.option == "device"
    return cli_text(caught.value.template)


def test_a_gpu_list_is_read_in_both_spellings(two_visible_gpus):
    expected = [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert resolve_devices("cuda:0,1") == resolve_devices("cuda:0,cuda:1") == resolve_devices(" CUDA:0, 1 ") == expected
    assert resolve_devices("cuda:1") == [torch.device("cuda", 1)]
    assert resolve_devices("cpu") == [torch.device("cpu")]


def test_bad_gpu_lists_are_refused_in_one_line_naming_the_option(two_visible_gpus):
    assert _refusal("cuda:0,2") == "--device cuda:2: only 2 CUDA device(s) are visible"
    assert _refusal("cuda:1,cuda:1") == "--device cuda:1,cuda:1: cuda:1 is listed twice"
    assert _refusal("cuda:0,1,1") == "--device cuda:0,1,1: cuda:1 is listed twice"
    assert _refusal("cuda:0,") == "--device cuda:0,: an empty entry in the list"
    assert _refusal("cuda:0,x") == "--device cuda:0,x: 'x' names no GPU index"
    assert _refusal("cuda,1") == "--device cuda,1: 'cuda' names no GPU index"
    for mixed in ("cpu,cuda:0", "cuda:0,cpu", "cpu,cpu", "cuda:0,mps"):
        assert _refusal(mixed) == f"--device {mixed}: only CUDA GPUs can be listed together (one CPU model already uses every core)"
    assert _refusal(["cpu", "cuda:0"]) == "--device cpu,cuda:0: mixes device types; list GPUs only, or one CPU"
    assert _refusal(["cuda:0", "cuda:0"]) == "--device cuda:0,cuda:0: cuda:0 is listed twice"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_a_gpu_list_without_cuda_is_refused():
    assert "CUDA" in _refusal("cuda:0,1")


def test_the_library_may_repeat_the_cpu():
    assert resolve_devices(["cpu", "cpu"]) == [torch.device("cpu")] * 2


class _ThreadRecorder:
    """An upscaler that notes the thread each image ran on (everything else is the real upscaler's)."""

    def __init__(self, upscaler, seen: list[str]):
        self._upscaler, self._seen = upscaler, seen

    def upscale(self, *args, **kwargs):
        self._seen.append(threading.current_thread().name)
        return self._upscaler.upscale(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._upscaler, name)


def test_two_devices_share_the_files_and_write_what_one_device_writes(tmp_path, tiny_weights, one_thread):
    folder = tmp_path / "in"
    folder.mkdir()
    names = [f"{index}.png" for index in range(6)]
    for index, name in enumerate(names):
        Image.fromarray(photo(("astronaut", "coffee", "chelsea")[index % 3], (20 + 4 * index, 24))).save(folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    one = BatchOptions(model=str(tiny_weights), device="cpu", precision="fp32")
    two = BatchOptions(model=str(tiny_weights), device=["cpu", "cpu"], precision="fp32")

    single = {r.source.name: r for r in upscale_files([folder], tmp_path / "one", one)}
    seen: list[str] = []
    upscalers = [_ThreadRecorder(upscaler, seen) for upscaler in load_upscalers(two)]
    shared = list(upscale_files([folder], tmp_path / "two", two, upscaler=upscalers))

    assert sorted(r.source.name for r in shared) == sorted([*names, "broken.png"])  # each file once
    assert len(seen) == len(names) and len(set(seen)) == 2
    by_name = {r.source.name: r for r in shared}
    assert by_name["broken.png"].status == "failed" and by_name["broken.png"].message == single["broken.png"].message
    for name in names:
        assert by_name[name].status == "done" and by_name[name].output == tmp_path / "two" / name
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    assert sorted(path.name for path in (tmp_path / "two").iterdir()) == sorted(names)  # no temporaries left

    again = list(upscale_files([folder], tmp_path / "two", two))  # a re-run loads no model and skips all
    assert {r.source.name: r.status for r in again} == {**dict.fromkeys(names, "skipped"), "broken.png": "failed"}


def test_a_bug_on_a_worker_thread_is_raised_to_the_caller(tmp_path, tiny_weights, one_thread):
    for index in range(3):
        Image.fromarray(photo("astronaut", (20, 20 + index))).save(tmp_path / f"{index}.png")
    options = BatchOptions(model=str(tiny_weights), device=["cpu", "cpu"], precision="fp32")

    class Broken(_ThreadRecorder):
        def upscale(self, *args, **kwargs):
            raise ZeroDivisionError("a bug, not a bad file")

    upscalers = [Broken(upscaler, []) for upscaler in load_upscalers(options)]
    with pytest.raises(ZeroDivisionError, match="a bug"):
        list(upscale_files([tmp_path], tmp_path / "out", options, upscaler=upscalers))


def test_the_cli_refuses_device_lists_it_cannot_use(tmp_path):
    Image.fromarray(photo("astronaut", (20, 20))).save(tmp_path / "a.png")
    result = run_cli("upscale", tmp_path / "a.png", "--device", "cpu,cpu")
    assert result.returncode == 1 and not (tmp_path / "a_x4.png").exists()
    assert result.stderr.splitlines()[-2:] == [
        "Error: --device cpu,cpu: only CUDA GPUs can be listed together (one CPU model already uses every core)",
        "Hint: several GPUs are written cuda:0,1 or cuda:0,cuda:1",
    ]
    result = run_cli("upscale", tmp_path / "a.png", "--device", "cuda:0,1", "--ray", "local")
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == "Error: --device cuda:0,1: with --ray each worker gets one GPU; use --workers to use several"


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus(tmp_path, tiny_weights):
    folder = tmp_path / "in"
    folder.mkdir()
    names = [f"{index}.png" for index in range(4)]
    for index, name in enumerate(names):
        Image.fromarray(photo("coffee", (64, 64 + 8 * index))).save(folder / name)
    single = BatchOptions(model=str(tiny_weights), device="cuda:0", precision="fp32")
    both = BatchOptions(model=str(tiny_weights), device="cuda:0,1", precision="fp32")

    assert [r.status for r in upscale_files([folder], tmp_path / "one", single)] == ["done"] * 4
    upscalers = load_upscalers(both)
    assert [upscaler.device for upscaler in upscalers] == [torch.device("cuda", 0), torch.device("cuda", 1)]
    shared = list(upscale_files([folder], tmp_path / "two", both, upscaler=upscalers))
    assert sorted(r.source.name for r in shared) == names and {r.status for r in shared} == {"done"}
    for name in names:  # two GPUs of one model: the same kernels, so the same bytes
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
