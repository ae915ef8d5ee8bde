"""`tinysr weights import-official`: layout, key mapping, provenance, and one clear line per bad input.

End-to-end numerical equality with the official pipeline is in test_official_fidelity.py; here the
pieces are checked one by one against diffusers' own modules, and the failure paths are exercised
on damaged copies of a synthetic release.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from diffusers.models.embeddings import Timesteps
from safetensors.torch import load_file, save_file

import official_reference as ref
from cli_helpers import run_cli, tree_digest
from tinysr_cli.errors import WeightsError
from tinysr_cli.models.transformer import sincos_pos_embed
from tinysr_cli.weights.format import load_weights, read_info
from tinysr_cli.weights.official import ReleaseLayout, convert_release, timestep_features

BASE = Path(ref.TRANSFORMER_DIR) / "diffusion_pytorch_model.safetensors"
VAE_WEIGHTS = Path(ref.VAE_DIR) / "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return ref.build_release(tmp_path_factory.mktemp("release"), ref.SMALL_SPEC)


@pytest.fixture
def release(pristine, tmp_path) -> Path:
    """A private copy that a test may damage."""
    return Path(shutil.copytree(pristine, tmp_path / "release"))


def _edit(path: Path, edit) -> None:
    state = load_file(path)
    edit(state)
    save_file(state, path)


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_cli_writes_a_loadable_file_with_provenance(release, tmp_path):
    before = tree_digest(release)
    out = tmp_path / "tinysr.safetensors"
    result = run_cli("weights", "import-official", release, "-o", out, "--dtype", "fp16")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert "merging the LoRA" in result.stderr
    assert tree_digest(release) == before  # the release is only read
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left

    info = read_info(out)
    assert info.dtype == torch.float16 and info.color_fix == "adain"
    t, v = info.config.transformer, info.config.vae
    assert (t.num_layers, t.hidden_size, t.num_heads, t.mlp_ratio, t.pos_grid) == (2, 64, 4, 4, 32)
    assert (v.encoder_separable, v.decoder_separable, v.scaling_factor) == (True, True, 1.5)
    assert (v.encoder_blocks, v.decoder_blocks) == ((1, 2, 1, 1), (1, 1, 2, 1))
    expected = {
        str(p.relative_to(release)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in release.rglob("*") if p.is_file()
    }
    assert info.provenance["files_sha256"] == expected
    assert info.provenance["lora"] == {"rank": 4, "alpha": 4.0, "scale": 1.0, "modules": 20, "merged": True}
    load_weights(out)


def test_existing_output_is_left_alone(release, tmp_path):
    out = tmp_path / "taken.safetensors"
    out.write_bytes(b"precious")
    result = run_cli("weights", "import-official", release, "-o", out)
    assert result.returncode == 1
    assert f"Error: {out} exists" in result.stderr
    assert out.read_bytes() == b"precious"


def test_missing_release_folder_is_one_line(tmp_path):
    result = run_cli("weights", "import-official", tmp_path / "nowhere", "-o", tmp_path / "x.safetensors")
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == f"Error: {tmp_path / 'nowhere'}: not a folder"
    assert not (tmp_path / "x.safetensors").exists()


def test_timestep_features_equal_diffusers():
    expected = Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)(torch.tensor([1000.0]))
    assert torch.equal(timestep_features(1000.0), expected)


def test_positional_table_and_weights_map_onto_ours(pristine):
    model, _ = convert_release(pristine)
    reference = ref.load_reference(pristine, ref.SMALL_SPEC).transformer
    # SD3's own crop of the checkpoint's 40 x 40 table for a 64 x 64 latent.
    assert torch.equal(model.transformer.pos_embed, reference.pos_embed.cropped_pos_embed(64, 64))
    assert model.transformer.pos_embed.shape == (1, 1024, 64)
    vae = load_file(pristine / VAE_WEIGHTS)
    ours = model.vae.state_dict()
    assert set(ours) == set(vae) and all(torch.equal(ours[k], vae[k]) for k in vae)


def test_lora_on_the_conv_patch_embed_is_merged_with_its_scale(pristine):
    """The patch-embed conv is a LoRA target too (A: 2x2 conv, B: 1x1); alpha = 2 x rank doubles the delta."""
    base = load_file(pristine / BASE)["pos_embed.proj.weight"].float()
    lora = load_file(pristine / ref.LORA_FILE)
    a, b = lora["transformer.pos_embed.proj.lora_A.weight"], lora["transformer.pos_embed.proj.lora_B.weight"]
    assert a.shape == (4, 16, 2, 2) and b.shape == (64, 4, 1, 1)
    delta = torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
    for alpha, factor in ((None, 1.0), (8.0, 2.0)):
        model, provenance = convert_release(pristine, lora_alpha=alpha)
        assert provenance["lora"]["scale"] == factor
        assert torch.allclose(model.transformer.patch_embed.weight, base + factor * delta, atol=1e-6)


def test_sharded_backbone_and_context_stream_keys(release):
    """A sharded save_pretrained folder converts; SD3 text-stream keys the student never runs are ignored."""
    transformer = ref.TinySD3Transformer2DModel.from_pretrained(release / ref.TRANSFORMER_DIR)
    shutil.rmtree(release / ref.TRANSFORMER_DIR)
    transformer.save_pretrained(release / ref.TRANSFORMER_DIR, max_shard_size="20KB")
    shards = sorted((release / ref.TRANSFORMER_DIR).glob("*.safetensors"))
    assert len(shards) > 1
    _edit(shards[0], lambda s: s.update({"context_embedder.weight": torch.zeros(64, 32), "scale": torch.zeros(0)}))
    model, provenance = convert_release(release)
    assert model.config.transformer.num_layers == 2
    assert sum(name.endswith(".safetensors") for name in provenance["files_sha256"]) == len(shards) + 2


def test_pooled_embedding_from_another_folder(release, tmp_path):
    moved = tmp_path / "tsdsr" / "pool_embeds.pt"
    moved.parent.mkdir()
    shutil.move(release / ref.POOLED_FILE, moved)
    with pytest.raises(WeightsError, match="pool_embeds.pt: file not found"):
        convert_release(release)
    out = tmp_path / "m.safetensors"
    result = run_cli("weights", "import-official", release, "-o", out, "--pooled-embeds", moved, "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert str(moved.resolve()) in read_info(out).provenance["files_sha256"]


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_with_code_is_refused_and_not_run(release, tmp_path):
    payload = _Payload()
    payload.marker = str(tmp_path / "pwned")
    (release / ref.POOLED_FILE).write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(WeightsError, match=r"pool_embeds\.pt: cannot be read with weights_only=True"):
        convert_release(release)
    assert not (tmp_path / "pwned").exists()


def _drop(key):
    return lambda state: state.pop(key)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: (r / ref.LORA_FILE).unlink(), r"tinysr/transformer\.safetensors: file not found"),
        (
            lambda r: _edit(r / BASE, _drop("transformer_blocks.1.ff.net.2.bias")),
            r"diffusion_pytorch_model\.safetensors: missing tensor 'transformer_blocks\.1\.ff\.net\.2\.bias'",
        ),
        (
            lambda r: _edit(r / BASE, lambda s: s.update({"transformer_blocks.0.attn.norm_q.weight": torch.ones(16)})),
            r"unexpected tensor 'transformer_blocks\.0\.attn\.norm_q\.weight'",
        ),
        (
            lambda r: _edit(r / BASE, lambda s: s.update({"pos_embed.pos_embed": torch.zeros(1, 900, 64)})),
            r"'pos_embed\.pos_embed' has shape \(1, 900, 64\), expected \[1, G\*G, 64\] with G >= 32",
        ),
        (
            lambda r: _edit(r / BASE, lambda s: s.update({"proj_out.weight": torch.zeros(64, 32)})),
            r"diffusion_pytorch_model\.safetensors: tensor 'proj_out\.weight' has shape \(64, 32\), expected \(64, 64\)",
        ),
        (
            lambda r: _edit_json(r / ref.TRANSFORMER_DIR / "config.json", num_attention_heads=8),
            r"config\.json: num_attention_heads=8 x attention_head_dim=16 does not give the hidden size 64",
        ),
        (
            lambda r: _edit(r / ref.LORA_FILE, lambda s: s.update({
                "transformer.norm_out.proj.lora_A.weight": torch.zeros(4, 64),
                "transformer.norm_out.proj.lora_B.weight": torch.zeros(64, 4),
            })),
            r"transformer\.safetensors: LoRA targets 'norm_out\.proj', which .* does not contain",
        ),
        (
            lambda r: _edit(r / ref.LORA_FILE, _drop("transformer.norm_out.linear.lora_B.weight")),
            r"transformer\.safetensors: 'norm_out\.linear' has no lora_B matrix",
        ),
        (
            lambda r: _edit(r / ref.LORA_FILE, lambda s: s.update({"transformer.proj_out.lora_A.weight": torch.zeros(4, 64)})),
            r"transformer\.safetensors: 'proj_out' has no lora_B matrix",
        ),
        (
            lambda r: _edit(
                r / ref.LORA_FILE, lambda s: s.update({"transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight": torch.zeros(64, 4, 1)})
            ),
            r"LoRA for 'transformer_blocks\.0\.attn\.to_out\.0' has A \(4, 64\) and B \(64, 4, 1\), which do not fit its weight \(64, 64\)",
        ),
        (
            lambda r: torch.save(torch.zeros(1, 41), r / ref.POOLED_FILE),
            r"pooled embedding has shape \(1, 41\), the backbone needs \(1, 40\)",
        ),
        (
            lambda r: _edit(r / VAE_WEIGHTS, lambda s: s.update({"decoder.layers.0.weight": torch.zeros(16, 16, 3, 3)})),
            r"the decoder mixes separable and plain convolutions",
        ),
        (
            lambda r: _edit(r / VAE_WEIGHTS, _drop("encoder.layers.1.conv.0.pointwise.bias")),
            r"missing tensor 'encoder\.layers\.1\.conv\.0\.pointwise\.bias' for the configuration in .*config\.json",
        ),
        (
            lambda r: _edit_json(r / ref.VAE_DIR / "config.json", act_fn="silu"),
            r"config\.json: act_fn='silu' is not supported",
        ),
        (
            lambda r: _edit_json(r / ref.VAE_DIR / "config.json", num_decoder_blocks=[1, 1, 1, 1]),
            r"(missing|unexpected) tensor 'decoder\.layers\.",
        ),
    ],
    ids=[
        "no-lora", "missing-key", "qk-norm", "small-pos-table", "bad-shape", "heads", "lora-target", "lora-half",
        "lora-lone-a", "lora-shape", "pooled-dim", "mixed-vae", "vae-missing", "vae-act", "vae-blocks",
    ],
)
def test_damaged_release_names_the_file_and_key(release, damage, message):
    damage(release)
    with pytest.raises(WeightsError, match=message):
        convert_release(release)


def test_cli_reports_a_damaged_release_in_one_line(release, tmp_path):
    _edit(release / BASE, _drop("proj_out.bias"))
    out = tmp_path / "m.safetensors"
    result = run_cli("weights", "import-official", release, "-o", out)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("Error: ")
    assert "missing tensor 'proj_out.bias'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_checkpoint_without_a_positional_table_gets_sd3s(release):
    _edit(release / BASE, _drop("pos_embed.pos_embed"))
    notes = []
    model, provenance = convert_release(release, progress=notes.append)
    assert torch.equal(model.transformer.pos_embed, sincos_pos_embed(64, 32))
    assert "the checkpoint has none" in provenance["pos_embed"]
    assert any("holds no positional table" in note for note in notes)


def test_layout_paths_may_point_outside_the_release(pristine, tmp_path):
    vae = Path(shutil.copytree(pristine / ref.VAE_DIR, tmp_path / "my-vae"))
    model, provenance = convert_release(pristine, ReleaseLayout(vae=vae))
    assert str((vae / "config.json").resolve()) in provenance["files_sha256"]
