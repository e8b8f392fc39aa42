"""RepresentationEncoder against the transformers models it wraps (tiny random models, CPU)."""
import json

import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoConfig

from psvae_core.config import EncoderConfig
from psvae_core.encoders import RepresentationEncoder

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5,) * 3, (0.5,) * 3)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)

# family: (transformers class, tiny config, prefix tokens, (mean, std), extra forward kwargs)
CASES = {
    "dinov2": ("Dinov2Model", dict(model_type="dinov2", patch_size=14, image_size=224), 1, IMAGENET, {}),
    "dinov2_reg": ("Dinov2WithRegistersModel", dict(model_type="dinov2_with_registers", patch_size=14,
                                                     image_size=224, num_register_tokens=2), 3, IMAGENET, {}),
    "dinov3": ("DINOv3ViTModel", dict(model_type="dinov3_vit", patch_size=16, image_size=224,
                                      num_register_tokens=2, pos_embed_rescale=2.0), 3, IMAGENET, {}),
    "siglip": ("SiglipVisionModel", dict(model_type="siglip_vision_model", patch_size=14, image_size=224), 0, HALF,
               {"interpolate_pos_encoding": True}),
    "siglip2": ("Siglip2VisionModel", dict(model_type="siglip2_vision_model", patch_size=14, num_patches=256), 0,
                HALF, {}),
    "clip": ("CLIPVisionModel", dict(model_type="clip_vision_model", patch_size=14, image_size=224), 1, CLIP,
             {"interpolate_pos_encoding": True}),
}
PATCH14 = [f for f in CASES if CASES[f][1]["patch_size"] == 14]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> folder holding a tiny random transformers model (save_pretrained)."""
    out = {}
    for i, (family, (cls_name, cfg, *_)) in enumerate(CASES.items()):
        torch.manual_seed(i)
        model = getattr(transformers, cls_name)(AutoConfig.for_model(**cfg, **TINY))
        out[family] = tmp_path_factory.mktemp(family)
        model.save_pretrained(out[family])
    return out


def _images(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _reference(family, folder, images, size):
    """(pre-norm patch tokens, the model's own last_hidden_state patch tokens), computed by hand."""
    cls_name, _, prefix, (mean, std), kwargs = CASES[family]
    model = getattr(transformers, cls_name).from_pretrained(folder, attn_implementation="eager").eval()
    pixels = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
    pixels = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    if family == "siglip2":  # NaFlex: (row, col) patches flattened as (py, px, channel)
        b, c, height, width = pixels.shape
        p, h, w = 14, height // 14, width // 14
        patches = pixels.reshape(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, -1)
        kwargs = dict(pixel_attention_mask=torch.ones(b, h * w, dtype=torch.long),
                      spatial_shapes=torch.tensor([[h, w]] * b))
        pixels = patches
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True, **kwargs)
    return out.hidden_states[-1][:, prefix:], out.last_hidden_state[:, prefix:], model.config.layer_norm_eps


def _as_tokens(features):
    return features.flatten(2).transpose(1, 2)


def _layer_stack(model):
    (stack,) = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == TINY["num_hidden_layers"]]
    return stack


@pytest.mark.parametrize("family", CASES)
def test_features_match_transformers_pre_norm_state_with_plain_layernorm(folders, family):
    encoder = RepresentationEncoder.from_pretrained(folders[family]).eval()
    images = _images(2, 3, 200, 240)
    pre_norm, _, eps = _reference(family, folders[family], images, (224, 224))
    with torch.no_grad():
        features = encoder(images)
    grid = 224 // CASES[family][1]["patch_size"]
    assert encoder.config.family == family and encoder.num_prefix_tokens == CASES[family][2]
    assert features.shape == (2, 32, grid, grid)
    torch.testing.assert_close(_as_tokens(features), F.layer_norm(pre_norm, (32,), eps=eps), atol=1e-5, rtol=1e-5)
    encoder = RepresentationEncoder.from_pretrained(folders[family], feature_norm="none").eval()
    with torch.no_grad():
        torch.testing.assert_close(_as_tokens(encoder(images)), pre_norm, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", [f for f in CASES if f != "clip"])  # CLIP's last_hidden_state is not normed
def test_affine_features_match_the_model_final_norm_output(folders, family):
    encoder = RepresentationEncoder.from_pretrained(folders[family], feature_norm="affine").eval()
    images = _images(1, 3, 224, 224)
    _, normed, _ = _reference(family, folders[family], images, (224, 224))
    with torch.no_grad():
        torch.testing.assert_close(_as_tokens(encoder(images)), normed, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("family", PATCH14)
def test_224_gives_a_16x16_grid(folders, family, batch):
    encoder = RepresentationEncoder.from_pretrained(folders[family])
    assert encoder.grid_size(300, 500) == (16, 16)
    assert encoder(_images(batch, 3, 256, 256)).shape == (batch, 32, 16, 16)


@pytest.mark.parametrize("family", CASES)
def test_native_mode_rounds_each_side_to_the_patch_grid(folders, family):
    encoder = RepresentationEncoder.from_pretrained(folders[family], image_size=None)
    p = encoder.patch_size
    assert encoder(_images(1, 3, 448, 448)).shape[-2:] == (round(448 / p),) * 2
    assert encoder(_images(1, 3, 16 * p, 24 * p)).shape == (1, 32, 16, 24)  # non-square, no resize
    assert encoder.grid_size(448, 448) == ((32, 32) if p == 14 else (28, 28))
    assert encoder.grid_size(int(16.5 * p), int(6.4 * p)) == (17, 6)
    assert encoder.grid_size(3, 3) == (1, 1)


def test_native_mode_features_match_transformers_on_non_square_input(folders):
    encoder = RepresentationEncoder.from_pretrained(folders["clip"], image_size=None).eval()
    images = _images(1, 3, 230, 330)
    pre_norm, _, eps = _reference("clip", folders["clip"], images, (224, 336))
    with torch.no_grad():
        features = encoder(images)
    assert features.shape == (1, 32, 16, 24)
    torch.testing.assert_close(_as_tokens(features), F.layer_norm(pre_norm, (32,), eps=eps), atol=1e-5, rtol=1e-5)


def test_mean_std_come_from_preprocessor_config(folders, tmp_path):
    model = transformers.Dinov2Model.from_pretrained(folders["dinov2"])
    model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3],
                                                                   "image_std": [0.4, 0.5, 0.6]}))
    encoder = RepresentationEncoder.from_pretrained(tmp_path)
    assert encoder.config.image_mean == (0.1, 0.2, 0.3) and encoder.config.image_std == (0.4, 0.5, 0.6)
    assert RepresentationEncoder.from_pretrained(tmp_path, image_std=(1.0, 1.0, 1.0)).config.image_std == (1.0,) * 3
    images = _images(1, 3, 224, 224)
    pixels = (images - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)
    with torch.no_grad():
        pre_norm = model.eval()(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
        expected = F.layer_norm(pre_norm, (32,), eps=model.config.layer_norm_eps)
        torch.testing.assert_close(_as_tokens(encoder.eval()(images)), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", CASES)
def test_config_json_rebuilds_the_same_encoder(folders, family):
    encoder = RepresentationEncoder.from_pretrained(folders[family]).eval()
    config = EncoderConfig.from_json(encoder.config.to_json())
    assert config.source == str(folders[family]) and config.hf_config["model_type"] == CASES[family][1]["model_type"]
    rebuilt = RepresentationEncoder(config)
    rebuilt.load_state_dict(encoder.state_dict(), strict=True)
    images = _images(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(images), encoder(images), atol=0, rtol=0)


def test_random_init_follows_the_torch_seed():
    config = EncoderConfig(family="dinov2", hf_config=dict(model_type="dinov2", patch_size=14, **TINY))

    def weight(seed, build):
        torch.manual_seed(seed)
        return build(config).state_dict()["model.embeddings.patch_embeddings.projection.weight"]

    assert torch.equal(weight(7, RepresentationEncoder), weight(7, RepresentationEncoder.from_config))
    assert not torch.equal(weight(7, RepresentationEncoder), weight(8, RepresentationEncoder))


def test_dinov3_features_do_not_depend_on_train_mode(folders):
    encoder = RepresentationEncoder.from_pretrained(folders["dinov3"])
    images = _images(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(encoder.train()(images), encoder.eval()(images), atol=0, rtol=0)


@pytest.mark.parametrize("constant", [False, True])
def test_offline_hub_id_raises_with_download_instructions(monkeypatch, tmp_path, constant):
    monkeypatch.chdir(tmp_path)  # no folder named like the hub id
    if constant:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"HF_HUB_OFFLINE.*huggingface-cli download facebook/dinov2-base"):
        RepresentationEncoder.from_pretrained("facebook/dinov2-base")


def test_missing_or_wrong_folders_raise_clear_errors(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RepresentationEncoder.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        RepresentationEncoder.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pass the matching family"):
        RepresentationEncoder.from_pretrained(folders["dinov2"], family="clip")
    with pytest.raises(ValueError, match="from_pretrained"):
        RepresentationEncoder(EncoderConfig(family="dinov2"))


def test_frozen_copy_and_set_trainable(folders):
    encoder = RepresentationEncoder.from_pretrained(folders["dinov2_reg"])
    assert encoder.set_trainable(False) is encoder
    assert not any(p.requires_grad for p in encoder.parameters())
    # Training: everything a forward pass uses; the mask token and the unused affine final norm
    # stay frozen (data-parallel training needs a gradient for every trainable parameter).
    frozen = sorted(n for n, p in encoder.set_trainable(True).named_parameters() if not p.requires_grad)
    assert frozen == ["final_norm.bias", "final_norm.weight", "model.embeddings.mask_token"]
    assert RepresentationEncoder.from_pretrained(folders["dinov2_reg"], feature_norm="affine").set_trainable(True) \
        .final_norm.weight.requires_grad
    teacher = encoder.frozen_copy()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert sum(p.requires_grad for p in encoder.parameters()) == sum(1 for _ in encoder.parameters()) - 3
    images = _images(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(teacher(images), encoder.eval()(images), atol=0, rtol=0)
        next(encoder.parameters()).add_(1.0)  # the copy is independent
        assert not torch.equal(teacher(images), encoder(images))


@pytest.mark.parametrize("family", CASES)
def test_blocks_copy_fresh_rebuild_and_gradients(folders, family):
    encoder = RepresentationEncoder.from_pretrained(folders[family]).set_trainable(False)
    copied, fresh = encoder.make_blocks(1, "copy"), encoder.make_blocks(1, "fresh")
    last = _layer_stack(encoder.model)[-1].state_dict()
    assert {k: v.shape for k, v in copied.state_dict().items()} == {f"layers.0.{k}": v.shape for k, v in last.items()}
    assert all(torch.equal(copied.state_dict()[f"layers.0.{k}"], v) for k, v in last.items())
    assert copied.state_dict().keys() == fresh.state_dict().keys()
    assert any(not torch.equal(fresh.state_dict()[k], v) for k, v in copied.state_dict().items())
    assert all(p.requires_grad for p in copied.parameters())  # trainable though the encoder is frozen

    # A checkpoint of the blocks loads into the blocks of an encoder rebuilt from the config alone.
    blocks = encoder.make_blocks(2, "copy")
    rebuilt = RepresentationEncoder(encoder.config).make_blocks(2, "fresh")
    rebuilt.load_state_dict(blocks.state_dict(), strict=True)

    tokens = torch.randn(2, 16 * 16, 32, requires_grad=True)  # a 16x16 grid for every family
    out = blocks(tokens, (16, 16))
    assert out.shape == tokens.shape
    torch.testing.assert_close(rebuilt(tokens, (16, 16)), out, atol=0, rtol=0)
    out.square().mean().backward()
    assert tokens.grad.abs().sum() > 0
    assert all(p.grad is not None for p in blocks.parameters())


def test_blocks_edge_cases(folders):
    encoder = RepresentationEncoder.from_pretrained(folders["dinov3"])
    tokens = torch.randn(1, 12, 32)
    for init in ("copy", "fresh"):
        identity = encoder.make_blocks(0, init)
        assert len(identity.state_dict()) == 0 and torch.equal(identity(tokens, (3, 4)), tokens)
    with pytest.raises(ValueError, match="0..2"):
        encoder.make_blocks(3, "copy")
    with pytest.raises(ValueError, match="'copy' or 'fresh'"):
        encoder.make_blocks(1, "random")
    with pytest.raises(ValueError, match="grid"):
        encoder.make_blocks(1)(tokens, (4, 4))


def test_resize_without_antialiasing_is_an_option(folders):
    images = _images(2, 3, 448, 448)  # a downscale, where antialiasing changes the pixels
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET)
    out = {}
    for antialias in (True, False):
        encoder = RepresentationEncoder.from_pretrained(folders["dinov2"], resize_antialias=antialias)
        assert encoder.config.resize_antialias is antialias
        expected = F.interpolate(images, size=(224, 224), mode="bicubic", align_corners=False, antialias=antialias)
        out[antialias] = encoder.preprocess(images)
        torch.testing.assert_close(out[antialias], (expected - mean) / std, rtol=0, atol=0)
    assert (out[True] - out[False]).abs().max() > 0.05
    assert EncoderConfig().resize_antialias is True  # the default is unchanged
