"""Model resolution against a real local Hub server: download, cache, pins, integrity, failures.

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when it is imported, so every
resolution runs in a fresh interpreter with its own environment (as a user's `tinysr` would).
Spec parsing and the registry need no Hub and are tested in-process.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hubserver import HubServer, client_env
from tinysr_cli.errors import WeightsError
from tinysr_cli.weights.hub import DEFAULT_FILENAME, HubFile, parse_model_spec
from tinysr_cli.weights.registry import load_registry

RESOLVE = """
import json, sys
from tinysr_cli.errors import TinySRError
from tinysr_cli.weights.hub import resolve_model
for spec in sys.argv[1:]:
    try:
        print(json.dumps({"path": str(resolve_model(None if spec == "-" else spec, progress=False))}))
    except TinySRError as exc:
        print(json.dumps({"error": str(exc), "hint": exc.hint, "type": type(exc).__name__}))
"""


def resolve(env: dict, *specs: str) -> list[dict]:
    """Resolve each spec in one fresh process; '-' means the configured default."""
    result = subprocess.run([sys.executable, "-c", RESOLVE, *specs], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[int, bytes]:
    """The bytes of two small real tinysr weight files (tiny config, seeds 1 and 2)."""
    from tinysr_cli.weights.format import init_weights, save_weights

    folder = tmp_path_factory.mktemp("hubweights")
    return {
        seed: save_weights(init_weights("tiny", seed), folder / f"s{seed}.safetensors", provenance={"seed": seed}).read_bytes()
        for seed in (1, 2)
    }


@pytest.fixture
def hub():
    with HubServer(token="hf_test_token") as server:
        yield server


@pytest.fixture
def home(tmp_path) -> Path:
    (tmp_path / "config" / "tinysr").mkdir(parents=True)
    return tmp_path


def write_config(home: Path, text: str) -> None:
    (home / "config" / "tinysr" / "config.toml").write_text(text)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def repo_cache(home: Path, repo_id: str) -> Path:
    return home / "hf" / "hub" / ("models--" + repo_id.replace("/", "--"))


def cached_files(home: Path, repo_id: str) -> list[Path]:
    """Everything under the repo's blobs/ and snapshots/ that is (or points at) a file."""
    root = repo_cache(home, repo_id)
    return sorted(p for sub in ("blobs", "snapshots") for p in (root / sub).rglob("*") if p.is_file())


def resolve_requests(hub: HubServer) -> list:
    """Requests for files (huggingface_hub may also fetch its agent registry once a day)."""
    return [r for r in hub.requests if "/resolve/" in r.path or r.listener == "cdn"]


# -- downloads -------------------------------------------------------------------------------


def test_first_download_then_cached_with_the_server_gone(hub, home, weights):
    commit = hub.add_commit("team/tiny", {DEFAULT_FILENAME: weights[1], "README.md": b"card"})
    env = client_env(home, hub.endpoint)
    [first] = resolve(env, "team/tiny")
    path = Path(first["path"])
    assert path == repo_cache(home, "team/tiny") / "snapshots" / commit / DEFAULT_FILENAME
    assert path.read_bytes() == weights[1]
    assert Path(path).resolve().name == sha256(weights[1])  # stored under the Hub's LFS sha256
    methods = [(r.listener, r.method) for r in resolve_requests(hub)]
    assert methods == [("hub", "HEAD"), ("cdn", "GET")]

    hub.stop()
    [second] = resolve(env, "team/tiny")
    assert second == first


def test_the_default_xet_enabled_client_downloads_too(hub, home, weights):
    """Every other test sets HF_HUB_DISABLE_XET=1; users do not. With hf_xet installed huggingface_hub
    takes its Xet-capable path by default and uses Xet only for files whose HEAD answer carries
    X-Xet-* headers; this server (like the Hub for a repo not on Xet storage) sends none, so the file
    must come over plain HTTP from the CDN, verified and cached, as with Xet disabled. Serving a real
    Xet file would need the Xet CAS protocol (reconstruction API, xorb chunks) in tests/hubserver.py."""
    pytest.importorskip("hf_xet")
    commit = hub.add_commit("team/xet-default", {DEFAULT_FILENAME: weights[1]})
    env = client_env(home, hub.endpoint)
    del env["HF_HUB_DISABLE_XET"]
    before = len(resolve_requests(hub))
    [result] = resolve(env, "team/xet-default")
    path = Path(result["path"])
    assert path == repo_cache(home, "team/xet-default") / "snapshots" / commit / DEFAULT_FILENAME
    assert path.read_bytes() == weights[1]
    assert [(r.listener, r.method) for r in resolve_requests(hub)[before:]] == [("hub", "HEAD"), ("cdn", "GET")]


def test_hf_hub_cache_moves_the_cache(hub, home, weights, tmp_path):
    hub.add_commit("team/tiny", {DEFAULT_FILENAME: weights[1]})
    elsewhere = tmp_path / "elsewhere"
    [result] = resolve(client_env(home, hub.endpoint, HF_HUB_CACHE=str(elsewhere)), "team/tiny")
    assert Path(result["path"]).is_relative_to(elsewhere / "models--team--tiny" / "snapshots")
    assert not (home / "hf" / "hub").exists()


def test_revision_pinning_and_no_request_for_a_cached_commit(hub, home, weights):
    old = hub.add_commit("team/tiny", {DEFAULT_FILENAME: weights[1]})
    hub.tag("team/tiny", "v1", old)
    new = hub.add_commit("team/tiny", {DEFAULT_FILENAME: weights[2]})
    assert old != new
    env = client_env(home, hub.endpoint)
    pinned, latest, tagged, as_uri = resolve(env, f"team/tiny@{old}", "team/tiny", "team/tiny@v1", f"hf://team/tiny@{new}/{DEFAULT_FILENAME}")
    assert Path(pinned["path"]).read_bytes() == weights[1]
    assert Path(latest["path"]).read_bytes() == weights[2]
    assert Path(tagged["path"]) == Path(pinned["path"])
    assert Path(as_uri["path"]) == Path(latest["path"])

    hub.clear_log()
    [again] = resolve(env, f"team/tiny@{old}")
    assert again == pinned
    assert hub.requests == []  # a pinned, cached commit is used without any request

    [branch] = resolve(env, "team/tiny")  # a branch is re-checked: one HEAD, nothing downloaded
    assert branch == latest
    assert [(r.method, r.path) for r in resolve_requests(hub)] == [("HEAD", f"/team/tiny/resolve/main/{DEFAULT_FILENAME}")]


def test_registry_hash_mismatch_is_refused_and_nothing_usable_is_left(hub, home, weights):
    hub.add_commit("team/tiny", {DEFAULT_FILENAME: weights[1]})
    write_config(home, f'[models.pinned]\nrepo_id = "team/tiny"\nfilename = "{DEFAULT_FILENAME}"\nsha256 = "{sha256(weights[2])}"\n')
    [result] = resolve(client_env(home, hub.endpoint), "pinned")
    assert result["type"] == "WeightsError"
    assert "pinned: integrity check failed, the cached file was removed" in result["error"]
    assert f"sha256 {sha256(weights[1])} does not match the expected {sha256(weights[2])}" in result["error"]
    assert cached_files(home, "team/tiny") == []


def test_registry_sha256_and_size_that_match_are_accepted(hub, home, weights):
    commit = hub.add_commit("team/tiny", {DEFAULT_FILENAME: weights[1]})
    write_config(
        home,
        f'model = "pinned"\n[models.pinned]\nrepo_id = "team/tiny"\nfilename = "{DEFAULT_FILENAME}"\n'
        f'revision = "{commit}"\nsha256 = "{sha256(weights[1])}"\nsize = {len(weights[1])}\n',
    )
    [result] = resolve(client_env(home, hub.endpoint), "-")  # the config's default model
    assert Path(result["path"]).read_bytes() == weights[1]


def test_a_cached_file_altered_on_disk_fails_the_hub_hash_and_is_removed(hub, home, weights):
    hub.add_commit("team/tiny", {DEFAULT_FILENAME: weights[1]})
    env = client_env(home, hub.endpoint)
    [first] = resolve(env, "team/tiny")
    blob = Path(first["path"]).resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    [second] = resolve(env, "team/tiny")
    assert "does not match the Hub's LFS sha256" in second["error"]
    assert cached_files(home, "team/tiny") == []
    [third] = resolve(env, "team/tiny")  # the next run downloads a good copy
    assert Path(third["path"]).read_bytes() == weights[1]


def test_missing_repo_file_and_revision_explain_the_ways_out(hub, home, weights):
    hub.add_commit("team/tiny", {DEFAULT_FILENAME: weights[1]})
    write_config(home, '[models.gone]\nrepo_id = "team/nothing-here"\nfilename = "model.safetensors"\n')
    gone, no_file, no_revision = resolve(client_env(home, hub.endpoint), "gone", "team/tiny@main/other.safetensors", "team/tiny@v9")
    assert gone["error"] == "gone: Hub repo team/nothing-here not found (or private and not shared with you)"
    for needle in ("Google Drive", "gdown", "tinysr weights import-official", "--model", "TINYSR_MODEL"):
        assert needle in gone["hint"]
    assert no_file["error"] == "hf://team/tiny@main/other.safetensors: team/tiny has no file 'other.safetensors' at revision 'main'"
    assert no_revision["error"] == "hf://team/tiny@v9/model.safetensors: revision 'v9' not found in team/tiny"
    assert "import-official" in no_file["hint"] and "import-official" in no_revision["hint"]


def test_gated_repo_says_how_to_get_access(hub, home, weights):
    hub.add_commit("team/gated", {DEFAULT_FILENAME: weights[1]}, gated=True)
    [result] = resolve(client_env(home, hub.endpoint), "team/gated")
    assert result["error"] == "hf://team/gated@main/model.safetensors: the Hub repo team/gated is gated"
    assert "hf auth login" in result["hint"] and "import-official" in result["hint"]
    [granted] = resolve(client_env(home, hub.endpoint, HF_TOKEN="hf_test_token"), "team/gated")
    assert Path(granted["path"]).read_bytes() == weights[1]


def test_unpublished_model_makes_no_request_and_the_bundled_default_needs_none(hub, home):
    [default] = resolve(client_env(home, hub.endpoint), "-")
    assert Path(default["path"]).name == "tinysr-small-x4.safetensors" and hub.requests == []
    [result] = resolve(client_env(home, hub.endpoint), "tinysr-x4")
    assert result["error"] == "model 'tinysr-x4' is not published on the Hugging Face Hub yet (intended repo: tinysr/tinysr-x4)"
    assert "import-official" in result["hint"] and "gdown" in result["hint"]
    assert hub.requests == []


def test_offline_mode_uses_the_cache_and_never_the_network(hub, home, weights):
    hub.add_commit("team/tiny", {DEFAULT_FILENAME: weights[1]})
    offline = client_env(home, hub.endpoint, HF_HUB_OFFLINE="1")
    [missing] = resolve(offline, "team/tiny")
    assert missing["error"] == "hf://team/tiny@main/model.safetensors is not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it"
    assert hub.requests == []
    [online] = resolve(client_env(home, hub.endpoint), "team/tiny")
    hub.clear_log()
    [cached] = resolve(offline, "team/tiny")
    assert cached == online
    assert hub.requests == []


def test_interrupted_download_leaves_nothing_that_looks_usable(hub, home, weights):
    hub.add_commit("team/tiny", {DEFAULT_FILENAME: weights[1]})
    hub.cut_downloads(weights[1], at=100_000)  # every attempt, including huggingface_hub's resumes
    env = client_env(home, hub.endpoint)
    [result] = resolve(env, "team/tiny")
    assert result["error"].startswith("hf://team/tiny@main/model.safetensors: the download did not complete (")
    assert "nothing was kept" in result["error"] and "run the command again" in result["hint"]
    assert len([r for r in hub.requests if r.listener == "cdn"]) > 1  # huggingface_hub retried, in vain
    assert cached_files(home, "team/tiny") == []
    assert not list(repo_cache(home, "team/tiny").rglob("*.incomplete"))
    hub.clear_faults()
    [retry] = resolve(env, "team/tiny")
    assert Path(retry["path"]).read_bytes() == weights[1]


def test_a_dropped_connection_is_resumed_and_the_result_verified(hub, home, tmp_path):
    # huggingface_hub resumes with a Range request only after a whole 10 MiB chunk arrived, so this
    # test needs a bigger (but still real) tinysr file than the "tiny" config gives.
    from tinysr_cli.models.tinysr import NAMED_CONFIGS, TinySR, TinySRConfig, TransformerConfig
    from tinysr_cli.weights.format import save_weights

    config = TinySRConfig(TransformerConfig(num_layers=4, hidden_size=256, num_heads=4, pos_grid=32), NAMED_CONFIGS["tiny"].vae)
    data = save_weights(TinySR(config), tmp_path / "big.safetensors").read_bytes()
    cut = 11 << 20
    assert len(data) > cut
    hub.add_commit("team/big", {DEFAULT_FILENAME: data})
    hub.cut_downloads(data, at=cut, times=1)
    [result] = resolve(client_env(home, hub.endpoint), "team/big")
    assert Path(result["path"]).read_bytes() == data
    ranges = [r.range for r in hub.requests if r.listener == "cdn"]
    assert ranges[0] is None and len(ranges) == 2
    start = int(ranges[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= cut  # the second request continued where the kept bytes ended


def test_a_hub_file_that_is_not_tinysr_weights_is_refused(hub, home):
    from safetensors.torch import save

    import torch

    foreign = save({"weight": torch.zeros(4, 4)}, metadata={"format": "pt"})
    hub.add_commit("team/other", {DEFAULT_FILENAME: foreign})
    [result] = resolve(client_env(home, hub.endpoint), "team/other")
    assert "not a tinysr weights file" in result["error"]


def test_local_files_need_no_network_and_env_sets_the_default(hub, home, weights, tmp_path):
    local = tmp_path / "mine.safetensors"
    local.write_bytes(weights[2])
    hub.add_commit("team/tiny", {DEFAULT_FILENAME: weights[1]})
    env = client_env(home, hub.endpoint, TINYSR_MODEL=str(local))
    by_env, by_path = resolve(env, "-", str(local))
    assert by_env == by_path == {"path": str(local)}
    assert hub.requests == []
    [hub_default] = resolve(client_env(home, hub.endpoint, TINYSR_MODEL="team/tiny"), "-")
    assert Path(hub_default["path"]).read_bytes() == weights[1]


# -- specs and the registry (no Hub involved) ------------------------------------------------


@pytest.fixture
def config_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("TINYSR_MODEL", raising=False)
    (tmp_path / "config" / "tinysr").mkdir(parents=True)
    return tmp_path


def test_builtin_registry_names_the_authors_model_without_invented_hashes(config_home):
    registry = load_registry()
    entry = registry.get("tinysr-x4")
    assert registry.default == "tinysr-small-x4" and registry.default_origin == "built-in registry"
    assert entry is not None and entry.published is False
    assert entry.sha256 is None and entry.size is None
    assert entry.filename.endswith(".safetensors")
    assert "Apache-2.0" in entry.license_note and "import-official" in entry.provenance


def test_model_specs(config_home, tmp_path):
    local = tmp_path / "w.safetensors"
    local.write_bytes(b"not read while parsing")
    registry = load_registry()
    assert parse_model_spec(str(local), registry) == local
    entry = parse_model_spec("tinysr-x4", registry)
    assert isinstance(entry, HubFile) and entry.entry is registry.get("tinysr-x4") and entry.repo_id == "tinysr/tinysr-x4"
    assert parse_model_spec("team/tiny", registry) == HubFile("team/tiny", DEFAULT_FILENAME, "main")
    assert parse_model_spec("team/tiny@v2", registry) == HubFile("team/tiny", DEFAULT_FILENAME, "v2")
    assert parse_model_spec("team/tiny@v2/sub/x.safetensors", registry) == HubFile("team/tiny", "sub/x.safetensors", "v2")
    assert parse_model_spec("hf://team/tiny/x.safetensors", registry) == HubFile("team/tiny", "x.safetensors", "main")
    url = "https://huggingface.co/team/tiny/blob/abc1/x.safetensors"
    assert parse_model_spec(url, registry) == HubFile("team/tiny", "x.safetensors", "abc1")


@pytest.mark.parametrize(
    ("spec", "message", "hint"),
    [
        ("release/model.pt", "pickled checkpoints are not loaded", "import-official"),
        ("hf://team/tiny/model.ckpt", "pickled checkpoints are not loaded", "import-official"),
        ("team/tiny@main/model.pth", "pickled checkpoints are not loaded", "import-official"),
        ("models/missing.safetensors", "no such file", "hf://owner/name/FILE"),
        ("nope", "unknown model 'nope' (registered: tinysr-small-x4, tinysr-x4)", "owner/name"),
        ("hf://datasets/team/data", "only model repos hold weights", None),
        ("https://drive.google.com/file/d/abc/view", "not a Hub model", "download files from elsewhere"),
        ("team/tiny@main/config.json", "config.json is not a .safetensors file", None),
    ],
)
def test_bad_specs_are_refused_with_a_reason(config_home, spec, message, hint):
    with pytest.raises(WeightsError, match=re.escape(message)) as caught:
        parse_model_spec(spec)
    assert (caught.value.hint is None) if hint is None else (hint in caught.value.hint)


def test_pickles_are_refused_even_when_the_file_exists(config_home, tmp_path):
    pickle = tmp_path / "model.pth"
    pickle.write_bytes(b"\x80\x04pickle")
    with pytest.raises(WeightsError, match="pickled checkpoints are not loaded") as caught:
        parse_model_spec(str(pickle))
    assert "tinysr weights import-official" in caught.value.hint


def test_config_adds_and_replaces_entries_and_env_wins(config_home, monkeypatch):
    (config_home / "config" / "tinysr" / "config.toml").write_text(
        'model = "team-x4"\n'
        '[models.team-x4]\nrepo_id = "team/x4"\nfilename = "w.safetensors"\nrevision = "' + "a" * 40 + '"\n'
        '[models.tinysr-x4]\nrepo_id = "mirror/tinysr-x4"\nfilename = "model.safetensors"\n'
    )
    registry = load_registry()
    assert registry.default == "team-x4" and registry.default_origin.endswith("config.toml")
    assert registry.get("team-x4").revision == "a" * 40
    mirrored = registry.get("tinysr-x4")
    assert mirrored.repo_id == "mirror/tinysr-x4" and mirrored.published is True and mirrored.provenance == ""
    monkeypatch.setenv("TINYSR_MODEL", "other/model")
    assert load_registry().default == "other/model"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('repo_id = "a/b"\nfilename = "m.safetensors"\nsha256 = "abc"', "sha256 must be 64 lowercase hex digits"),
        ('repo_id = "a/b"\nfilename = "m.pt"', "filename must be a .safetensors file"),
        ('repo_id = "ab"\nfilename = "m.safetensors"', "repo_id must be 'owner/name'"),
        ('repo_id = "a--b/c"\nfilename = "m.safetensors"', "Cannot have -- or .. in repo_id"),
        ('repo_id = "a/b"\nfilename = "m.safetensors"\nsha = "x"', "unknown field 'sha'"),
        ('repo_id = "a/b"\nfilename = "m.safetensors"\nsize = -1', "size must be a positive integer"),
    ],
)
def test_bad_config_entries_are_named(config_home, table, message):
    path = config_home / "config" / "tinysr" / "config.toml"
    path.write_text("[models.mine]\n" + table + "\n")
    with pytest.raises(WeightsError, match=re.escape(message)) as caught:
        load_registry()
    assert str(caught.value).startswith(f"{path}: [models.mine]")
