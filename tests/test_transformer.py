"""The backbone: folding the constant modulation, positional table, parameter count."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed

from tinysr_cli.models.transformer import (
    ModulatedTransformer,
    TinySRTransformer,
    TransformerConfig,
    crop_pos_embed,
    fold_modulation,
    sincos_pos_embed,
)

SMALL = TransformerConfig(num_layers=3, hidden_size=96, num_heads=6, pos_grid=16)


def _random_modulated(config: TransformerConfig, seed: int = 0) -> ModulatedTransformer:
    torch.manual_seed(seed)
    model = ModulatedTransformer(config)
    with torch.no_grad():
        model.modulation.normal_(0, 0.5)
        model.final_modulation.normal_(0, 0.5)
    return model.eval()


def test_fold_matches_modulated_form_in_float32():
    modulated = _random_modulated(SMALL)
    folded = fold_modulation(modulated)
    assert isinstance(folded, TinySRTransformer)
    latent = torch.randn(2, 16, 32, 24)
    with torch.no_grad():
        expected, actual = modulated(latent), folded(latent)
    rel = (actual - expected).abs().max() / expected.abs().max()
    assert rel < 1e-5, rel


def test_fold_is_exact_in_float64():
    modulated = _random_modulated(SMALL).double()
    folded = fold_modulation(modulated)
    latent = torch.randn(1, 16, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(folded(latent), modulated(latent), rtol=1e-12, atol=1e-12)


def test_zero_modulation_gates_make_blocks_identities():
    # gate = 0 removes every residual branch: only patch-embed -> final layer remains.
    model = _random_modulated(SMALL)
    with torch.no_grad():
        model.modulation[:, 2].zero_()
        model.modulation[:, 5].zero_()
        plain = TinySRTransformer(SMALL)
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if "modulation" not in k})
        plain.blocks = torch.nn.ModuleList()
        plain.proj_out = fold_modulation(model).proj_out
        latent = torch.randn(1, 16, 16, 16)
        assert torch.allclose(model(latent), plain(latent), atol=1e-5)


def test_positional_table_is_sd3_centre_crop():
    # diffusers' own table for SD3 (192x192 grid, base size 64), cropped as SD3 crops for a 64x64 latent.
    hidden = 64
    full = get_2d_sincos_pos_embed(hidden, 192, base_size=64, output_type="pt").float()[None]
    expected = crop_pos_embed(full, 192, 32, 32)
    assert torch.allclose(sincos_pos_embed(hidden, 32), expected, atol=1e-5)
    # A smaller tile takes the centre of our 32x32 table, exactly like SD3's crop of its own.
    assert torch.allclose(crop_pos_embed(sincos_pos_embed(hidden, 32), 32, 24, 20), crop_pos_embed(full, 192, 24, 20), atol=1e-5)


def test_full_config_has_340m_parameters():
    with torch.device("meta"):
        model = TinySRTransformer(TransformerConfig())
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - 340e6) / 340e6 < 0.01, count
    assert model.pos_embed.shape == (1, 1024, 1536)


def test_output_shape_and_patch_multiple():
    model = TinySRTransformer(SMALL).eval()
    assert model(torch.randn(3, 16, 20, 32)).shape == (3, 16, 20, 32)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 16, 15, 16))
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.randn(1, 16, 34, 16))
