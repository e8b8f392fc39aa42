"""The autoencoder stages `svae` (stage 1), `psvae` (stage 2) and `rae` (baseline): what each trains
and with which losses is docs/TRAINER.md, "Stages and the loop". Models and losses all come from
psvae_core; this file only wires them and picks weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Dict, Literal, Optional

import torch
from omegaconf import MISSING
from torch import nn

from psvae_core import losses
from psvae_core.autoencoder import PSVAE
from psvae_core.config import PRESETS, PSVAEConfig
from psvae_core.preview import preview_moments, solve_preview

from .config import BaseConfig, ConfigError, OptimSection, preset_config
from .data import (FEATURES, CachedDataset, TensorCache, build_image_dataset, fill_cache, module_fingerprint,
                   shard_indices, split_holdout)
from .rng import derive_seed
from .stage import Stage, StepResult, Trainable, open_export, register


# --------------------------------------------------------------------------- config schema

@dataclass
class DataSection:
    source: str = MISSING  # image folder (recursive), .jsonl/.csv manifest of paths, or HF `datasets` folder
    kind: Literal["auto", "folder", "manifest", "hf"] = "auto"
    image_size: int = 256  # training crop = decoder output size (shorter side resized, centre crop)
    val_source: Optional[str] = None  # held-out images (same kinds as `source`)
    val_count: int = 0  # or: hold this many images of `source` out (a seeded choice)
    verify: Literal["header", "full"] = "header"  # header: open each file's header at scan time; full: decode every image
    min_size: int = 0  # skip images whose shorter side is smaller
    manifest_key: Optional[str] = None  # jsonl key / csv column holding the path (default: path, file_name, image, file)
    hf_column: str = "image"
    hf_split: Optional[str] = None
    cache_features: bool = False  # svae/rae: cache frozen-encoder features (float16) on disk
    cache_dir: Optional[str] = None  # default <run>/feature_cache


@dataclass
class ModelSection:
    preset: Literal[tuple(PRESETS)] = "paper-dinov2-b-96c"  # a psvae_core.config.PRESETS name
    overrides: Dict[str, Any] = field(default_factory=dict)  # PSVAEConfig fields merged into the preset
    encoder_weights: Optional[str] = None  # local folder (or hub id) of the pretrained encoder; null = random init
    init_from: Optional[str] = None  # a stage-1 export (.safetensors); required by psvae
    encoder_lr_scale: float = 1.0  # psvae: encoder LR = optim.lr x this


@dataclass
class LossSection:
    semantic_weight: float = 1.0  # L_s (on D_s's reconstruction f_h'')
    semantic_l2: float = 1.0  # inside L_s: MSE weight
    semantic_cos: float = 1.0  # inside L_s: (1 - cosine) weight
    semantic_encoder_weight: float = 1.0  # psvae: L_s also on the fine-tuned encoder's f_h' (x semantic_weight); 0 = f_h'' only
    kl_weight: float = 1.0e-6  # L_KL
    kl_reduction: Literal["sum_mean", "mean"] = "sum_mean"  # sum_mean: LDM's
    pixel_weight: float = 1.0  # L_P multiplier (L1 + LPIPS + GAN)
    l1_weight: float = 1.0
    lpips_weight: float = 1.0
    lpips_net: str = "vgg"  # vgg (LDM) | alex | squeeze
    lpips_weights: Optional[str] = None  # torchvision backbone weights; null = $PSVAE_LPIPS_WEIGHTS or random (warns)
    decoder_input: Literal["sample", "mode"] = "sample"  # what the pixel decoder gets from the posterior in training
    noise_tau: float = 0.0  # decoder-input noise sigma ~ U(0, tau) per image (RAE uses 0.8); 0 = off


@dataclass
class GANSection:
    weight: float = 0.5  # disc_weight (LDM 0.5, RAE 0.75); 0 = no discriminator at all
    start_step: int = 20000  # the generator's adversarial term starts here
    disc_start_step: Optional[int] = None  # discriminator updates start here (null = start_step)
    adaptive: bool = True  # LDM adaptive weight ||grad rec|| / ||grad gan|| at the decoder's last layer
    max_adaptive: float = 1.0e4
    loss: Literal["hinge", "vanilla"] = "hinge"  # hinge: LDM's; vanilla: RAE's generator loss
    ndf: int = 64
    n_layers: int = 3
    norm: Literal["group", "none", "batch"] = "group"  # (batch statistics differ per process under DDP)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-4, betas=[0.5, 0.9]))


@dataclass
class ValidationExtra:
    lpips: Literal["auto", "on", "off"] = "auto"  # auto: report LPIPS (alex) only when real backbone weights are available


@dataclass
class VAEConfig(BaseConfig):
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossSection = field(default_factory=LossSection)
    gan: GANSection = field(default_factory=GANSection)
    metrics: ValidationExtra = field(default_factory=ValidationExtra)


def model_config(model: ModelSection, mode: str) -> PSVAEConfig:
    """The preset with `model.overrides` merged in (PSVAEConfig refuses unknown fields)."""
    return preset_config(PSVAEConfig, PRESETS[model.preset], model.overrides, mode=mode)


# --------------------------------------------------------------------------- the trained module

class VAETrainModule(nn.Module):
    """What DDP wraps: the PSVAE under the name `vae` (checkpoint keys and LR groups read `vae.`)."""

    def __init__(self, vae: PSVAE):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, **kwargs):
        return self.vae(images, **kwargs)


# --------------------------------------------------------------------------- stages

class _VAEStage(Stage):
    config_class = VAEConfig
    mode = "psvae"  # PSVAEConfig.mode
    train_encoder = False  # stage 2 unfreezes the encoder
    detach_pixel_input = True  # stage 1's f_l.detach() (a no-op for rae's frozen features)
    needs_init = False

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        if cfg.data.cache_features and self.train_encoder:
            raise ConfigError("data.cache_features only applies to stages with a frozen encoder (svae, rae)")
        if self.needs_init and not cfg.model.init_from:
            raise ConfigError(f"stage '{self.name}' starts from a stage-1 export: set model.init_from to the "
                              f"svae run's export/vae.safetensors")
        self.vae = self._build_vae()
        self.vae.encoder.set_trainable(self.train_encoder)
        if cfg.train.grad_checkpointing:
            ctx.log(f"gradient checkpointing on {self.vae.set_grad_checkpointing(True)} blocks")
        self.teacher = None
        if self.train_encoder and self.mode == "psvae":
            self.teacher = self.vae.encoder.frozen_copy().to(ctx.device)  # the L_s anchor (docs/PAPER.md §4)
        L = cfg.loss
        self.lpips = losses.LPIPSLoss(L.lpips_net, L.lpips_weights).to(ctx.device) if L.lpips_weight > 0 else None
        self.disc = (losses.PatchGANDiscriminator(ndf=cfg.gan.ndf, n_layers=cfg.gan.n_layers, norm=cfg.gan.norm)
                     if cfg.gan.weight > 0 else None)
        self.reports: dict = {}
        size = cfg.data.image_size
        h, w = self.vae.latent_grid(size, size)
        if (h * self.vae.upsample_factor, w * self.vae.upsample_factor) != (size, size):
            raise ConfigError(f"data.image_size={size} but this model decodes to {h * self.vae.upsample_factor} px "
                              f"(latent {h}x{w} x{self.vae.upsample_factor}); set data.image_size to that, or change "
                              f"model.overrides.encoder.image_size")
        self.latent_shape = (self.vae.latent_channels, h, w)

    # --- construction ---------------------------------------------------------------------
    def _build_vae(self) -> PSVAE:
        m = self.cfg.model
        if m.init_from:
            path = Path(m.init_from).expanduser()
            vae = open_export(PSVAE.from_file, path, "model.init_from", m.init_from,
                              "a previous run's export/vae.safetensors")
            if vae.config.mode != self.mode:
                raise ConfigError(f"model.init_from is a mode-{vae.config.mode!r} VAE; stage '{self.name}' needs {self.mode!r}")
            self.ctx.log(f"initialised from {path}")
            return vae.train()
        config = model_config(self.cfg.model, self.mode)
        if m.encoder_weights:
            return PSVAE.from_pretrained_encoder(config, m.encoder_weights).train()
        self.ctx.log("note: model.encoder_weights is not set, so the representation encoder is RANDOMLY "
                     "initialised (fine for tests and the demo; set it to a DINOv2 folder for real training)")
        return PSVAE(config).train()

    # --- data ---------------------------------------------------------------------------------
    def datasets(self):
        d, ctx = self.cfg.data, self.ctx
        kwargs = dict(kind=d.kind, verify=d.verify, min_size=d.min_size, manifest_key=d.manifest_key,
                      hf_column=d.hf_column, hf_split=d.hf_split)
        train, report = build_image_dataset(d.source, d.image_size, **kwargs)
        val = None
        if d.val_source:
            val, val_report = build_image_dataset(d.val_source, d.image_size, **kwargs)
            self.reports["val"] = val_report.to_dict()
        elif d.val_count:
            kept, held = split_holdout(len(train), d.val_count, self.cfg.run.seed, "images")
            train, val = train.subset(kept), train.subset(held)
        report.used = len(train)
        self.reports["train"] = report.to_dict()
        ctx.log(f"data: {report.summary()}" + (f"; {len(val)} held out for validation" if val is not None else ""))
        if ctx.rank == 0:
            ctx.run_dir.mkdir(parents=True, exist_ok=True)
            (ctx.run_dir / "data_report.json").write_text(json.dumps(self.reports, indent=2) + "\n")
        self.train_images = train
        if d.cache_features:
            train = self._with_cache(train)
        return train, val

    def _with_cache(self, train):
        """`train` with its frozen-encoder features from the tensor cache (trainer/data/cache.py), filled
        first where it lacks them: the same encoder and images give the same cache, whichever stage."""
        d, ctx = self.cfg.data, self.ctx
        encoder = self.vae.encoder.to(ctx.device)
        cache = TensorCache(d.cache_dir or ctx.run_dir / "feature_cache",
                            module_fingerprint(encoder, encoder.config.to_dict()), FEATURES, d.image_size)
        fill_cache(cache, train, lambda images: self._frozen_features(images.to(ctx.device).float() / 255),
                   batch_size=self.cfg.train.batch_size, rank=ctx.rank, world_size=ctx.world_size,
                   barrier=ctx.barrier, log=ctx.log)
        return CachedDataset(train, cache, "features", with_item=True)

    def data_description(self) -> dict:
        out = {"source": self.cfg.data.source, "images": self.reports.get("train", {}).get("used"),
               "image_size": self.cfg.data.image_size}
        if self.cfg.data.val_source:
            out["val_source"] = self.cfg.data.val_source
        return out

    # --- training -----------------------------------------------------------------------------
    def build(self) -> list[Trainable]:
        module = VAETrainModule(self.vae)
        scales = {"vae.encoder.": self.cfg.model.encoder_lr_scale} if self.train_encoder else {}
        specs = [Trainable("model", module, self.cfg.optim, lr_scales=scales, ema=True)]
        if self.disc is not None:
            specs.append(Trainable("disc", self.disc, self.cfg.gan.optim))
        return specs

    @torch.no_grad()
    def _frozen_features(self, images: torch.Tensor) -> torch.Tensor:
        with self.frozen_precision():
            return self.vae.encoder(images.float())

    def training_step(self, models, batch, step, micro) -> StepResult:
        L, G = self.cfg.loss, self.cfg.gan
        images = batch["image"].float() / 255
        b = images.shape[0]
        features = None
        if not self.train_encoder:
            features = batch["features"].float() if "features" in batch else self._frozen_features(images)
        sample = self.mode == "psvae" and L.decoder_input == "sample"
        latent_noise = self.noise((b, *self.latent_shape), step, micro, "latent") if sample else None
        decoder_noise = None
        if L.noise_tau > 0:
            sigma = L.noise_tau * self.noise((b, 1, 1, 1), step, micro, "tau", uniform=True)
            decoder_noise = sigma * self.noise((b, *self.latent_shape), step, micro, "decoder")
        out = models["model"](images, features=features, sample=sample, latent_noise=latent_noise,
                              decoder_noise=decoder_noise, detach_pixel_input=self.detach_pixel_input)
        terms, logs = {}, {}
        if self.mode == "psvae":
            if self.teacher is not None:
                with torch.no_grad(), self.frozen_precision():
                    target = self.teacher(images)
            else:
                target = out.features.detach()  # the frozen encoder's own features
            ls, parts = losses.semantic_loss(out.reconstructed_features, target, L.semantic_l2, L.semantic_cos)
            terms["semantic"] = L.semantic_weight * ls
            logs.update({"semantic_l2": parts["l2"], "semantic_cos": parts["cos"]})
            if self.teacher is not None and L.semantic_encoder_weight > 0:
                le, _ = losses.semantic_loss(out.features, target, L.semantic_l2, L.semantic_cos)
                terms["semantic_encoder"] = L.semantic_weight * L.semantic_encoder_weight * le
            terms["kl"] = L.kl_weight * losses.kl_loss(out.posterior, L.kl_reduction)
        recon = out.images
        rec = L.l1_weight * losses.l1_loss(recon, images)
        terms["l1"] = L.pixel_weight * rec
        if self.lpips is not None:
            lp = L.lpips_weight * self.lpips(recon, images)
            terms["lpips"] = L.pixel_weight * lp
            rec = rec + lp
        result = {"model": terms}
        if self.disc is not None:
            if step >= G.start_step:
                disc = models.raw("disc")  # with detached parameters: gradients reach the decoder, not D
                frozen = {name: p.detach() for name, p in disc.named_parameters()}
                g_adv = losses.generator_adv_loss(torch.func.functional_call(disc, frozen, recon * 2 - 1), G.loss)
                weight = torch.ones((), device=recon.device)
                if G.adaptive:
                    last = models.raw("model").vae.pixel_decoder.last_layer
                    reduce = self.ctx.reduce_mean if self.ctx.world_size > 1 else None
                    weight = losses.adaptive_gan_weight(rec, g_adv, last, G.max_adaptive, grad_reduce=reduce)
                terms["gan"] = L.pixel_weight * G.weight * weight * g_adv
                logs["adaptive_weight"] = weight
            disc_start = G.start_step if G.disc_start_step is None else G.disc_start_step
            if step >= disc_start:
                # One forward over real and fake (one DDP call per step; the norm is per sample).
                logits = models["disc"](torch.cat([images, recon.detach()]) * 2 - 1)
                real, fake = logits[:b], logits[b:]
                d_loss = (losses.hinge_d_loss if G.loss == "hinge" else losses.vanilla_d_loss)(real, fake)
                result["disc"] = {G.loss: d_loss}
                logs["logits_real"], logs["logits_fake"] = real.detach().mean(), fake.detach().mean()
        return StepResult(result, {k: float(v) for k, v in logs.items()})

    # --- evaluation, previews, export --------------------------------------------------------
    @cached_property
    def _lpips_metric(self) -> Optional[losses.LPIPSLoss]:
        """Validation LPIPS (alex); None when off, or on auto without real backbone weights."""
        mode, L = self.cfg.metrics.lpips, self.cfg.loss
        weights = L.lpips_weights if L.lpips_net == "alex" else None
        if mode == "off":
            return None
        if mode == "auto" and losses.resolve_lpips_weights("alex", weights) is None:
            self.ctx.log("note: validation LPIPS skipped: no AlexNet backbone weights here "
                         "(set PSVAE_LPIPS_WEIGHTS, or metrics.lpips=on to report the random-backbone value)")
            return None
        return losses.LPIPSLoss("alex", weights, reduction="none").to(self.ctx.device)

    @torch.no_grad()
    def evaluate(self, model, batch):
        # The evaluation command's own function, so validation numbers and `python -m trainer.evaluate`
        # reports are computed the same way.
        from .evaluate import evaluate_reconstruction

        images = batch["image"].float() / 255
        result = evaluate_reconstruction(model.vae, [images], resolution=self.cfg.data.image_size,
                                         lpips=self._lpips_metric, device=images.device)
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in result["per_image"].items() if v is not None}

    @torch.no_grad()
    def preview(self, model, batch):
        images = batch["image"].float() / 255
        return torch.cat([images, model.vae.reconstruct(images).float()])

    def stats_sample(self) -> list[int]:
        """Training-image indices the export measures on, spread over the whole set (docs/TRAINER.md, Outputs):
        the first export.stats_images of a permutation seeded by run.seed."""
        n = len(self.train_images)
        g = torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, "latent-stats"))
        return torch.randperm(n, generator=g)[:min(n, max(1, self.cfg.export.stats_images))].tolist()

    @torch.no_grad()
    def measure_latents(self, vae: PSVAE) -> dict[str, torch.Tensor]:
        """One pass over `stats_sample()`: the per-channel mean/std of the posterior mode, and the live
        preview map fitted to the colours those latents decode to (psvae_core.preview)."""
        ctx, data, sample = self.ctx, self.train_images, self.stats_sample()
        mine = [sample[i] for i in shard_indices(len(sample), ctx.world_size, ctx.rank)]
        c, bs = vae.latent_channels, self.cfg.train.batch_size
        ata = torch.zeros(c + 1, c + 1, dtype=torch.float64, device=ctx.device)
        aty = torch.zeros(c + 1, 3, dtype=torch.float64, device=ctx.device)
        for s in range(0, len(mine), bs):
            images = torch.stack([data[i]["image"] for i in mine[s:s + bs]]).to(ctx.device).float() / 255
            with self.frozen_precision():
                z = vae.encode(images).mode()
                decoded = vae.decode(z).clamp(0.0, 1.0)
            a, b = preview_moments(z, decoded)
            ata += a
            aty += b
        if ctx.world_size > 1:
            for t in (ata, aty):
                torch.distributed.all_reduce(t)
        # A^T A of the rows [z, 1] holds the count (corner), per-channel sums (last column) and squares (diagonal).
        n = ata[c, c]
        mean = ata[:c, c] / n
        std = (ata.diagonal()[:c] / n - mean.pow(2)).clamp_min(1e-12).sqrt()
        weight, bias = solve_preview(ata, aty)
        return {"mean": mean.float().cpu(), "std": std.float().cpu(), "preview_weight": weight, "preview_bias": bias}

    def export(self, model, folder: Path, provenance: dict) -> Optional[Path]:
        vae = model.vae.eval()
        m = self.measure_latents(vae)
        vae.set_latent_stats(m["mean"].to(vae.latents_mean.device), m["std"].to(vae.latents_std.device))
        vae.set_preview(m["preview_weight"], m["preview_bias"])
        count = len(self.stats_sample())
        sample = {"images": count, "of": len(self.train_images), "seed": self.cfg.run.seed,
                  "rule": "the first `images` of torch.randperm(`of`) seeded by derive_seed(seed, 'latent-stats') "
                          "(trainer/rng.py), over the training images in listing order; posterior mode; the "
                          "live preview is fitted on the same images, decoded"}
        return self.write_export(vae, folder / "vae.safetensors",
                                 {**provenance, "latent_stats_images": count, "latent_stats_sample": sample})


@register
class SVAEStage(_VAEStage):
    """Stage 1: encoder frozen; E_s/D_s with L_s + L_KL; pixel decoder on detached latents."""

    name = "svae"


@register
class PSVAEStage(_VAEStage):
    """Stage 2: everything trainable from a stage-1 export; L_s against a frozen teacher."""

    name = "psvae"
    train_encoder = True
    detach_pixel_input = False
    needs_init = True


@register
class RAEStage(_VAEStage):
    """RAE baseline: frozen encoder features as the latent, pixel decoder with noise augmentation."""

    name = "rae"
    mode = "rae"

