"""The tiny VAE against diffusers' AutoencoderTiny, separable convs, receptive field."""

from __future__ import annotations

import torch
from diffusers import AutoencoderTiny

from tinysr_cli.engine.tiling import run_with_context
from tinysr_cli.models.vae import TinyVAE, VAEConfig, decoder_receptive_radius, encoder_receptive_radius


def test_plain_config_equals_diffusers_autoencoder_tiny():
    torch.manual_seed(0)
    reference = AutoencoderTiny(
        in_channels=3, out_channels=3, latent_channels=16,
        encoder_block_out_channels=(32, 32, 32, 32), decoder_block_out_channels=(32, 32, 32, 32),
        num_encoder_blocks=(1, 2, 2, 2), num_decoder_blocks=(2, 2, 2, 1), scaling_factor=1.5,
    ).eval()
    ours = TinyVAE(VAEConfig(
        encoder_channels=(32,) * 4, decoder_channels=(32,) * 4, encoder_blocks=(1, 2, 2, 2), decoder_blocks=(2, 2, 2, 1),
        encoder_separable=False, decoder_separable=False, scaling_factor=1.5,
    )).eval()
    ours.load_state_dict({k: v for k, v in reference.state_dict().items()})
    image = torch.rand(1, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        latent = reference.encode(image).latents
        assert torch.allclose(ours.encoder(image), latent, atol=1e-6)
        assert torch.allclose(ours.decoder(latent), reference.decode(latent).sample, atol=1e-5)
        assert torch.allclose(ours.encode(image), latent * 1.5, atol=1e-6)


def test_separable_layout_keys():
    vae = TinyVAE(VAEConfig(encoder_separable=True, decoder_separable=False))
    keys = set(vae.state_dict())
    assert "encoder.layers.0.depthwise.weight" in keys and "encoder.layers.0.pointwise.bias" in keys
    assert "encoder.layers.0.weight" not in keys
    assert "decoder.layers.0.weight" in keys and "decoder.layers.0.depthwise.weight" not in keys
    assert vae.encoder.layers[0].depthwise.groups == 3


def test_receptive_radius_of_taesd_layout():
    vae = TinyVAE(VAEConfig())
    # Encoder: 4 + 1 + 9*2 + 2 + 9*4 + 4 + 9*8 + 8 input pixels; decoder: 10 + 10/2 + 10/4 + 5/8 latent pixels.
    assert encoder_receptive_radius(vae.encoder) == 145
    assert decoder_receptive_radius(vae.decoder) == 18.125


def test_tiled_encode_and_decode_equal_untiled():
    torch.manual_seed(1)
    vae = TinyVAE(VAEConfig(encoder_channels=(16,) * 4, decoder_channels=(16,) * 4)).eval()
    image = torch.rand(1, 3, 208, 176) * 2 - 1
    enc_context = int(encoder_receptive_radius(vae.encoder)) + 1
    dec_context = int(decoder_receptive_radius(vae.decoder)) + 1
    with torch.no_grad():
        latent = vae.encode(image)
        tiled_latent = run_with_context(image, vae.encode, downscale=8, tile=8, context=enc_context)
        assert tiled_latent.shape == latent.shape == (1, 16, 26, 22)
        assert torch.equal(tiled_latent, latent)  # full context: exact, not merely close
        decoded = vae.decode(latent)
        tiled = run_with_context(latent, vae.decode, upscale=8, tile=64, context=dec_context)
        assert tiled.shape == decoded.shape == (1, 3, 208, 176)
        assert torch.equal(tiled, decoded)
