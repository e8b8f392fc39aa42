"""Loading files onto a model built on the meta device (checkpoint.build_checked): the same model as
building it for real and copying the weights in, without random init and without a second copy."""
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from psvae_core import checkpoint
from psvae_core.autoencoder import PSVAE
from psvae_core.config import PRESETS as VAE_PRESETS, EncoderConfig, PixelDecoderConfig
from psvae_core.encoders import file_names
from psvae_core.fusion import PRESETS, FusionDiffuser
from test_encoders import CASES, TINY
from tiny_models import one_thread  # noqa: F401  (autouse)

DECODER = PixelDecoderConfig(base_channels=8, channel_mult=(1, 1, 1, 1, 1), num_res_blocks=1)


def _vae(family: str, block_init: str = "copy") -> PSVAE:
    torch.manual_seed(0)
    hf = {**CASES[family][1], **TINY}
    base = VAE_PRESETS["tiny"]
    return PSVAE(base.replace(latent_channels=8, encoder=EncoderConfig(family=family, hf_config=hf),
                              semantic=base.semantic.replace(block_init=block_init), pixel_decoder=DECODER))


def _old_path(cls, model, path, **build):
    """How files were loaded before: build for real (random init), then copy the weights in."""
    fresh = cls(model.config, **build)
    checkpoint.load_state_dict_checked(fresh, load_file(path), source=str(path), names=file_names(fresh))
    return fresh


def _all_tensors(model):
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _assert_same_tensors(got, want):
    got, want = _all_tensors(got), _all_tensors(want)
    assert got.keys() == want.keys()
    for k in want:
        assert not got[k].is_meta, k
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


# Every encoder family (the RoPE, position-id buffers a file does not hold), and "fresh" semantic
# blocks, whose RoPE module the build would otherwise move to the meta device with the parameters.
@pytest.mark.parametrize("family,block_init", [(f, "copy") for f in CASES] + [("dinov3", "fresh")])
@torch.no_grad()
def test_vae_loads_the_same_model_as_the_old_path(tmp_path, family, block_init):
    vae = _vae(family, block_init)
    path = tmp_path / "vae.safetensors"
    vae.save(path)
    loaded, old = PSVAE.from_file(path), _old_path(PSVAE, vae, path).eval()
    _assert_same_tensors(loaded, old)
    _assert_same_tensors(loaded, vae)
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    z = old.encode(images).mode()
    assert torch.equal(loaded.encode(images).mode(), z)
    assert torch.equal(loaded.decode_features(z), old.decode_features(z))
    assert torch.equal(loaded.decode(z), old.decode(z))


@pytest.fixture
def generator_file(tmp_path):
    torch.manual_seed(0)
    model = FusionDiffuser(PRESETS["tiny"])
    path = tmp_path / "gen.safetensors"
    model.save(path)
    return model, path


@torch.no_grad()
def test_generator_loads_the_same_model_as_the_old_path(generator_file):
    model, path = generator_file
    loaded, old = FusionDiffuser.from_file(path).eval(), _old_path(FusionDiffuser, model, path).eval()
    _assert_same_tensors(loaded, old)
    rotary = loaded.backbone.lm.rotary_emb  # not a buffer: a tensor attribute the build computes
    assert torch.equal(rotary.original_inv_freq, old.backbone.lm.rotary_emb.original_inv_freq)
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(2))
    source = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(loaded(x, 0.3, ids), old(x, 0.3, ids))
    assert torch.equal(loaded(x, 0.7, ids, source), old(x, 0.7, ids, source))


@torch.no_grad()
def test_dtype_is_applied_while_loading(tmp_path, generator_file):
    model, _ = generator_file
    path = tmp_path / "bf16.safetensors"
    model.save(path, dtype=torch.bfloat16)
    loaded = FusionDiffuser.from_file(path, dtype=torch.bfloat16)
    reference = _old_path(FusionDiffuser, model, path).to(dtype=torch.bfloat16)  # the nodes' old way
    _assert_same_tensors(loaded, reference)
    as_built = FusionDiffuser.from_file(path)  # no dtype: float32, as a built model is
    assert {t.dtype for t in as_built.state_dict().values() if t.is_floating_point()} == {torch.float32}


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and os.path.realpath(fields[5]) == os.path.realpath(path):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                spans.append((start, end))
    return spans


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process' memory map (Linux)")
def test_parameters_are_the_memory_mapped_file_not_a_copy(generator_file):
    _, path = generator_file
    model = FusionDiffuser.from_file(path)
    spans = _file_mappings(path)
    assert spans, "the file is not memory-mapped"
    inside = lambda t: any(a <= t.data_ptr() and t.data_ptr() + t.nbytes <= b for a, b in spans)  # noqa: E731
    outside = [k for k, p in model.named_parameters() if not inside(p)]
    assert outside == []


class _RandomInit(TorchDispatchMode):
    """Counts the random numbers an init writes into real (not meta) tensors: the in-place random
    ops (`uniform_`, `normal_`, ...) that nn.init and transformers' `_init_weights` use. Tables a
    constructor draws as new tensors (`nn.Parameter(torch.randn(...))`, small) are not counted."""

    def __init__(self):
        super().__init__()
        self.drawn = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("uniform_", "normal_", "bernoulli_", "random_", "exponential_", "cauchy_", "log_normal_",
                    "geometric_") and not out.is_meta:
            self.drawn += out.numel()
        return out


@pytest.mark.parametrize("kind", ["vae", "generator"])
def test_loading_runs_no_random_init(tmp_path, kind):
    model = _vae("dinov2_reg") if kind == "vae" else FusionDiffuser(PRESETS["tiny"])
    path = tmp_path / f"{kind}.safetensors"
    model.save(path)
    load = PSVAE.from_file if kind == "vae" else FusionDiffuser.from_file
    with _RandomInit() as building:  # what a real build draws: most weights
        type(model)(model.config)
    with _RandomInit() as loading:
        load(path)
    assert building.drawn > sum(p.numel() for p in model.parameters()) / 2
    assert loading.drawn == 0


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_keys_that_do_not_fit_still_name_the_file_and_the_fix(generator_file, tmp_path, change):
    _, good = generator_file
    tensors = load_file(good)
    if change == "missing":
        tensors.pop(next(iter(tensors)))
    else:
        tensors["extra.weight"] = torch.ones(2)
    path = tmp_path / f"{change}.safetensors"
    save_file(tensors, path, metadata=checkpoint.read_metadata(good))
    with pytest.raises(checkpoint.CheckpointError, match=rf"{path}: the weights do not fit this model: 1 {change} key"
                                                         r".*pick the matching file"):
        FusionDiffuser.from_file(path)
