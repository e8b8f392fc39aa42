"""Checkpoint files: bit-exact round trip, metadata layout, atomic writes, and one test per bad file."""
import io
import json
import os
import pickle
import random
import struct
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from psvae_core import checkpoint as ckpt
from psvae_core.autoencoder import PSVAE
from psvae_core.config import ENCODER_FAMILIES
from psvae_core.checkpoint import (FORMAT_VERSION, CheckpointError, load_component, load_state_dict_checked,
                                   read_header, read_metadata, save_component)

CONFIG = {"latent_channels": 96, "encoder": {"family": "dinov2_reg", "image_size": 224}, "scales": [1, 2, 4]}
STATS = {"mean": [0.25, -1.5], "std": [1.0, 3.0]}
PROV = {"trainer": "0.1.0", "stage": "psvae", "step": 1234, "data": ["imagenet/train"]}


def _tensors():
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, 3.0])
    return {
        "f32": torch.cat([torch.randn(30, generator=g), special]).reshape(4, 9),
        "bf16": torch.cat([torch.randn(10, generator=g), special]).to(torch.bfloat16),
        "f16": torch.cat([torch.randn(10, generator=g), special]).to(torch.float16).reshape(2, 8),
        "i64": torch.tensor([-(2 ** 62), -1, 0, 1, 2 ** 62 + 7]),
        "scalar": torch.tensor(0.1),
        "empty": torch.zeros(0, 3),
    }


def _bits(t):
    # Compare raw bit patterns, so NaN payloads and -0.0 count too.
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    return t.view(ints[t.dtype]) if t.dtype in ints else t


def _save(path, kind="vae", **kw):
    args = dict(kind=kind, config=CONFIG, tensors=_tensors(), latent_stats=STATS, provenance=PROV)
    args.update(kw)
    save_component(path, **args)
    return path


def _rewrite_metadata(path, **changes):
    meta = read_metadata(path)
    meta.update(changes)
    save_file(load_file(path), path, metadata=meta)


def _raises(path, *fragments, **kw):
    with pytest.raises(CheckpointError) as info:
        load_component(path, **kw)
    msg = str(info.value)
    assert str(path) in msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


# ----------------------------------------------------------------------------- round trip + layout

def test_round_trip_is_bit_exact(tmp_path):
    path = _save(tmp_path / "vae.safetensors", extra_metadata={"psvae.note": "hello"})
    comp = load_component(path, expected_kind="vae")
    original = _tensors()
    assert comp.tensors.keys() == original.keys()
    for name, t in original.items():
        got = comp.tensors[name]
        assert got.dtype == t.dtype and got.shape == t.shape and got.device.type == "cpu"
        assert torch.equal(_bits(got), _bits(t)), name
    assert comp.kind == "vae" and comp.format_version == FORMAT_VERSION
    assert comp.config == CONFIG and comp.latent_stats == STATS
    assert {k: comp.provenance[k] for k in PROV} == PROV
    assert comp.provenance["created"].endswith("+00:00") and comp.provenance["psvae_core"]
    with pytest.raises(Exception):
        comp.kind = "generator"  # frozen


def test_metadata_layout(tmp_path):
    path = _save(tmp_path / "my-vae.safetensors", extra_metadata={"modelspec.resolution": "256x256"})
    meta = read_metadata(path)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["format"] == "psvae" and meta["format_version"] == str(FORMAT_VERSION) and meta["kind"] == "vae"
    assert json.loads(meta["config"]) == CONFIG and json.loads(meta["latent_stats"]) == STATS
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "ps-vae/vae"
    assert meta["modelspec.implementation"] == "psvae_core"
    assert meta["modelspec.title"] == "my-vae"
    assert meta["modelspec.date"] == json.loads(meta["provenance"])["created"]
    assert meta["modelspec.resolution"] == "256x256"
    header = read_header(path)
    assert header["__metadata__"] == meta and header["bf16"]["dtype"] == "BF16"


def test_optional_fields_and_tensor_latent_stats(tmp_path):
    path = tmp_path / "g.safetensors"
    save_component(path, kind="generator", config={}, tensors={"w": torch.ones(2)})
    comp = load_component(path, device=torch.device("cpu"))
    assert comp.latent_stats is None and set(comp.provenance) == {"created", "psvae_core", "transformers"}
    # Latent-stat buffers may be passed as tensors; they are stored as exact JSON lists.
    save_component(path, kind="vae", config={}, tensors={}, latent_stats={"mean": torch.tensor([0.1, -2.0])})
    assert load_component(path).latent_stats == {"mean": [torch.tensor(0.1).item(), -2.0]}


def test_shared_and_strided_tensors_are_saved_as_copies(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"w": base, "tied": base, "view": base[1:], "t": base.t(), "col": base[:, 1]}
    path = tmp_path / "tied.safetensors"
    save_component(path, kind="vae", config={}, tensors=tensors)
    got = load_component(path).tensors
    for name, t in tensors.items():
        assert torch.equal(got[name], t), name
    assert torch.equal(base, torch.arange(12.0).reshape(3, 4))  # caller's tensors untouched


def test_read_metadata_reads_no_tensor_data(tmp_path, monkeypatch):
    path = _save(tmp_path / "vae.safetensors", tensors={"big": torch.zeros(256, 1024)})

    def boom(*a, **k):
        raise AssertionError("tensor data must not be read")
    monkeypatch.setattr(ckpt, "load_file", boom)
    reads = []
    real_open = open

    class Spy:  # records how many bytes the header reader asks for
        def __init__(self, f):
            self.f = f
        def read(self, n=-1):
            reads.append(n)
            return self.f.read(n)
        def __getattr__(self, name):
            return getattr(self.f, name)
        def __enter__(self):
            return self
        def __exit__(self, *a):
            self.f.close()
    monkeypatch.setattr(ckpt, "open", lambda *a, **k: Spy(real_open(*a, **k)), raising=False)
    assert read_metadata(path)["kind"] == "vae"
    assert all(0 <= n < 64 * 1024 for n in reads) and sum(reads) < os.path.getsize(path) // 10


# ----------------------------------------------------------------------------- save: refusals + atomicity

@pytest.mark.parametrize("bad, fragment", [
    (dict(path_name="vae.pt"), ".safetensors"),
    (dict(tensors={"w": torch.ones(2), "step": 3}), "'step' is int, not a torch.Tensor"),
    (dict(tensors={"w": torch.ones(2, device="meta")}), "meta device"),
    (dict(extra_metadata={"kind": "x"}), "reserved"),
    (dict(extra_metadata={"modelspec.title": "x"}), "reserved"),
    (dict(extra_metadata={"psvae.n": 3}), "str -> str"),
    (dict(config={"s": {1, 2}}), "config cannot be stored as JSON"),
    (dict(latent_stats={"mean": float("nan")}), "latent_stats cannot be stored as JSON"),
    (dict(kind=""), "kind"),
])
def test_save_refuses_bad_input_and_keeps_existing_file(tmp_path, bad, fragment):
    good = _save(tmp_path / "vae.safetensors")
    before = good.read_bytes()
    target = tmp_path / bad.pop("path_name", "vae.safetensors")
    with pytest.raises(CheckpointError) as info:
        _save(target, **bad)
    assert fragment in str(info.value) and str(target) in str(info.value)
    assert good.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae.safetensors"]


def test_failure_while_writing_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    good = _save(tmp_path / "vae.safetensors")
    before = good.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)  # half a file, then the disk fills up
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ckpt, "save_file", disk_full)
    with pytest.raises(CheckpointError, match="No space left"):
        _save(good)
    assert good.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["vae.safetensors"]


def test_save_replaces_existing_file_and_creates_folder(tmp_path):
    path = _save(tmp_path / "out" / "sub" / "vae.safetensors")
    _save(path, kind="generator")
    assert load_component(path).kind == "generator"
    assert [p.name for p in path.parent.iterdir()] == ["vae.safetensors"]
    if os.name == "posix":  # an ordinary file for the user, not a private temp-file mode
        umask = os.umask(0)
        os.umask(umask)
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# ----------------------------------------------------------------------------- malformed files

def test_missing_file_names_folder(tmp_path):
    msg = _raises(tmp_path / "nope.safetensors", "file not found", f"searched in {tmp_path.resolve()}")
    assert "nope.safetensors" in msg
    _raises(tmp_path / "no_dir" / "x.safetensors", "does not exist")
    _raises(tmp_path, "folder, not a file")


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(random.Random(0).randbytes(4096))
    _raises(path, "not a safetensors file", "header length")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_metadata(path)


class _Payload:
    """Unpickling this creates `marker` (builtins open in write mode): proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _torch_zip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("dump, looks_like", [
    (lambda obj: pickle.dumps(obj, protocol=4), "pickle"),
    (lambda obj: pickle.dumps(obj, protocol=2), "pickle"),
    (_torch_zip, "torch.save"),
])
def test_real_pickle_is_never_unpickled(tmp_path, dump, looks_like):
    proof = tmp_path / "proof"
    payload = dump({"state_dict": {"w": torch.ones(2)}, "evil": _Payload(proof)})
    # Self-check: the payload is live, an unpickling loader would run it.
    loaded = pickle.loads(payload) if looks_like == "pickle" else torch.load(
        io.BytesIO(payload), weights_only=False)
    loaded["evil"].close()
    assert proof.exists()

    marker = tmp_path / "marker"
    path = tmp_path / "model.safetensors"
    path.write_bytes(dump({"state_dict": {"w": torch.ones(2)}, "evil": _Payload(marker)}))
    msg = _raises(path, "not a safetensors file", looks_like, "never unpickles", expected_kind="vae")
    with pytest.raises(CheckpointError):
        read_metadata(path)
    assert not marker.exists(), msg


@pytest.fixture
def good_file(tmp_path):
    return _save(tmp_path / "good.safetensors")


def _cut_points(path):
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    size = path.stat().st_size
    return {"empty": 0, "in length": 4, "in header": 8 + n // 2, "after header": 8 + n, "in data": size - 10}


@pytest.mark.parametrize("where", ["empty", "in length", "in header", "after header", "in data"])
def test_truncated_file(tmp_path, good_file, where):
    cut = _cut_points(good_file)[where]
    full = good_file.stat().st_size
    path = tmp_path / "cut.safetensors"
    path.write_bytes(good_file.read_bytes()[:cut])
    msg = _raises(path, "the file is incomplete", "re-download or re-export it")
    if where in ("after header", "in data"):
        assert f"({cut} of {full} bytes)" in msg
    else:
        assert f"({cut} of at least" in msg
    with pytest.raises(CheckpointError, match="incomplete"):
        read_metadata(path)


def test_trailing_garbage(tmp_path, good_file):
    path = tmp_path / "long.safetensors"
    path.write_bytes(good_file.read_bytes() + b"junk")
    _raises(path, "4 unexpected bytes")


def test_invalid_header_json(tmp_path):
    header = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]'  # missing closing brace
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 4)
    _raises(path, "header is not valid JSON")


def test_malformed_tensor_entry(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 4)
    _raises(path, "'w' is malformed")


def test_plain_safetensors_is_not_psvae(tmp_path):
    path = tmp_path / "sdxl_vae.safetensors"
    save_file({"w": torch.ones(2)}, path, metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base/vae"})
    _raises(path, "not a PS-VAE file", "stable-diffusion-xl-v1-base/vae")
    save_file({"w": torch.ones(2)}, path)
    _raises(path, "not a PS-VAE file")


def test_wrong_kind(good_file, tmp_path):
    gen = _save(tmp_path / "gen.safetensors", kind="generator")
    _raises(gen, "this is a generator file, the vae loader needs a vae file", expected_kind="vae")
    assert load_component(good_file, expected_kind="vae").kind == "vae"


def test_newer_format_version(good_file):
    _rewrite_metadata(good_file, format_version=str(FORMAT_VERSION + 1))
    _raises(good_file, "written by a newer version of psvae_core", "update the pack", expected_kind="vae")
    _rewrite_metadata(good_file, format_version="one")
    _raises(good_file, "not an integer")


@pytest.mark.parametrize("key", ["config", "latent_stats", "provenance"])
def test_corrupt_json_field(good_file, key):
    _rewrite_metadata(good_file, **{key: '{"latent_channels": 96,'})
    _raises(good_file, f"the '{key}' metadata is not valid JSON")


def test_error_type_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


# ----------------------------------------------------------------------------- load_state_dict_checked

class _Net(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.a = nn.Linear(3, width)
        self.b = nn.Linear(width, 2)
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))


def test_state_dict_checked_loads_and_casts_dtype():
    src = _Net()
    src.count += 5
    stored = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in src.state_dict().items()}
    dst = _Net()
    load_state_dict_checked(dst, stored, source="vae.safetensors")
    assert dst.a.weight.dtype == torch.float32 and dst.count.item() == 5
    for k, v in stored.items():
        assert torch.equal(dst.state_dict()[k], v.to(dst.state_dict()[k].dtype)), k


def test_state_dict_checked_reports_missing_unexpected_and_shapes():
    stored = _Net().state_dict()
    del stored["b.bias"]
    stored["extra.weight"] = torch.ones(1)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_checked(_Net(), stored, source="models/psvae/x.safetensors")
    msg = str(info.value)
    assert msg.startswith("models/psvae/x.safetensors")
    assert "1 missing key(s): b.bias" in msg and "1 unexpected key(s): extra.weight" in msg

    with pytest.raises(CheckpointError) as info:
        load_state_dict_checked(_Net(width=8), _Net(width=4).state_dict(), source="x.safetensors")
    msg = str(info.value)
    assert "3 shape mismatch(es)" in msg and "a.weight (file [4, 3], model [8, 3])" in msg


def test_state_dict_checked_lists_only_first_few():
    with pytest.raises(CheckpointError) as info:
        load_state_dict_checked(nn.Sequential(*[nn.Linear(1, 1) for _ in range(6)]), {}, source="s")
    msg = str(info.value)
    assert "12 missing key(s)" in msg and "(7 more)" in msg and "5.bias" not in msg


# ----------------------------------------------------------------------------- transformers layouts

# Tiny VAE files written under transformers 4.57 and 5.x by tools/make_layout_fixtures.py, with the
# latents and images each gave where it was written ("-legacy": 5.x names, as written before fixed names).
LAYOUTS = Path(__file__).parent / "data" / "layouts"
LAYOUT_FILES = sorted(p for p in LAYOUTS.glob("*.safetensors") if not p.name.endswith(".expected.safetensors"))


def test_layout_fixtures_cover_every_family_and_layout():
    assert {p.stem for p in LAYOUT_FILES} == {f"{family}-{layout}" for family in ENCODER_FAMILIES
                                              for layout in ("tf4", "tf5", "tf5-legacy")}
    written = {p.name: load_component(p).provenance["transformers"] for p in LAYOUT_FILES if "legacy" not in p.name}
    assert all(v.startswith("4.57.") for k, v in written.items() if "-tf4" in k), written
    assert all(v.startswith("5.") for k, v in written.items() if "-tf5" in k), written


@pytest.mark.parametrize("path", LAYOUT_FILES, ids=lambda p: p.stem)
def test_vae_file_gives_identical_latents_under_this_transformers(path):
    expected = load_file(LAYOUTS / f"{path.stem.removesuffix('-legacy')}.expected.safetensors")
    vae = PSVAE.from_file(path)
    with torch.no_grad():
        latents = vae.encode(expected["images"]).mode()
        assert torch.equal(latents, expected["latents"]), (path.name, transformers.__version__)
        assert torch.equal(vae.decode(expected["latents"]), expected["decoded"])


@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_files_store_fixed_tensor_names_whatever_transformers_is_installed(tmp_path, family):
    reference = LAYOUTS / f"{family}-tf4.safetensors"
    PSVAE.from_file(reference).save(tmp_path / "vae.safetensors")
    assert read_header(tmp_path / "vae.safetensors").keys() == read_header(reference).keys()
    assert load_component(tmp_path / "vae.safetensors").provenance["transformers"] == transformers.__version__


def _renamed_file(tmp_path, transformers_version):
    """The dinov2 fixture as an unknown future transformers might name it."""
    comp = load_component(LAYOUTS / "dinov2-tf4.safetensors")
    tensors = {k.replace("attention.attention.query", "attention.attn.q"): v for k, v in comp.tensors.items()}
    provenance = {} if transformers_version is None else {"transformers": transformers_version}
    path = tmp_path / "future.safetensors"
    save_component(path, kind="vae", config=comp.config, tensors=tensors, latent_stats=comp.latent_stats)
    meta = read_metadata(path)
    prov = json.loads(meta["provenance"])
    prov.pop("transformers")
    meta["provenance"] = json.dumps({**prov, **provenance})
    save_file(load_file(path), path, metadata=meta)
    return path


def test_name_mismatch_from_another_transformers_version_says_so(tmp_path):
    with pytest.raises(CheckpointError) as info:
        PSVAE.from_file(_renamed_file(tmp_path, "9.1.0"))
    msg = str(info.value)
    assert "8 tensor name(s) differ" in msg and "attention.attn.q.weight" in msg
    assert f"written under transformers 9.1.0 and this is transformers {transformers.__version__}" in msg
    assert "update the PS-VAE pack, or install transformers==9.1.0" in msg
    with pytest.raises(CheckpointError, match="a transformers version it does not record and this is transformers"):
        PSVAE.from_file(_renamed_file(tmp_path, None))
    # Written under this very version: the names are not the cause, so the usual message.
    with pytest.raises(CheckpointError, match="the file was made for another component or config"):
        PSVAE.from_file(_renamed_file(tmp_path, transformers.__version__))


# ----------------------------------------------------------------------------- stored configs and values

BASE_VAE = LAYOUTS / "dinov2_reg-tf4.safetensors"


def _vae_with(tmp_path, tensors=None, **config_changes):
    config = json.loads(read_metadata(BASE_VAE)["config"])
    for dotted, value in config_changes.items():
        *parents, leaf = dotted.split("__")
        node = config
        for key in parents:
            node = node[key]
        node[leaf] = value
    path = tmp_path / "vae.safetensors"
    meta = {**read_metadata(BASE_VAE), "config": json.dumps(config)}
    save_file(tensors if tensors is not None else load_file(BASE_VAE), path, metadata=meta)
    return path


@pytest.mark.parametrize("change, fragment", [
    (dict(encoder__hf_config__num_attention_heads=0), "num_attention_heads must be an integer in 1..8, got 0"),
    (dict(encoder__hf_config__hidden_size=-64), "hidden_size must be an integer in 1..65536, got -64"),
    (dict(encoder__hf_config__num_hidden_layers=10 ** 6), "num_hidden_layers must be an integer in 1..1024"),
    (dict(pixel_decoder__channel_mult=[]), "channel_mult must be a list of 1..8 multipliers"),
    (dict(pixel_decoder__base_channels=16.0), "base_channels must be an integer in 1..4096, got 16.0"),
    (dict(pixel_decoder__base_channels=0), "base_channels must be an integer in 1..4096, got 0"),
    (dict(semantic__depth=99), "semantic.depth 99 is larger than the encoder's 2 blocks"),
    (dict(encoder__hf_config={}), "hidden_size must be an integer in 1..65536, got None"),
])
def test_stored_config_that_cannot_build_is_a_checkpoint_error(tmp_path, change, fragment):
    path = _vae_with(tmp_path, **change)
    with pytest.raises(CheckpointError, match="the stored config is not valid") as info:
        PSVAE.from_file(path)
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_empty_stored_config_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file(load_file(BASE_VAE), path, metadata={**read_metadata(BASE_VAE), "config": "{}"})
    with pytest.raises(CheckpointError, match="no encoder.hf_config"):
        PSVAE.from_file(path)


def test_config_too_big_for_its_tensors_is_refused_before_allocating_or_reading(tmp_path, monkeypatch):
    path = _vae_with(tmp_path, pixel_decoder__base_channels=4096, encoder__hf_config__hidden_size=4096)
    devices = []
    real_init = PSVAE.__init__

    def spy(self, *args, **kwargs):
        devices.append(torch.empty(0).device.type)  # the device modules are built on
        real_init(self, *args, **kwargs)
    monkeypatch.setattr(PSVAE, "__init__", spy)
    monkeypatch.setattr(ckpt, "load_file", lambda *a, **k: pytest.fail("tensor data read before the check"))
    with pytest.raises(CheckpointError, match="the weights do not fit this model") as info:
        PSVAE.from_file(path)
    assert "shape mismatch(es)" in str(info.value) and "model [4096]" in str(info.value)
    assert devices == ["meta"]


@pytest.mark.parametrize("key, value, fragment", [
    ("encoder.model.embeddings.cls_token", float("nan"), "1 tensor(s) holding NaN/Inf values: encoder.model.embeddings.cls_token"),
    ("pixel_decoder.conv_in.weight", float("inf"), "NaN/Inf values: pixel_decoder.conv_in.weight"),
    ("latents_std", float("nan"), "NaN/Inf values: latents_std"),
    ("latents_std", 0.0, "latents_std holds 1 zero or negative value(s)"),
    ("latents_std", -2.0, "latents_std holds 1 zero or negative value(s)"),
])
def test_non_finite_weights_and_bad_latent_std_are_refused(tmp_path, key, value, fragment):
    tensors = load_file(BASE_VAE)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = value
    path = _vae_with(tmp_path, tensors=tensors)
    with pytest.raises(CheckpointError, match="re-export") as info:
        PSVAE.from_file(path)
    assert fragment in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("version", ["0", "-1"])
def test_format_version_below_one_is_refused(good_file, version):
    _rewrite_metadata(good_file, format_version=version)
    _raises(good_file, f"format_version {version} is not a valid version")


def test_deeply_nested_json_is_a_checkpoint_error(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    header = f'{{"x": {deep}}}'.encode()
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    for read in (read_metadata, ckpt.fingerprint, load_component):
        with pytest.raises(CheckpointError, match="nests JSON too deeply"):
            read(path)
    for key in ("config", "latent_stats", "provenance"):
        other = _save(tmp_path / f"{key}.safetensors")
        _rewrite_metadata(other, **{key: deep})
        _raises(other, f"the '{key}' metadata nests JSON too deeply")


@pytest.mark.skipif(os.name != "posix", reason="FIFOs and symlink loops are POSIX")
def test_fifos_devices_and_symlink_loops_say_what_they_are(tmp_path):
    fifo, loop = tmp_path / "fifo.safetensors", tmp_path / "loop.safetensors"
    os.mkfifo(fifo)
    loop.symlink_to(loop)
    for path, fragment in [(fifo, "this is a FIFO (named pipe), not a regular file"),
                           (os.devnull, "this is a device, not a regular file"),
                           (loop, "Too many levels of symbolic links"),
                           (tmp_path / "none.safetensors", "file not found")]:
        for read in (read_metadata, ckpt.fingerprint, load_component):
            with pytest.raises(CheckpointError) as info:
                read(path)
            assert fragment in str(info.value) and str(path) in str(info.value)


def test_huge_sparse_file_is_refused_without_reading_it(tmp_path, monkeypatch):
    size = ckpt.MAX_FILE_BYTES + (1 << 30)
    header = json.dumps({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + size)  # sparse: no disk space used
    monkeypatch.setattr(ckpt.hashlib, "sha256", lambda *a: pytest.fail("the data must not be hashed"))
    for read in (read_metadata, ckpt.fingerprint, load_component):
        with pytest.raises(CheckpointError, match=r"the file is 33.0 GiB, more than any PS-VAE component \(32 GiB"):
            read(path)
