"""What a generator file records about the VAE it was trained with, and the one rule that decides
whether a VAE is that VAE (docs/CHECKPOINTS.md, "Generator and VAE").

The trainer's generator export writes the record (`vae_provenance`); the trainer (`model.init_from`,
a resumed run) and the ComfyUI loader and samplers read it (`recorded_vae`) and judge a VAE against
it (`vae_mismatch`). A generator learns *normalised* latents, so the latent statistics decide:

1. recorded latent statistics must match the VAE's (relative tolerance `STATS_RTOL`: statistics
   rounded to bf16 pass, another trained VAE's do not);
2. with no recorded statistics, a recorded fingerprint (`checkpoint.fingerprint`) must equal the
   VAE file's;
3. the same statistics under another fingerprint (the same VAE re-exported, e.g. in another dtype)
   is accepted, with a note for the log;
4. a record with neither says nothing: only the latent shape can be checked.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import math
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch

STATS_RTOL, STATS_ATOL = 5e-3, 1e-4  # passes stats rounded to bf16 (a VAE saved in bf16), not another VAE's


@dataclass(frozen=True)
class VAERecord:
    """A generator's record of its training VAE (any field may be missing)."""

    name: Optional[str] = None
    fingerprint: Optional[str] = None
    latent_stats: Optional[dict] = None  # {"mean": [...], "std": [...]}

    @property
    def empty(self) -> bool:
        return self.fingerprint is None and self.latent_stats is None


class Verdict(NamedTuple):
    problem: Optional[str]  # why this VAE is not the recorded one (None: it is, or nothing says otherwise)
    note: Optional[str]  # worth a log line, not an error


def vae_provenance(*, name: str, path: str, fingerprint: str, sha256: str, latent_channels: int,
                   latent_grid: Sequence[int], latent_stats: dict) -> dict:
    """The provenance entries an export writes about its VAE: `vae` (what `recorded_vae` reads) and
    the flat `vae_*` copies older readers use."""
    grid = [int(v) for v in latent_grid]
    return {
        "vae": {"file": name, "path": path, "fingerprint": fingerprint, "sha256": sha256,
                "latent_channels": latent_channels, "latent_grid": grid, "latent_stats": latent_stats},
        "vae_fingerprint": fingerprint, "vae_sha256": sha256,
        "vae_latent_channels": latent_channels, "vae_latent_grid": grid, "vae_latent_stats": latent_stats,
    }


def recorded_vae(provenance) -> VAERecord:
    """Read a generator's provenance: `vae` = {"file"|"name", "fingerprint", "latent_stats"}, else
    the flat `vae_fingerprint` / `vae_latent_stats`, else the latent cache's `data.vae_fingerprint`.
    Anything malformed counts as not recorded."""
    prov = provenance if isinstance(provenance, dict) else {}
    rec = prov.get("vae") if isinstance(prov.get("vae"), dict) else {}
    data = prov.get("data") if isinstance(prov.get("data"), dict) else {}
    fingerprint = rec.get("fingerprint") or prov.get("vae_fingerprint") or data.get("vae_fingerprint")
    stats = rec.get("latent_stats") or prov.get("vae_latent_stats")
    if not (isinstance(stats, dict) and isinstance(stats.get("mean"), list) and isinstance(stats.get("std"), list)):
        stats = None
    name = rec.get("file") or rec.get("name") or (prov.get("vae") if isinstance(prov.get("vae"), str) else None)
    return VAERecord(name if isinstance(name, str) else None,
                     fingerprint if isinstance(fingerprint, str) else None, stats)


def stats_differ(recorded: dict, mean: torch.Tensor, std: torch.Tensor) -> Optional[str]:
    """Where recorded latent stats differ from `mean`/`std` beyond the tolerance, in words (None: they match,
    or the record is unreadable)."""
    mean, std = mean.detach().float().cpu().flatten(), std.detach().float().cpu().flatten()
    try:
        r_mean = torch.tensor([float(v) for v in recorded["mean"]])
        r_std = torch.tensor([float(v) for v in recorded["std"]])
    except (TypeError, ValueError):
        return None  # unreadable: treated as not recorded
    if r_mean.numel() != mean.numel() or r_std.numel() != std.numel():
        return f"{r_mean.numel()} recorded channels vs {mean.numel()}"
    worst = max(((r_mean - mean).abs() / (STATS_ATOL + STATS_RTOL * mean.abs())).max().item(),
                ((r_std - std).abs() / (STATS_ATOL + STATS_RTOL * std.abs())).max().item())
    if worst > 1.0 or not math.isfinite(worst):
        i = int(torch.argmax((r_mean - mean).abs() + (r_std - std).abs()))
        return (f"channel {i}: recorded mean {r_mean[i].item():.4g} / std {r_std[i].item():.4g}, "
                f"this VAE's {mean[i].item():.4g} / {std[i].item():.4g}")
    return None


def vae_mismatch(record: VAERecord, fingerprint: Optional[str], mean: torch.Tensor, std: torch.Tensor, *,
                 generator: str, vae: str) -> Verdict:
    """The rule of this module's docstring, for the VAE `vae` (its file's `fingerprint`, None when not
    from a file, and its latent stats) and the generator named `generator`."""
    trained_with = f" (it was trained with {record.name})" if record.name else ""
    other_file = bool(record.fingerprint and fingerprint and record.fingerprint != fingerprint)
    if record.latent_stats is not None:
        differ = stats_differ(record.latent_stats, mean, std)
        if differ:
            return Verdict(f"the generator {generator} was trained on latents of another VAE{trained_with}: the "
                           f"latent statistics it records differ from those of the VAE {vae} ({differ})", None)
        if other_file:
            return Verdict(None, f"{generator} records the same latent statistics as {vae} but another VAE "
                                 f"file{trained_with}; assuming a re-export of the same VAE (e.g. in another dtype)")
    elif other_file:
        return Verdict(f"the generator {generator} was trained with another VAE file{trained_with}: it records the "
                       f"VAE fingerprint {record.fingerprint[:12]}, the VAE {vae} has {fingerprint[:12]}", None)
    return Verdict(None, None)


_SHA256: dict[tuple, str] = {}


def file_sha256(path) -> str:
    """sha256 of a file's bytes, memoised per (path, size, mtime) within a process."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _SHA256[key] = h.hexdigest()
    return _SHA256[key]


def package_version(dist: str) -> str:
    """The installed version of the distribution `dist` (for reports and provenance), or "not installed"."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
