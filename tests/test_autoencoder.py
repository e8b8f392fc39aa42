"""PSVAE end to end on tiny real transformers encoders: shapes, gradients, files, bad input."""
import pytest
import torch

from psvae_core.autoencoder import PSVAE
from psvae_core.checkpoint import CheckpointError
from psvae_core.config import PRESETS, EncoderConfig, PixelDecoderConfig, PSVAEConfig, SemanticConfig
from psvae_core.images import ImageInputError
from psvae_core.losses import semantic_loss

TINY = PRESETS["tiny"]
SMALL_DECODER = PixelDecoderConfig(base_channels=8, channel_mult=(1, 1, 1, 1, 1), num_res_blocks=1)


def tiny(mode="psvae", channels=16, image_size=224, **kw) -> PSVAE:
    torch.manual_seed(0)
    enc = TINY.encoder.replace(image_size=image_size)
    return PSVAE(TINY.replace(mode=mode, latent_channels=channels, encoder=enc, pixel_decoder=SMALL_DECODER, **kw))


@pytest.mark.parametrize("mode", ["psvae", "rae"])
@pytest.mark.parametrize("channels", [32, 96, 256])
def test_shapes_for_224_and_448_inputs_batch_1_and_3(mode, channels):
    fixed = tiny(mode, channels).eval()
    native = tiny(mode, channels, image_size=None).eval()
    expect_c = channels if mode == "psvae" else fixed.encoder.hidden_size
    assert fixed.latent_channels == expect_c
    with torch.no_grad():
        for batch in (1, 3):
            for size in (224, 448):
                x = torch.rand(batch, 3, size, size)
                post = fixed.encode(x)  # the paper's rule: every input resized to 224 -> 16x16
                assert post.mean.shape == (batch, expect_c, 16, 16) and post.mean.dtype == torch.float32
                assert fixed.decode(post.mode()).shape == (batch, 3, 256, 256)
                z = native.encode(x).mode()  # native grid: 448 -> 32x32 -> 512 px
                g = size // 14
                assert z.shape == (batch, expect_c, g, g)
                rec = native.reconstruct(x)
                assert rec.shape == (batch, 3, g * 16, g * 16) and 0 <= rec.min() and rec.max() <= 1
            assert post.deterministic == (mode == "rae")


def test_bfloat16_model_keeps_its_dtype():
    vae = tiny().to(torch.bfloat16).eval()
    with torch.no_grad():
        z = vae.encode(torch.rand(1, 3, 224, 224).to(torch.bfloat16)).mode()
        assert z.dtype == torch.bfloat16
        assert vae.decode(z).dtype == torch.bfloat16


def _combined_loss(vae, teacher, x):
    out = vae(x, generator=torch.Generator().manual_seed(0))
    l_s, _ = semantic_loss(out.reconstructed_features, teacher(x))
    l_kl = out.posterior.kl().mean()
    l_p = (out.images - x.new_zeros(1)).abs().mean()
    return l_s + 1e-4 * l_kl + l_p


def test_psvae_stage_gradients_reach_every_trainable_parameter():
    vae = tiny().train()
    vae.encoder.set_trainable(True)
    teacher = vae.encoder.frozen_copy()
    _combined_loss(vae, teacher, torch.rand(2, 3, 224, 224)).backward()
    # Every trainable parameter gets a gradient (what DDP requires); the ones no forward uses by
    # design (DINOv2's mask token, the unused affine final norm) are the only frozen ones.
    missing = [n for n, p in vae.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert missing == []
    frozen = sorted(n for n, p in vae.named_parameters() if not p.requires_grad)
    assert frozen == ["encoder.final_norm.bias", "encoder.final_norm.weight", "encoder.model.embeddings.mask_token"]
    assert all(p.grad is None for p in teacher.parameters())
    for part in ("encoder", "semantic_encoder", "semantic_decoder", "pixel_decoder"):
        assert any(n.startswith(part) for n, p in vae.named_parameters() if p.grad is not None)


def test_frozen_encoder_receives_no_gradient():
    vae = tiny().train()
    vae.encoder.set_trainable(False)
    teacher = vae.encoder.frozen_copy()
    _combined_loss(vae, teacher, torch.rand(2, 3, 224, 224)).backward()
    assert all(p.grad is None for p in vae.encoder.parameters())
    assert all(p.grad is not None for n, p in vae.named_parameters() if n.startswith(("semantic_", "pixel_")))


def test_stage1_detach_keeps_pixel_loss_out_of_the_semantic_encoder():
    vae = tiny().train()
    out = vae(torch.rand(1, 3, 224, 224), detach_pixel_input=True)
    out.images.mean().backward()
    assert all(p.grad is None for p in vae.semantic_encoder.parameters())
    assert all(p.grad is not None for p in vae.pixel_decoder.parameters())


@pytest.mark.parametrize("mode", ["psvae", "rae"])
def test_checkpoint_round_trip_is_bit_exact(tmp_path, mode):
    vae = tiny(mode).eval()
    vae.set_latent_stats(torch.linspace(-1, 1, vae.latent_channels), torch.linspace(0.5, 2, vae.latent_channels))
    path = tmp_path / "vae.safetensors"
    vae.save(path, provenance={"stage": "test", "step": 3})
    loaded = PSVAE.from_file(path)
    assert loaded.config == vae.config
    a, b = vae.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.provenance["stage"] == "test"
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(vae.reconstruct(x), loaded.reconstruct(x))


def test_loading_a_file_of_another_architecture_names_the_mismatch(tmp_path):
    path = tmp_path / "vae.safetensors"
    tiny(channels=16).save(path)
    from psvae_core import checkpoint
    comp = checkpoint.load_component(path)
    bad = dict(comp.config, latent_channels=32)  # config no longer matches the tensors
    checkpoint.save_component(tmp_path / "bad.safetensors", kind="vae", config=bad, tensors=comp.tensors)
    with pytest.raises(CheckpointError, match="shape"):
        PSVAE.from_file(tmp_path / "bad.safetensors")


def test_latent_normalisation_round_trips_and_validates_stats():
    vae = tiny()
    c = vae.latent_channels
    vae.set_latent_stats(torch.full((c,), 2.0), torch.full((c,), 4.0))
    z = torch.randn(2, c, 16, 16)
    torch.testing.assert_close(vae.normalize_latents(z), (z - 2) / 4)
    torch.testing.assert_close(vae.denormalize_latents(vae.normalize_latents(z)), z)
    with pytest.raises(ValueError, match="positive"):
        vae.set_latent_stats(torch.zeros(c), torch.zeros(c))
    with pytest.raises(ValueError, match="shape"):
        vae.set_latent_stats(torch.zeros(c + 1), torch.ones(c + 1))


def test_bad_inputs_give_clear_errors():
    vae = tiny().eval()
    x = torch.rand(1, 3, 224, 224)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ImageInputError, match="NaN"):
        vae.encode(x)
    with pytest.raises(ValueError, match="another VAE"):
        vae.decode(torch.randn(1, vae.latent_channels + 1, 16, 16))
    # uint8, grey and RGBA inputs, and sizes off the patch grid, are all taken.
    with torch.no_grad():
        for img in (torch.randint(0, 256, (1, 3, 100, 130), dtype=torch.uint8), torch.rand(2, 1, 64, 64), torch.rand(1, 4, 300, 200)):
            assert vae.encode(img).mean.shape[-2:] == (16, 16)


def test_preview_map_is_fitted_by_least_squares_and_saved(tmp_path):
    vae = tiny().eval()
    c = vae.latent_channels
    assert torch.all(vae.preview(torch.randn(1, c, 4, 4)) == 0.5)  # grey before fitting
    # Colours that are an exact linear function of the latent are recovered exactly.
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, c, 8, 8, generator=g)
    true_w, true_b = torch.randn(3, c, generator=g) * 0.05, torch.tensor([0.4, 0.5, 0.6])
    colours = torch.einsum("bchw,rc->brhw", z, true_w) + true_b[None, :, None, None]
    images = colours.repeat_interleave(16, -1).repeat_interleave(16, -2)  # each cell = one flat patch
    vae.fit_preview(z, images)
    torch.testing.assert_close(vae.latent_rgb_weight, true_w, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(vae.preview(z), colours.clamp(0, 1), atol=1e-4, rtol=1e-4)
    vae.save(tmp_path / "v.safetensors")
    assert torch.equal(PSVAE.from_file(tmp_path / "v.safetensors").latent_rgb_weight, vae.latent_rgb_weight)


def test_grad_checkpointing_recomputes_every_block_with_the_same_gradients():
    x = torch.rand(1, 3, 112, 112)
    grads, calls = [], []
    for on in (False, True):
        vae = tiny(image_size=112).train()
        vae.encoder.set_trainable(True)
        # tiny: 4 encoder layers, 1 in E_s, 1 in D_s; the decoder: 2 mid ResnetBlocks + 1 AttnBlock,
        # and per level 2 ResnetBlocks (+ 2 AttnBlocks at the lowest resolution).
        assert vae.set_grad_checkpointing(on) == 4 + 1 + 1 + 3 + 5 * 2 + 2
        runs = []
        for block in (vae.encoder.model.encoder.layer[0], vae.semantic_encoder.blocks.layers[0], vae.pixel_decoder.mid[1]):
            block.register_forward_pre_hook(lambda *_: runs.append(1))
        out = vae(x, generator=torch.Generator().manual_seed(0))
        (out.images.mean() + out.reconstructed_features.mean() + out.posterior.kl().mean()).backward()
        grads.append({n: p.grad for n, p in vae.named_parameters() if p.grad is not None})
        calls.append(len(runs))
    assert calls == [3, 6]  # with checkpointing each block runs again in backward
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_forward_takes_features_and_its_randomness_as_tensors():
    vae = tiny(image_size=112).eval()
    x = torch.rand(2, 3, 112, 112)
    g = torch.Generator().manual_seed(3)
    noise, dec_noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    with torch.no_grad():
        features = vae.semantic_features(x)
        out = vae(features=features, latent_noise=noise, decoder_noise=dec_noise)  # no images needed
        post = vae.encode(x)
        torch.testing.assert_close(out.latents, post.mean + post.std * noise, rtol=0, atol=0)
        torch.testing.assert_close(out.images, vae.decode(out.latents + dec_noise), rtol=0, atol=0)
        torch.testing.assert_close(out.reconstructed_features, vae.decode_features(out.latents), rtol=0, atol=0)
        assert torch.equal(vae(x, sample=False).latents, post.mean)


def test_from_pretrained_encoder_keeps_the_configs_encoder_settings(tmp_path):
    import transformers
    from transformers import AutoConfig

    from psvae_core.config import TINY_DINOV2_REG

    transformers.Dinov2WithRegistersModel(AutoConfig.for_model(**TINY_DINOV2_REG)).save_pretrained(tmp_path)
    enc = TINY.encoder.replace(image_size=112, image_mean=(0.1, 0.2, 0.3), image_std=(0.4, 0.5, 0.6),
                               resize_antialias=False, feature_norm="affine")
    vae = PSVAE.from_pretrained_encoder(TINY.replace(encoder=enc, pixel_decoder=SMALL_DECODER), str(tmp_path))
    assert (vae.encoder.image_mean, vae.encoder.image_std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    got = vae.config.encoder
    assert (got.image_size, got.resize_antialias, got.feature_norm, got.source) == (112, False, "affine", str(tmp_path))
    # Left unset, mean/std are the family's (no preprocessor_config.json in the folder).
    plain = PSVAE.from_pretrained_encoder(TINY.replace(pixel_decoder=SMALL_DECODER), str(tmp_path))
    assert plain.encoder.image_mean == (0.485, 0.456, 0.406) and plain.config.encoder.resize_antialias is True
