"""Generator data (trainer/data/): every source format on real photos, bad-data reports,
tar-shard splitting over ranks and workers, the latent cache and the dropout masks."""
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from psvae_core.autoencoder import PSVAE
from psvae_core.config import PRESETS
from trainer import data as td
from test_trainer_helpers import write_sample_photos

from tiny_models import one_thread  # noqa: F401  (an autouse fixture)

NAMES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("photos")
    return {p.stem: p for p in write_sample_photos(folder, size=96, names=NAMES)}


def caption(name: str) -> str:
    return f"a photo of the {name}, in detail"


def put(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


def copy_to(src: Path, dst: Path, fmt: str = "PNG") -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    Image.open(src).convert("RGB").save(dst, format=fmt)
    return dst


def caption_folder(photos: dict, root: Path, names=NAMES) -> Path:
    """`root/<name>.png` with its caption `root/<name>.txt` for each of `names`."""
    for name in names:
        copy_to(photos[name], root / f"{name}.png")
        put(root / f"{name}.txt", caption(name))
    return root


def truncated_jpeg(src: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(src).convert("RGB").save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    return data[: len(data) // 2]


def same_image(a: torch.Tensor, path: Path) -> bool:
    return torch.equal(a, td.load_image(path))


# ================================================================================== T2I sources
def test_caption_folder_pairs_images_with_captions_and_reports_bad_files(photos, tmp_path):
    root = tmp_path / "data"
    copy_to(photos["astronaut"], root / "astronaut.png")
    put(root / "astronaut.txt", caption("astronaut"))
    copy_to(photos["coffee"], root / "drinks" / "coffee.jpg", "JPEG")
    put(root / "drinks" / "coffee.txt", caption("coffee") + "\n")
    copy_to(photos["chelsea"], root / "cats" / "deep" / "chelsea.webp", "WEBP")
    put(root / "cats" / "deep" / "chelsea.txt", caption("chelsea"))
    copy_to(photos["rocket"], root / "rocket.png")  # no caption
    put(root / "broken.png", b"\x89PNG\r\n\x1a\n this is not an image")
    put(root / "broken.txt", "a broken file")
    copy_to(photos["camera"], root / "camera.png")
    put(root / "camera.txt", "  \n")  # empty caption
    copy_to(photos["coins"], root / ".hidden" / "coins.png")  # ignored
    put(root / ".hidden" / "coins.txt", caption("coins"))

    ds = td.CaptionFolder(root, seed=0)
    assert len(ds) == 3
    items = {ds[i]["key"]: ds[i] for i in range(len(ds))}
    assert set(items) == {"astronaut.png", "drinks/coffee.jpg", "cats/deep/chelsea.webp"}
    for key, item in items.items():
        name = Path(key).stem
        assert item["text"] == caption(name)
        assert item["image"].shape == (3, 256, 256) and item["image"].dtype == torch.float32
        assert 0 <= item["image"].min() and item["image"].max() <= 1
        assert same_image(item["image"], root / key)
    report = ds.report()
    assert report["used"] == 3 and report["found"] == 6
    assert report["skipped"] == {"missing_caption": 1, "unreadable_image": 1, "empty_caption": 1}
    assert report["examples"]["missing_caption"] == [str(root / "rocket.png")]
    assert report["examples"]["unreadable_image"] == [str(root / "broken.png")]


def test_map_order_is_deterministic_from_the_seed(photos, tmp_path):
    root = caption_folder(photos, tmp_path / "data")
    keys = lambda ds: [ds.key(i) for i in range(len(ds))]  # noqa: E731
    a, b = td.CaptionFolder(root, seed=3), td.CaptionFolder(root, seed=3)
    assert keys(a) == keys(b)
    assert sorted(keys(a)) == sorted(f"{n}.png" for n in NAMES)
    assert keys(td.CaptionFolder(root, seed=4)) != keys(a)
    assert keys(td.CaptionFolder(root, shuffle=False)) == sorted(keys(a))


def test_unreadable_image_found_at_load_time_is_replaced_and_counted(photos, tmp_path):
    root = caption_folder(photos, tmp_path / "data", ("astronaut", "coffee"))
    put(root / "half.jpg", truncated_jpeg(photos["rocket"]))  # passes PIL's verify, fails to decode
    put(root / "half.txt", "a truncated jpeg")
    ds = td.CaptionFolder(root, shuffle=False)
    assert len(ds) == 3 and ds.report()["skipped"] == {}
    order = [ds.key(i) for i in range(3)]
    item = ds[order.index("half.jpg")]
    assert item["key"] != "half.jpg"
    assert ds.report()["skipped"] == {"unreadable_image": 1}
    assert "half.jpg" in ds.report()["examples"]["unreadable_image"][0]


def test_empty_sources_raise_a_loud_error(photos, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(td.EmptyDatasetError, match="no usable sample"):
        td.CaptionFolder(tmp_path / "empty")
    copy_to(photos["coffee"], tmp_path / "nocap" / "coffee.png")
    with pytest.raises(td.EmptyDatasetError, match="1 missing_caption"):
        td.CaptionFolder(tmp_path / "nocap")
    put(tmp_path / "m.jsonl", "")
    with pytest.raises(td.EmptyDatasetError):
        td.CaptionManifest(tmp_path / "m.jsonl")
    with pytest.raises(td.DataError, match="does not exist"):
        td.CaptionFolder(tmp_path / "nowhere")


def test_caption_manifest_resolves_paths_relative_to_the_manifest(photos, tmp_path):
    base = tmp_path / "set"
    copy_to(photos["astronaut"], base / "img" / "a.png")
    copy_to(photos["chelsea"], tmp_path / "elsewhere" / "cat.jpg", "JPEG")
    put(base / "img" / "bad.png", b"garbage")
    lines = [
        json.dumps({"image": "img/a.png", "text": caption("astronaut")}),
        json.dumps({"image": str(tmp_path / "elsewhere" / "cat.jpg"), "text": caption("chelsea"), "key": "cat"}),
        "{not json",
        json.dumps({"image": "img/missing.png", "text": "gone"}),
        json.dumps({"image": "img/bad.png", "text": "garbage"}),
        json.dumps({"image": "img/a.png"}),
        "",
    ]
    put(base / "train.jsonl", "\n".join(lines))
    ds = td.CaptionManifest(base / "train.jsonl")
    items = {ds[i]["key"]: ds[i] for i in range(len(ds))}
    assert set(items) == {"img/a.png", "cat"}
    assert items["img/a.png"]["text"] == caption("astronaut")
    assert same_image(items["img/a.png"]["image"], base / "img" / "a.png")
    assert same_image(items["cat"]["image"], tmp_path / "elsewhere" / "cat.jpg")
    report = ds.report()
    assert report["skipped"] == {"bad_manifest_line": 1, "missing_image": 1, "unreadable_image": 1,
                                 "missing_caption": 1}
    assert report["examples"]["bad_manifest_line"] == [f"{base / 'train.jsonl'}:3"]


def test_hf_datasets_source_needs_datasets_or_reads_it(photos, tmp_path):
    try:
        import datasets
    except ImportError:
        with pytest.raises(td.MissingDependencyError, match="pip install datasets"):
            td.HFCaptionDataset(tmp_path)
        return
    rows = {"image": [str(photos[n]) for n in NAMES[:3]], "caption": [caption(n) for n in NAMES[:3]]}
    ds = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    ds.to_parquet(str(tmp_path / "part.parquet"))
    for source in (tmp_path / "hf", tmp_path / "part.parquet"):
        hf = td.HFCaptionDataset(source, text_column="caption", shuffle=False)
        for i in range(3):
            item = hf[i]
            assert item["text"] == caption(NAMES[i])
            assert torch.allclose(item["image"], td.load_image(photos[NAMES[i]]))
    with pytest.raises(td.DataError, match="no column 'text'"):
        td.HFCaptionDataset(tmp_path / "hf")


# ================================================================================== edit sources
def test_edit_folder_matches_by_name_with_instruction_files(photos, tmp_path):
    root = tmp_path / "edits"
    copy_to(photos["astronaut"], root / "source" / "one.png")
    copy_to(photos["coffee"], root / "target" / "one.jpg", "JPEG")
    put(root / "instruction" / "one.txt", "turn the astronaut into coffee")
    copy_to(photos["chelsea"], root / "source" / "cats" / "two.png")
    copy_to(photos["rocket"], root / "target" / "cats" / "two.png")
    put(root / "instruction" / "cats" / "two.txt", "replace the cat by a rocket")
    copy_to(photos["camera"], root / "source" / "lonely.png")  # no target
    copy_to(photos["coins"], root / "target" / "orphan.png")  # no source
    copy_to(photos["coins"], root / "source" / "mute.png")  # no instruction
    copy_to(photos["coins"], root / "target" / "mute.png")
    put(root / "source" / "broken.png", b"nope")
    copy_to(photos["coins"], root / "target" / "broken.png")
    put(root / "instruction" / "broken.txt", "fix it")

    ds = td.EditFolder(root)
    items = {ds[i]["key"]: ds[i] for i in range(len(ds))}
    assert set(items) == {"one", "cats/two"}
    assert items["one"]["text"] == "turn the astronaut into coffee"
    assert same_image(items["one"]["source"], root / "source" / "one.png")
    assert same_image(items["one"]["image"], root / "target" / "one.jpg")
    assert same_image(items["cats/two"]["source"], root / "source" / "cats" / "two.png")
    assert same_image(items["cats/two"]["image"], root / "target" / "cats" / "two.png")
    assert ds.report()["skipped"] == {"missing_target": 1, "missing_source": 1, "missing_instruction": 1,
                                      "unreadable_image": 1}


def test_edit_folder_with_one_instructions_jsonl(photos, tmp_path):
    root = tmp_path / "edits"
    for name, (src, tgt) in {"a": ("astronaut", "coffee"), "b": ("chelsea", "rocket")}.items():
        copy_to(photos[src], root / "source" / f"{name}.png")
        copy_to(photos[tgt], root / "target" / f"{name}.png")
    put(root / "instructions.jsonl", "\n".join([json.dumps({"name": "a", "instruction": "make coffee"}),
                                                json.dumps({"key": "b.png", "instruction": "launch"}),
                                                json.dumps({"name": "zzz"})]))
    ds = td.EditFolder(root, shuffle=False)
    assert [(ds[i]["key"], ds[i]["text"]) for i in range(2)] == [("a", "make coffee"), ("b", "launch")]
    assert ds.report()["skipped"] == {"bad_manifest_line": 1}
    with pytest.raises(td.EmptyDatasetError, match="missing_instruction"):
        td.EditFolder(root, instructions=put(tmp_path / "none.jsonl", json.dumps({"name": "q", "instruction": "x"})))


def test_edit_manifest(photos, tmp_path):
    copy_to(photos["astronaut"], tmp_path / "s" / "1.png")
    copy_to(photos["coffee"], tmp_path / "t" / "1.png")
    lines = [json.dumps({"source": "s/1.png", "target": "t/1.png", "instruction": "make it coffee"}),
             json.dumps({"source": "s/1.png", "instruction": "no target"}),
             json.dumps({"source": "s/1.png", "target": "t/missing.png", "instruction": "gone", "key": "x"})]
    ds = td.EditManifest(put(tmp_path / "edits.jsonl", "\n".join(lines)))
    assert len(ds) == 1
    item = ds[0]
    assert item["key"] == "t/1.png" and item["text"] == "make it coffee"
    assert same_image(item["source"], tmp_path / "s" / "1.png") and same_image(item["image"], tmp_path / "t" / "1.png")
    assert ds.report()["skipped"] == {"missing_target": 1, "missing_image": 1}


def test_open_picks_the_source_type(photos, tmp_path):
    copy_to(photos["coffee"], tmp_path / "f" / "c.png")
    put(tmp_path / "f" / "c.txt", "coffee")
    put(tmp_path / "m.jsonl", json.dumps({"image": "f/c.png", "text": "coffee"}))
    assert isinstance(td.open_t2i(tmp_path / "f"), td.CaptionFolder)
    assert isinstance(td.open_t2i(tmp_path / "m.jsonl"), td.CaptionManifest)
    write_shards(tmp_path / "sh", photos, shards=1, per_shard=1)
    assert isinstance(td.open_t2i(str(tmp_path / "sh" / "shard-{0000..0000}.tar")), td.TarShardStream)


# ================================================================================== tar shards
def _png_bytes(path: Path, size=32) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").resize((size, size)).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, photos: dict, shards: int, per_shard: int, bad: bool = False) -> dict:
    """Shards shard-0000.tar ...; returns {key: caption} of the good samples."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(photos)
    good = {}
    for s in range(shards):
        with tarfile.open(folder / f"shard-{s:04d}.tar", "w") as tar:
            for j in range(per_shard):
                key = f"{s:04d}{j:04d}"
                name = names[(s * per_shard + j) % len(names)]
                _add(tar, f"{key}.png", _png_bytes(photos[name]))
                text = f"{caption(name)} #{key}"
                if j % 2:
                    _add(tar, f"{key}.json", json.dumps({"caption": text, "width": 32}).encode())
                else:
                    _add(tar, f"{key}.txt", text.encode())
                good[f"shard-{s:04d}.tar/{key}"] = text
            if bad:
                _add(tar, f"nocap{s}.png", _png_bytes(photos[names[0]]))
                _add(tar, f"corrupt{s}.jpg", b"not a jpeg")
                _add(tar, f"corrupt{s}.txt", b"a corrupt image")
    return good


def test_tar_shards_read_captions_and_count_bad_samples(photos, tmp_path):
    good = write_shards(tmp_path, photos, shards=2, per_shard=3, bad=True)
    with open(tmp_path / "shard-0001.tar", "rb") as f:  # a third, truncated shard
        data = f.read()
    put(tmp_path / "shard-0002.tar", data[: len(data) // 2 + 100])
    stream = td.TarShardStream(str(tmp_path / "shard-{0000..0002}.tar"))
    items = list(stream)
    seen = {it["key"]: it for it in items}
    assert set(good) <= set(seen)
    for key, text in good.items():
        assert seen[key]["text"] == text
        assert seen[key]["image"].shape == (3, 256, 256)
    report = stream.report()
    assert report["skipped"]["missing_caption"] >= 2 and report["skipped"]["unreadable_image"] >= 2
    assert report["skipped"]["bad_shard"] == 1
    assert any("shard-0002.tar" in p for p in report["examples"]["bad_shard"])


def test_tar_shard_patterns():
    with pytest.raises(td.DataError, match="do not exist"):
        td.expand_shards("/nonexistent/shard-{00..03}.tar")
    assert td.expand_braces("a{1..3}b{x,y}")[:3] == ["a1bx", "a1by", "a2bx"]
    assert td.expand_braces("s-{008..010}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar"]


@pytest.mark.parametrize("shards", [7, 2])  # more shards than readers (split by shard) and fewer (by sample)
def test_tar_shards_split_disjointly_and_completely(photos, tmp_path, shards):
    good = write_shards(tmp_path, photos, shards=shards, per_shard=5)
    stream = td.TarShardStream(str(tmp_path / "*.tar"), size=8)
    for world, workers in [(1, 1), (2, 1), (1, 3), (2, 2), (3, 2)]:
        parts = [[it["key"] for it in stream.iter_partition(r, world * workers)] for r in range(world * workers)]
        flat = [k for part in parts for k in part]
        assert len(flat) == len(set(flat)), "a sample was read twice"
        assert set(flat) == set(good), "a sample was never read"


def test_tar_shards_through_dataloader_workers_and_ranks(photos, tmp_path):
    good = write_shards(tmp_path, photos, shards=5, per_shard=3)
    keys = []
    for rank in range(2):
        stream = td.TarShardStream(str(tmp_path / "shard-{0000..0004}.tar"), size=8, rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        keys += [it["key"] for it in loader]
    assert sorted(keys) == sorted(good)


# ================================================================================== latent cache
class CountingEncode:
    def __init__(self, vae):
        self.vae, self.images = vae, 0

    def __call__(self, images):
        self.images += images.shape[0]
        return td.encode_latents(self.vae, images)


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    return PSVAE(PRESETS["tiny"]).eval()


def test_latent_cache_hits_on_the_second_pass_and_serves_latents(photos, tmp_path, tiny_vae, monkeypatch):
    monkeypatch.setattr(td.TensorCache, "_MERGE_EVERY", 2)  # exercise the merge of recent writes
    root = caption_folder(photos, tmp_path / "data", NAMES[:4])
    tiny_vae.save(tmp_path / "vae.safetensors")
    ds = td.CaptionFolder(root)
    cache = td.TensorCache.for_latents(tmp_path / "cache", tmp_path / "vae.safetensors", shard_size=3)
    encode = CountingEncode(tiny_vae)
    assert td.fill_cache(cache, ds, encode, batch_size=2) == {"encoded": 4, "cached": 0, "total": 4}
    assert encode.images == 4
    again = td.TensorCache.for_latents(tmp_path / "cache", tmp_path / "vae.safetensors")  # a new process, same files
    assert again.folder == cache.folder and len(again) == 4
    assert td.fill_cache(again, ds, encode, batch_size=2)["encoded"] == 0
    assert encode.images == 4
    assert len(list(cache.folder.glob("shard-*.safetensors"))) == 2
    assert all(ds.key(i) in cache for i in range(4)) and "not-a-key" not in cache
    with pytest.raises(KeyError, match="fill_cache"):
        cache.get("not-a-key")

    served = td.CachedDataset(ds, again)
    item = served[1]
    assert item["key"] == ds.key(1) and item["text"] == ds.text(1)
    expected = td.encode_latents(tiny_vae, ds[1]["image"][None])[0]
    assert item["latent"].shape == expected.shape == (16, 16, 16)
    assert torch.allclose(item["latent"], expected, atol=2e-3, rtol=1e-3)  # stored as float16


def test_latent_cache_is_invalidated_by_another_vae(photos, tmp_path, tiny_vae):
    root = caption_folder(photos, tmp_path / "data", NAMES[:2])
    vae_file = tmp_path / "vae.safetensors"
    tiny_vae.save(vae_file, provenance={"run": 1})
    ds = td.CaptionFolder(root)
    encode = CountingEncode(tiny_vae)
    first = td.TensorCache.for_latents(tmp_path / "cache", vae_file)
    td.fill_cache(first, ds, encode)
    tiny_vae.save(vae_file, provenance={"run": 2})  # same weights re-saved: same cache
    assert td.TensorCache.for_latents(tmp_path / "cache", vae_file).folder == first.folder

    changed = PSVAE(PRESETS["tiny"]).eval()
    changed.load_state_dict(tiny_vae.state_dict())
    with torch.no_grad():
        next(changed.semantic_encoder.parameters()).add_(0.01)
    changed.save(vae_file)
    second = td.TensorCache.for_latents(tmp_path / "cache", vae_file)
    assert second.folder != first.folder and len(second) == 0
    encode.vae = changed
    assert td.fill_cache(second, ds, encode)["encoded"] == 2 and encode.images == 4
    assert first.folder.is_dir()  # the other VAE's latents are left in place
    assert td.TensorCache.for_latents(tmp_path / "cache", vae_file, size=128).folder != second.folder  # preprocessing
    with pytest.raises(ValueError, match="256 px"):
        td.fill_cache(td.TensorCache.for_latents(tmp_path / "cache", vae_file, size=128), ds, encode)


def test_latent_cache_for_edit_pairs_and_tar_shards(photos, tmp_path, tiny_vae):
    root = tmp_path / "edits"
    copy_to(photos["astronaut"], root / "source" / "a.png")
    copy_to(photos["coffee"], root / "target" / "a.png")
    put(root / "instruction" / "a.txt", "coffee")
    tiny_vae.save(tmp_path / "vae.safetensors")
    cache = td.TensorCache.for_latents(tmp_path / "cache", tmp_path / "vae.safetensors", dtype=torch.float32)
    ds = td.EditFolder(root)
    assert td.fill_cache(cache, ds, CountingEncode(tiny_vae))["encoded"] == 1
    item = td.CachedDataset(ds, cache)[0]
    assert set(item) == {"key", "text", "latent", "source_latent"}
    assert torch.allclose(item["source_latent"], td.encode_latents(tiny_vae, ds[0]["source"][None])[0], atol=1e-5)
    assert not torch.allclose(item["source_latent"], item["latent"])

    good = write_shards(tmp_path / "shards", photos, shards=2, per_shard=2)
    stream = td.TarShardStream(str(tmp_path / "shards" / "*.tar"))
    encode = CountingEncode(tiny_vae)
    table, stats = td.fill_cache_from_tar(stream, cache, encode, batch_size=3)
    assert stats["encoded"] == 4 and sorted(table.key(i) for i in range(len(table))) == sorted(good)
    table, stats = td.fill_cache_from_tar(stream, cache, encode, batch_size=3)
    assert stats == {"encoded": 0, "cached": 4, "table": stats["table"]} and encode.images == 4  # no shard read
    served = td.CachedDataset(table, cache)
    assert sorted(served[i]["key"] for i in range(len(served))) == sorted(good)
    assert served[0]["latent"].shape == (16, 16, 16) and served[0]["text"] == table.text(served.indices[0])


# ================================================================================== dropout masks
def test_dropout_masks_rates_and_independence():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    keep_text, keep_image = td.dropout_masks(n, p_text=0.1, p_image=0.3, generator=g)
    assert keep_text.dtype == torch.bool and keep_text.shape == (n,)
    drop_t, drop_i = (~keep_text).float(), (~keep_image).float()
    assert drop_t.mean().item() == pytest.approx(0.1, abs=0.005)
    assert drop_i.mean().item() == pytest.approx(0.3, abs=0.005)
    assert (drop_t * drop_i).mean().item() == pytest.approx(0.03, abs=0.002)  # independent: 0.1 x 0.3
    a = td.dropout_masks(64, 0.5, 0.5, torch.Generator().manual_seed(7))
    b = td.dropout_masks(64, 0.5, 0.5, torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert td.dropout_masks(8, 0.0, 1.0)[0].all() and not td.dropout_masks(8, 0.0, 1.0)[1].any()
