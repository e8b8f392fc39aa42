"""One image rule (trainer/data/images.py) for every reader: an autoencoder-stage dataset, a
generator-stage dataset and the evaluation reader give the same tensor for the same file, with EXIF
orientation applied and transparency composited over white."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from psvae_core.images import resize_center_crop
from trainer import evaluate
from trainer.data import CaptionFolder, build_image_dataset, split_holdout
from trainer.samples import sample_photos

SIZE = 32
EXIF_ORIENTATION = 0x0112
ROTATE_90_CW = 6  # the viewer turns the stored pixels 90 degrees clockwise


def _as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(resize_center_crop(image, SIZE))).permute(2, 0, 1)


def _three_readers(folder) -> list[torch.Tensor]:
    """The one image of `folder` as read by a VAE stage, a generator stage and the evaluation."""
    vae_set, _ = build_image_dataset(str(folder), SIZE)
    generator_set = CaptionFolder(folder, size=SIZE)
    (evaluated,) = list(evaluate.ImageFolderReader(folder, SIZE))
    assert len(vae_set) == len(generator_set) == 1
    return [vae_set[0]["image"], (generator_set[0]["image"] * 255).round().to(torch.uint8), evaluated[0]]


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A real photo, landscape (64x48) so that a quarter turn changes the crop."""
    return sample_photos(64, ["astronaut"])["astronaut"].resize((64, 48), Image.BICUBIC)


def test_exif_rotated_jpeg_reads_upright_everywhere(photo, tmp_path):
    stored = photo.transpose(Image.Transpose.ROTATE_90)  # what a sideways phone camera writes
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_90_CW
    stored.save(tmp_path / "phone.jpg", quality=95, exif=exif)
    (tmp_path / "phone.txt").write_text("a photo")
    with Image.open(tmp_path / "phone.jpg") as decoded:
        decoded.load()
        upright = _as_tensor(decoded.transpose(Image.Transpose.ROTATE_270))  # the viewer's turn
        sideways = _as_tensor(decoded)
    assert (upright.float() - sideways.float()).abs().mean() > 20  # the turn matters for this photo
    for tensor in _three_readers(tmp_path):
        assert torch.equal(tensor, upright)


def test_rgba_png_composites_over_white_everywhere(photo, tmp_path):
    rgba = photo.convert("RGBA")
    alpha = np.zeros((48, 64), dtype=np.uint8)
    alpha[:, 32:] = 255  # left half fully transparent, right half opaque
    alpha[:24, 32:] = 128  # and a half-transparent quarter
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(tmp_path / "cutout.png")
    (tmp_path / "cutout.txt").write_text("a cut-out")
    expected = _as_tensor(Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba).convert("RGB"))
    assert (expected[:, :, :8] == 255).all()  # transparent pixels are white, not the hidden colour
    for tensor in _three_readers(tmp_path):
        assert torch.equal(tensor, expected)


def test_holdout_rule_is_seeded_disjoint_and_complete():
    train, held = split_holdout(20, 5, seed=3)
    assert len(held) == 5 and sorted(train + held) == list(range(20))
    assert split_holdout(20, 5, seed=3) == (train, held)
    assert split_holdout(20, 5, seed=4)[1] != held
    assert split_holdout(20, 0, seed=3) == (list(range(20)), [])


def _stage_datasets(stage_class, tmp_path, source, *overrides):
    """`stage.datasets()` of a stage built without its models (the data part needs none)."""
    from trainer.config import load_config
    from trainer.stage import Context

    cfg = load_config(stage_class.config_class, stage_class.name, None,
                      [f"data.source={source}", "data.image_size=32", "run.seed=5", *overrides])
    stage = object.__new__(stage_class)
    stage.cfg, stage.reports = cfg, {}
    stage.ctx = Context(tmp_path / "run", torch.device("cpu"), 0, 1, 5, None, lambda x: x, lambda text: None)
    return stage.datasets()


def test_val_count_holds_out_the_same_rule_in_both_kinds_of_stage(tmp_path):
    from trainer.generator_stages import T2IStage
    from trainer.vae_stages import SVAEStage

    photos = sample_photos(40)
    for name, image in photos.items():
        image.save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(f"a photo: {name}")
    kept, held = split_holdout(len(photos), 3, seed=5)

    train, val = _stage_datasets(SVAEStage, tmp_path, tmp_path, "data.val_count=3")
    everything, _ = build_image_dataset(str(tmp_path), 32)
    assert val.names == [everything.names[i] for i in held] and train.names == [everything.names[i] for i in kept]

    train, val = _stage_datasets(T2IStage, tmp_path, tmp_path, "data.val_count=3", "model.vae=unused")
    everything = CaptionFolder(tmp_path, size=32, seed=5)
    assert [val.dataset.key(i) for i in val.indices] == [everything.key(i) for i in held]
    assert len(train) == len(photos) - 3


def test_hf_sources_of_both_stage_kinds_share_one_reader(tmp_path):
    """A `datasets` folder is opened by one reader (trainer.data.sources.open_hf) for the VAE and the
    generator stages: without the package both say how to get it; a cell is read by one rule."""
    from trainer.data import MissingDependencyError
    from trainer.data.captions import HFCaptionDataset
    from trainer.data.report import BadSample
    from trainer.data.sources import hf_image

    (tmp_path / "dataset_info.json").write_text("{}")
    try:
        import datasets  # noqa: F401
    except ImportError:
        for open_it in (lambda: build_image_dataset(str(tmp_path), SIZE), lambda: HFCaptionDataset(tmp_path)):
            with pytest.raises(MissingDependencyError, match="pip install datasets"):
                open_it()
    assert hf_image({"bytes": b"png", "path": None}, "w") == b"png"
    assert hf_image({"bytes": None, "path": "a.png"}, "w") == "a.png"
    with pytest.raises(BadSample, match="missing_image: row 3"):
        hf_image(None, "row 3")


def test_listing_follows_folder_links_once_and_skips_hidden_and_dangling(tmp_path):
    """The one listing rule of every reader (trainer.data.files_under): recursive, a linked folder is
    read once (a link loop ends), hidden names and dangling links are left out, sorted POSIX paths."""
    from trainer.data import files_under

    root = tmp_path / "data"
    for rel in ("b.png", "a/z.jpg", "a/c/d.png", ".hidden/x.png", "a/.h.png", "e/f.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (root / "a" / "c" / "up").symlink_to(root / "a")  # a loop
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "g.png").write_bytes(b"x")
    (root / "gone.png").symlink_to(tmp_path / "missing.png")
    assert [p.as_posix() for p in files_under(root)] == ["a/c/d.png", "a/z.jpg", "b.png", "e/f.txt", "linked/g.png"]
