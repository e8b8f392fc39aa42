"""psvae_core.provenance: the generator's record of its VAE and the one rule the trainer and the
ComfyUI loader judge a VAE by."""
from __future__ import annotations

import hashlib

import torch

from psvae_core.provenance import (VAERecord, file_sha256, recorded_vae, stats_differ, vae_mismatch,
                                   vae_provenance)

MEAN, STD = torch.tensor([0.1, -0.2, 0.3]), torch.tensor([1.0, 0.5, 2.0])
STATS = {"mean": MEAN.tolist(), "std": STD.tolist()}


def judge(record: VAERecord, fingerprint="aa" * 32, mean=MEAN, std=STD):
    return vae_mismatch(record, fingerprint, mean, std, generator="gen", vae="vae.safetensors")


def test_the_export_record_reads_back():
    written = vae_provenance(name="vae.safetensors", path="runs/x/vae.safetensors", fingerprint="ab" * 32,
                             sha256="cd" * 32, latent_channels=3, latent_grid=(8, 8), latent_stats=STATS)
    assert recorded_vae(written) == VAERecord("vae.safetensors", "ab" * 32, STATS)
    assert written["vae_fingerprint"] == "ab" * 32 and written["vae"]["latent_grid"] == [8, 8]


def test_stats_decide_and_the_fingerprint_only_without_them():
    same = VAERecord("v", "aa" * 32, STATS)
    assert judge(same) == (None, None)
    # a re-export (another fingerprint, the same stats rounded to bf16): accepted, with a note
    bf16 = {k: torch.tensor(v).bfloat16().float().tolist() for k, v in STATS.items()}
    verdict = judge(VAERecord("v", "bb" * 32, bf16))
    assert verdict.problem is None and "re-export" in verdict.note
    # the same fingerprint cannot rescue other stats
    verdict = judge(VAERecord("v", "aa" * 32, {"mean": [0.1, -0.2, 0.35], "std": STD.tolist()}))
    assert "latent statistics it records differ" in verdict.problem and "channel 2" in verdict.problem
    assert "(it was trained with v)" in verdict.problem
    # no stats: the fingerprint decides
    verdict = judge(VAERecord(None, "bb" * 32, None))
    assert "fingerprint bbbbbbbbbbbb" in verdict.problem and "aaaaaaaaaaaa" in verdict.problem
    assert judge(VAERecord(None, "bb" * 32, None), fingerprint=None) == (None, None)  # not from a file
    assert judge(VAERecord()) == (None, None) and VAERecord().empty


def test_unreadable_or_short_stats():
    assert stats_differ({"mean": ["x"], "std": [1]}, MEAN, STD) is None
    assert stats_differ({"mean": [0.0], "std": [1.0]}, MEAN, STD) == "1 recorded channels vs 3"
    assert recorded_vae({"vae": {"latent_stats": {"mean": 1}}}).latent_stats is None
    assert recorded_vae("junk") == VAERecord()


def test_file_sha256(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"psvae" * 1000)
    assert file_sha256(path) == hashlib.sha256(b"psvae" * 1000).hexdigest()
