import pytest
import torch

from psvae_core.config import PixelDecoderConfig
from psvae_core.pixel_decoder import ConvDecoder, ViTDecoder, build_pixel_decoder, sincos_2d

TINY_CONV = PixelDecoderConfig(base_channels=16, channel_mult=(1, 1, 2, 2, 2), num_res_blocks=1)
TINY_VIT = PixelDecoderConfig(kind="vit", vit_width=32, vit_depth=2, vit_heads=4)


@pytest.mark.parametrize("cfg", [TINY_CONV, TINY_VIT], ids=["conv", "vit"])
@pytest.mark.parametrize("grid", [(16, 16), (32, 32), (16, 24)])
def test_decoders_upsample_by_16_on_any_grid(cfg, grid):
    dec = build_pixel_decoder(cfg, latent_channels=8)
    out = dec(torch.randn(2, 8, *grid))
    assert out.shape == (2, 3, grid[0] * 16, grid[1] * 16)
    assert torch.isfinite(out).all()
    assert cfg.upsample_factor == 16


def test_default_decoder_is_ldm_f16_size():
    dec = ConvDecoder(PixelDecoderConfig(), latent_channels=96)
    params = sum(p.numel() for p in dec.parameters())
    # LDM kl-f16 decoder widths (128 x [1,1,2,2,4], 2 res blocks, attention at 16x16); the
    # count documented in docs/MODELS.md.
    assert params == 41_712_515, params


def test_decoder_is_spatially_local_and_gradients_reach_every_parameter():
    dec = build_pixel_decoder(TINY_CONV, latent_channels=4)
    z = torch.randn(1, 4, 16, 16, requires_grad=True)
    dec(z).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dec.parameters())
    assert dec.last_layer is dec.conv_out.weight


def test_sincos_positions_are_distinct_and_bounded():
    pe = sincos_2d(32, 4, 5)
    assert pe.shape == (20, 32)
    assert pe.abs().max() <= 1.0
    assert torch.cdist(pe, pe).add(torch.eye(20)).min() > 1e-3  # every position differs
    with pytest.raises(ValueError):
        sincos_2d(30, 2, 2)


def test_vit_decoder_last_layer_and_unpatchify_order():
    dec = ViTDecoder(TINY_VIT, latent_channels=8)
    with torch.no_grad():
        dec.out.weight.zero_()
        # Bias that writes channel c, patch row p, patch col q as a distinct value.
        p = dec.patch
        bias = torch.arange(p * p * 3, dtype=torch.float32)
        dec.out.bias.copy_(bias)
    out = dec(torch.zeros(1, 8, 2, 2))
    # Unpatchify layout (p q c): pixel (p_i, q_j) of channel c reads bias[(p_i * p + q_j) * 3 + c].
    assert out[0, 2, 1, 3].item() == bias[(1 * p + 3) * 3 + 2].item()
    assert out[0, 0, 16 + 1, 16 + 3].item() == bias[(1 * p + 3) * 3 + 0].item()
