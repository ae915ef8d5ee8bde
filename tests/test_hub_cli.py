"""`tinysr weights list|download|verify|path|push|remove` end to end, against a real local Hub server."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hubserver import HubServer, client_env
from tinysr_cli.weights.registry import load_registry

TOKEN = "hf_test_token"


def tinysr(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinysr_cli", "weights", *map(str, args)], env=env, capture_output=True, text=True, timeout=120)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Real tinysr files (tiny config, two seeds) and a safetensors file that is not tinysr's."""
    import torch
    from safetensors.torch import save_file

    from tinysr_cli.weights.format import init_weights, save_weights

    folder = tmp_path_factory.mktemp("clihub")
    made = {f"s{seed}": save_weights(init_weights("tiny", seed), folder / f"s{seed}.safetensors", provenance={"seed": seed}) for seed in (3, 4)}
    save_file({"weight": torch.ones(2, 2)}, folder / "foreign.safetensors")
    made["foreign"] = folder / "foreign.safetensors"
    return made


@pytest.fixture
def hub():
    with HubServer(token=TOKEN) as server:
        yield server


@pytest.fixture
def env(tmp_path, hub) -> dict:
    (tmp_path / "config" / "tinysr").mkdir(parents=True)
    return client_env(tmp_path, hub.endpoint)


def configure(env: dict, text: str) -> None:
    Path(env["XDG_CONFIG_HOME"], "tinysr", "config.toml").write_text(text)


def test_download_list_path_verify_remove(hub, env, files):
    team = files["s3"].read_bytes()
    commit = hub.add_commit("team/x4", {"model.safetensors": team})
    hub.add_commit("team/extra", {"model.safetensors": files["s4"].read_bytes()})
    hub.add_commit("team/foreign", {"model.safetensors": files["foreign"].read_bytes()})
    configure(env, f'[models.team-x4]\nrepo_id = "team/x4"\nfilename = "model.safetensors"\nrevision = "{commit}"\nsha256 = "{sha256(team)}"\nsize = {len(team)}\n')

    listed = json.loads(tinysr(env, "list", "--json").stdout)
    bundled = str(load_registry().get("tinysr-small-x4").bundled_path())
    assert {m["name"]: m["cached_path"] for m in listed["models"]} == {"tinysr-small-x4": bundled, "tinysr-x4": None, "team-x4": None}
    assert listed["default"] == "tinysr-small-x4" and listed["cache"] == str(Path(env["HF_HOME"]) / "hub")

    downloaded = tinysr(env, "download", "team-x4", "--quiet")
    assert downloaded.returncode == 0, downloaded.stderr
    path = Path(downloaded.stdout.strip())
    assert path.read_bytes() == team and path.is_relative_to(Path(env["HF_HOME"]) / "hub")
    assert tinysr(env, "download", "team/extra", "-q").returncode == 0
    assert "not a tinysr weights file" in tinysr(env, "download", "team/foreign", "-q").stderr

    listed = json.loads(tinysr(env, "list", "--json").stdout)
    models = {m["name"]: m for m in listed["models"]}
    assert models["team-x4"]["cached_path"] == str(path) and models["team-x4"]["cached_size"] == len(team)
    assert models["tinysr-x4"]["published"] is False and models["tinysr-x4"]["sha256"] is None
    assert [o["uri"] for o in listed["other_cached"]] == [f"hf://team/extra@{hub.repos['team/extra'].refs['main']}/model.safetensors"]
    table = tinysr(env, "list").stdout
    assert "team-x4" in table and "not published" in table and f"{len(team) / 1000:.1f} KB" in table

    shown = tinysr(env, "path", "team-x4")
    assert shown.returncode == 0 and shown.stdout.strip() == str(path)

    verified = tinysr(env, "verify", path)
    assert verified.returncode == 0, verified.stderr
    assert f"sha256   {sha256(team)}" in verified.stdout
    assert "checked  against registry entry team-x4" in verified.stdout and "registry team-x4" in verified.stdout

    removed = tinysr(env, "remove", "team-x4")
    assert removed.returncode == 0 and f"team-x4: removed 1 cached copy of model.safetensors, freed {len(team) / 1000:.1f} KB" in removed.stderr
    assert not path.exists() and not (Path(env["HF_HOME"]) / "hub" / "models--team--x4").exists()
    gone = tinysr(env, "path", "team-x4")
    assert gone.returncode == 1 and gone.stdout == ""
    assert "Error: team-x4 is not in the Hugging Face cache" in gone.stderr and "tinysr weights download team-x4" in gone.stderr
    again = tinysr(env, "remove", "team-x4")
    assert again.returncode == 0 and "team-x4: nothing cached" in again.stderr
    assert Path(tinysr(env, "path", "team/extra").stdout.strip()).read_bytes() == files["s4"].read_bytes()  # untouched


def test_verify_against_sha256_the_hub_and_nothing(hub, env, files):
    data = files["s3"].read_bytes()
    good = tinysr(env, "verify", files["s3"], "--sha256", sha256(data))
    assert good.returncode == 0 and "checked  against --sha256" in good.stdout
    bad = tinysr(env, "verify", files["s3"], "--sha256", "0" * 64)
    assert bad.returncode == 1 and bad.stdout == ""
    assert f"does not match the expected {'0' * 64}" in bad.stderr
    plain = tinysr(env, "verify", files["s3"], "--json")
    assert json.loads(plain.stdout)["checked_against"] == "nothing (pass --sha256 to compare)"
    assert json.loads(plain.stdout)["size"] == len(data)

    hub.add_commit("team/x4", {"model.safetensors": data})
    cached = Path(tinysr(env, "download", "team/x4", "-q").stdout.strip())
    hub_checked = tinysr(env, "verify", cached)
    assert "checked  against the Hub's LFS sha256" in hub_checked.stdout

    foreign = tinysr(env, "verify", files["foreign"])
    assert foreign.returncode == 1 and "not a tinysr weights file" in foreign.stderr


def test_push_uploads_weights_and_card_and_round_trips(hub, env, files):
    data = files["s4"].read_bytes()
    pushed = tinysr({**env, "HF_TOKEN": TOKEN}, "push", files["s4"], "team/pushed", "-m", "first upload")
    assert pushed.returncode == 0, pushed.stderr
    commit = hub.repos["team/pushed"].refs["main"]
    assert pushed.stdout.strip() == f"team/pushed@{commit}"
    assert hub.file_at("team/pushed", commit, "model.safetensors") == data
    card = hub.file_at("team/pushed", commit, "README.md").decode()
    assert card.startswith("---\nlicense: other\nlibrary_name: tinysr\n")
    assert f"| sha256 | `{sha256(data)}` |" in card and f"size = {len(data)}" in card and '"seed": 4' in card
    puts = [r for r in hub.requests if r.method == "PUT"]
    assert len(puts) == 1 and puts[0].path == f"/lfs-upload/{sha256(data)}"  # went through LFS, not inline
    assert f'revision = "{commit}"' in pushed.stderr

    fetched = tinysr(env, "download", pushed.stdout.strip(), "-q")
    assert Path(fetched.stdout.strip()).read_bytes() == data


def test_push_refusals(hub, env, files):
    denied = tinysr(env, "push", files["s3"], "team/pushed")  # no token
    assert denied.returncode == 1
    assert "Error: the Hub refused to write to team/pushed (HTTP 401)" in denied.stderr and "hf auth login" in denied.stderr
    assert "team/pushed" not in hub.repos

    hub.clear_log()
    foreign = tinysr({**env, "HF_TOKEN": TOKEN}, "push", files["foreign"], "team/pushed")
    assert foreign.returncode == 1 and "not a tinysr weights file" in foreign.stderr
    assert hub.requests == []  # refused before talking to the Hub


def test_pickles_local_files_and_unpublished_models(hub, env, tmp_path, files):
    pickle = tmp_path / "release.pth"
    pickle.write_bytes(b"\x80\x04not to be unpickled")
    refused = tinysr(env, "download", pickle)
    assert refused.returncode == 1
    assert "pickled checkpoints are not loaded" in refused.stderr and "tinysr weights import-official" in refused.stderr

    kept = tinysr(env, "remove", files["s3"])
    assert kept.returncode == 1 and "is a local file, not a cached Hub model" in kept.stderr
    assert files["s3"].exists()

    unpublished = tinysr(env, "download", "tinysr-x4")  # the authors' model, not on the Hub yet
    assert unpublished.returncode == 1 and unpublished.stdout == ""
    assert "Error: model 'tinysr-x4' is not published on the Hugging Face Hub yet" in unpublished.stderr
    assert "gdown" in unpublished.stderr and "import-official" in unpublished.stderr
    assert "not published" in tinysr(env, "path", "tinysr-x4").stderr
    assert tinysr(env, "path").stdout.strip().endswith("tinysr-small-x4.safetensors")  # the bundled default
    assert hub.requests == []
