"""svae -> psvae -> export -> PSVAE.from_file -> reconstruct, on real photos, with learning asserted."""
from __future__ import annotations

import pytest
import torch
from torchvision.transforms.functional import pil_to_tensor

from psvae_core import metrics
from psvae_core.autoencoder import PSVAE
from psvae_core.checkpoint import read_metadata
from test_trainer_helpers import TINY_PSVAE, TINY_SVAE, metrics as read_metrics, photos
from trainer.__main__ import main
from trainer.samples import sample_photos

STEPS = 40


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipeline")
    data = photos(base / "photos", 128)
    out = base / "runs"
    common = [f"data.source={data}", f"run.output_dir={out}", f"train.max_steps={STEPS}", "log.every=2"]
    assert main(["svae", "--config", str(TINY_SVAE), *common, "run.name=svae"]) == 0
    export1 = out / "svae" / "export" / "vae.safetensors"
    assert main(["psvae", "--config", str(TINY_PSVAE), *common, "run.name=psvae", f"model.init_from={export1}",
                 "gan.start_step=25"]) == 0
    return {"svae": out / "svae", "psvae": out / "psvae"}


def _psnr_of(export) -> float:
    vae = PSVAE.from_file(export)
    images = torch.stack([pil_to_tensor(p) for p in sample_photos(128).values()]).float() / 255
    with torch.no_grad():
        recon = vae.reconstruct(images)
    assert recon.shape == images.shape and torch.isfinite(recon).all()
    return metrics.psnr(recon, images).mean().item()


def test_exports_load_and_carry_provenance_and_latent_stats(runs):
    for stage, run in runs.items():
        path = run / "export" / "vae.safetensors"
        vae = PSVAE.from_file(path)
        assert vae.provenance["stage"] == stage and vae.provenance["step"] == STEPS
        assert vae.provenance["ema"] is True and len(vae.provenance["config_hash"]) == 16
        assert vae.provenance["data"]["images"] == 12
        assert not torch.allclose(vae.latents_std, torch.ones_like(vae.latents_std))  # measured, not identity
        assert "provenance" in read_metadata(path)
        assert (run / "config.yaml").is_file() and (run / "data_report.json").is_file()


def test_exports_carry_a_live_preview_fitted_to_their_decoded_colours(runs):
    images = torch.stack([pil_to_tensor(p) for p in sample_photos(128).values()]).float() / 255
    for stage, run in runs.items():
        vae = PSVAE.from_file(run / "export" / "vae.safetensors")
        with torch.no_grad():
            z = vae.encode(images).mode()
            decoded = torch.nn.functional.adaptive_avg_pool2d(vae.decode(z).clamp(0, 1), z.shape[-2:])
        preview = vae.preview(z)
        assert preview.std() > 0.05, f"{stage}: flat preview"
        for c in range(3):
            r = torch.corrcoef(torch.stack([preview[:, c].flatten(), decoded[:, c].flatten()]))[0, 1].item()
            assert r > 0.5, f"{stage} channel {c}: preview/decoded correlation {r:.3f}"


def test_losses_go_down(runs):
    for stage, terms in (("svae", ("model/semantic", "model/l1")), ("psvae", ("model/semantic", "model/l1"))):
        rows = read_metrics(runs[stage])
        for term in terms:
            first = sum(r[term] for r in rows[:3]) / 3
            last = sum(r[term] for r in rows[-3:]) / 3
            assert last < 0.9 * first, f"{stage} {term}: {first:.4f} -> {last:.4f}"


def test_psvae_reconstructs_better_than_svae(runs):
    psnr1 = _psnr_of(runs["svae"] / "export" / "vae.safetensors")
    psnr2 = _psnr_of(runs["psvae"] / "export" / "vae.safetensors")
    print(f"PSNR svae {psnr1:.3f} psvae {psnr2:.3f}")
    assert psnr2 > psnr1 + 0.2, f"PSNR after svae {psnr1:.2f} dB, after psvae {psnr2:.2f} dB"


def test_psvae_logs_every_loss_term_and_the_gan(runs):
    last = read_metrics(runs["psvae"])[-1]
    for key in ("model/semantic", "model/semantic_encoder", "model/kl", "model/l1", "model/gan", "disc/hinge",
                "adaptive_weight", "lr", "images_per_s", "grad_norm/model", "nan_steps"):
        assert key in last, key
