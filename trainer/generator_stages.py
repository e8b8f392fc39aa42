"""The generator stages `t2i` (text-to-image) and `edit` (instruction editing): FusionDiffuser learns
flow matching on the normalised latents of a frozen PS-VAE. The data path (latents on the fly or from
the latent cache), the objective and CFG dropout (every draw counter-seeded, rng.py) and the export's
VAE record are docs/TRAINER_GENERATOR.md §3-§5.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Literal, Optional

import torch
from omegaconf import MISSING
from torch.utils.data import Subset

from psvae_core import flow, generation
from psvae_core.autoencoder import PSVAE
from psvae_core.checkpoint import read_metadata
from psvae_core.dtypes import DTYPES
from psvae_core.fusion import PRESETS as GENERATOR_PRESETS
from psvae_core.fusion import FusionConfig, FusionDiffuser
from psvae_core.fusion_backbone import DecoderLayer
from psvae_core.fusion_heads import DDTBlock
from psvae_core.provenance import file_sha256, recorded_vae, vae_mismatch, vae_provenance
from psvae_core.tokenizer_state import byte_tokenizer, tokenizer_from_state, tokenizer_to_state

from . import data as td
from .config import BaseConfig, ConfigError, DType, EMASection, preset_config
from .data import DataError, split_holdout
from .rng import derive_seed, micro_rows
from .stage import Stage, StepResult, Trainable, open_export, register

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # collate runs in forked DataLoader workers

EXPORT_NAME = "generator.safetensors"
DEFAULT_PROMPTS = ["a photo of a cat sitting on a wooden table", "a red car parked on a city street at night",
                   "a bowl of fresh fruit, studio lighting", "a mountain lake at sunrise, mist over the water"]


# --------------------------------------------------------------------------- config schema

@dataclass
class GenModelSection:
    vae: str = MISSING  # the frozen PS-VAE export (.safetensors); its latent channels/grid must match the generator
    preset: Literal[tuple(GENERATOR_PRESETS)] = "paper-653m"  # psvae_core.fusion.PRESETS
    # FusionConfig fields merged into the preset (latent_channels, latent_size, head_width, ...)
    overrides: Dict[str, Any] = field(default_factory=dict)
    lm_path: Optional[str] = None  # HF folder (or hub id) of a Qwen2/Llama LM: backbone weights + its tokenizer
    gguf_file: Optional[str] = None  # a GGUF file inside lm_path (dequantised to float32)
    init_from: Optional[str] = None  # a generator export to start from (edit: <t2i run>/export/generator.safetensors)
    tokenizer: Optional[str] = None  # HF tokenizer folder or "bytes" (built-in, 256 ids); null = the LM's/init file's
    allow_other_vae: bool = False  # init_from recorded another VAE: refuse (false) or continue anyway (true)


@dataclass
class GenDataSection:
    # t2i: caption folder | .jsonl | .parquet/glob/`datasets` folder | tar shards; edit: triplet folder | .jsonl
    source: str = MISSING
    format: Literal["auto", "folder", "jsonl", "hf", "tar"] = "auto"  # auto: trainer.data.open_t2i's rules
    image_size: int = 256  # centre crop fed to the VAE encoder (which resizes to its own input size)
    min_side: int = 0  # skip images whose shorter side is smaller
    check_images: bool = True  # open every image header when a folder/jsonl source is scanned (false for huge sets)
    val_source: Optional[str] = None  # held-out samples (same formats) for the validation flow loss
    val_count: int = 0  # or: hold the last N samples of `source`'s seeded order out
    latent_cache: Optional[str] = None  # DIR: encode once into DIR/<vae+preprocessing id>/, then train on latents
    latent_cache_dtype: DType = "float16"  # storage of cached latents
    max_text_tokens: int = 512  # captions are truncated to this many tokens in collate
    text_fields: List[str] = field(default_factory=lambda: list(td.TEXT_FIELDS))  # tar: json keys tried for the caption
    hf_image_column: str = "image"
    hf_text_column: str = "text"
    hf_split: Optional[str] = None


@dataclass
class EditDataSection(GenDataSection):
    format: Literal["auto", "folder", "jsonl"] = "auto"  # auto: trainer.data.open_edit's rules


@dataclass
class FlowLossSection:
    shift: Optional[float] = None  # training time shift; null = sqrt(C/16) (96 channels: 2.449, docs/PAPER.md §5.2)
    logit_mean: float = 0.0  # t ~ logit-normal(mean, std), then shifted (RAE/SD3)
    logit_std: float = 1.0
    text_dropout: float = 0.1  # P(caption replaced by the null text): classifier-free guidance


@dataclass
class EditLossSection(FlowLossSection):
    image_dropout: float = 0.1  # P(source image hidden), drawn independently of text_dropout (dual guidance)


@dataclass
class PreviewSection:
    prompts: List[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))  # t2i; empty = the batch's captions
    steps: int = 10  # Euler steps of the preview samples (the paper samples with 50)
    guidance: float = 4.0  # text CFG scale
    image_guidance: float = 1.5  # edit: source-image scale (dual guidance)
    shift: float = flow.DEFAULT_SHIFT  # sampling time shift (paper: 3)
    seed: int = 0


@dataclass
class T2IConfig(BaseConfig):
    RANGES: ClassVar[dict] = {"positive": ("data.image_size", "data.max_text_tokens", "preview.steps",
                                           "loss.logit_std", "loss.shift"),
                              "non_negative": ("data.val_count",), "fractions": ("loss.text_dropout",)}
    ema: EMASection = field(default_factory=lambda: EMASection(decay=0.9999))  # docs/PAPER.md §5.3: EMA 0.9999
    model: GenModelSection = field(default_factory=GenModelSection)
    data: GenDataSection = field(default_factory=GenDataSection)
    loss: FlowLossSection = field(default_factory=FlowLossSection)
    preview: PreviewSection = field(default_factory=PreviewSection)


@dataclass
class EditConfig(T2IConfig):
    RANGES: ClassVar[dict] = {**T2IConfig.RANGES, "fractions": ("loss.text_dropout", "loss.image_dropout")}
    data: EditDataSection = field(default_factory=EditDataSection)
    loss: EditLossSection = field(default_factory=EditLossSection)


# --------------------------------------------------------------------------- helpers

def cfg_dropout_masks(seed: int, step: int, step_batch: int, p_text: float,
                      p_image: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep_text, keep_image) bool [step_batch] for all samples of one optimiser step, seeded by (seed, step)
    (docs/TRAINER_GENERATOR.md §4); micro-batch m of process r (b rows each) uses rows (m * processes + r) * b on."""
    g = torch.Generator().manual_seed(derive_seed(seed, "cfg-dropout", step))
    return td.dropout_masks(step_batch, p_text, p_image, generator=g)


def fusion_config(model: GenModelSection) -> FusionConfig:
    """The preset with `model.overrides` merged in (FusionConfig refuses unknown fields)."""
    return preset_config(FusionConfig, GENERATOR_PRESETS[model.preset], model.overrides)


# --------------------------------------------------------------------------- stages

class _GeneratorStage(Stage):
    config_class = T2IConfig
    task = "t2i"
    # FSDP units: each LM decoder layer (one call per training step for the prefix and the target)
    # and each DDT head block.
    shard_units = (DecoderLayer, DDTBlock)

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self._check_config()
        self.vae_path = Path(cfg.model.vae).expanduser()
        self.vae = self._load_vae()
        self.generator, self.init = self._build_generator()
        self._check_latent_match()
        self._check_run_vae()
        self.tokenizer = self.generator.tokenizer
        c = self.generator.config.latent_channels
        self.shift = float(cfg.loss.shift) if cfg.loss.shift is not None else flow.shift_for_latent(c)
        self.reports: dict = {}
        self._drops: Counter = Counter()
        params = sum(p.numel() for p in self.generator.parameters()) / 1e6
        ctx.log(f"{self.name}: generator {self.init['kind']} {self.init['source']} "
                f"({params:.1f}M parameters), VAE {self.vae_path.name} "
                f"(latent {c}x{self.latent_grid[0]}x{self.latent_grid[1]}), shift {self.shift:.3f}")

    # --- construction ---------------------------------------------------------------------
    def _check_config(self):
        m = self.cfg.model
        if m.init_from and m.lm_path:
            raise ConfigError("set model.init_from (continue a generator export) or model.lm_path (start from an "
                              "LM), not both")
        if m.init_from and m.overrides:
            raise ConfigError("model.overrides shape a new generator (preset or lm_path); model.init_from "
                              "keeps its file's architecture, so remove the overrides")
        if m.gguf_file and not m.lm_path:
            raise ConfigError("model.gguf_file names a file inside model.lm_path; set model.lm_path too")
        if self.cfg.train.grad_checkpointing:
            raise ConfigError("train.grad_checkpointing is not implemented for the generator stages (the LM "
                              "layers run through psvae_core.fusion_backbone); lower train.batch_size and raise "
                              "train.grad_accum instead")

    def _load_vae(self) -> PSVAE:
        path = self.vae_path
        vae = open_export(PSVAE.from_file, path, "model.vae", self.cfg.model.vae,
                           "a PS-VAE export (a psvae run's export/vae.safetensors)")
        vae = vae.to(self.ctx.device).eval().requires_grad_(False)
        size = self.cfg.data.image_size
        self.latent_grid = tuple(vae.latent_grid(size, size))
        self.vae_fingerprint = td.vae_fingerprint(path)
        self.vae_sha256 = file_sha256(path)
        meta = read_metadata(path)
        self.vae_latent_stats = json.loads(meta["latent_stats"]) if meta.get("latent_stats") else {
            "mean": vae.latents_mean.tolist(), "std": vae.latents_std.tolist()}
        if bool((vae.latents_mean == 0).all() and (vae.latents_std == 1).all()):
            self.ctx.log(f"note: {path.name} has no measured latent statistics (mean 0, std 1): the generator "
                         f"trains on raw latents. Exports of the psvae stage measure them")
        return vae

    def _tokenizer(self, fallback):
        name = self.cfg.model.tokenizer
        if name is None:
            return fallback
        if name == "bytes":
            return byte_tokenizer()
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as err:
            raise ConfigError(f"model.tokenizer={name}: cannot load a tokenizer there ({str(err).splitlines()[0]}); "
                              f"use an HF tokenizer folder or \"bytes\"") from None
        return tokenizer_from_state(tokenizer_to_state(tok))  # the form the export stores

    def _build_generator(self) -> tuple[FusionDiffuser, dict]:
        m = self.cfg.model
        torch.manual_seed(derive_seed(self.cfg.run.seed, "generator-init"))
        if m.init_from:
            path = Path(m.init_from).expanduser()
            model = open_export(FusionDiffuser.from_file, path, "model.init_from", m.init_from,
                                 f"a t2i run's export/{EXPORT_NAME}")
            self._check_init_vae(path)
            init = {"kind": "file", "source": str(path), "sha256": file_sha256(path)}
        elif m.lm_path:
            fields = {k: v for k, v in fusion_config(m).to_dict().items() if k not in ("lm", "lm_source")}
            try:
                model = FusionDiffuser.from_pretrained_lm(m.lm_path, gguf_file=m.gguf_file,
                                                          load_tokenizer=m.tokenizer is None, **fields)
            except (OSError, ValueError) as err:
                raise ConfigError(f"model.lm_path={m.lm_path}: cannot load the LM "
                                  f"({str(err).splitlines()[0]})") from None
            init = {"kind": "lm", "source": model.config.lm_source}
        else:
            model = FusionDiffuser(fusion_config(m))
            init = {"kind": "preset", "source": m.preset}
            if self.task == "edit":
                self.ctx.log("note: model.init_from is not set, so editing starts from a fresh generator; the paper "
                             "continues the t2i export (model.init_from=<t2i run>/export/generator.safetensors)")
            if m.preset != "tiny":
                self.ctx.log(f"note: preset {m.preset} starts from a RANDOM LM; the paper initialises from "
                             f"{model.config.lm_source}: set model.lm_path to its folder")
        model.tokenizer = self._tokenizer(model.tokenizer)
        if model.tokenizer is None:
            raise ConfigError("the generator has no tokenizer: set model.tokenizer to an HF tokenizer folder (the "
                              "LM's, e.g. Qwen2.5-0.5B) or \"bytes\" for byte-level ids (tiny preset), or start "
                              "from model.lm_path")
        vocab = int(model.config.lm.get("vocab_size", 0))
        if len(model.tokenizer) > vocab:
            raise ConfigError(f"the tokenizer has {len(model.tokenizer)} ids but the LM's vocabulary is {vocab}; use "
                              f"the LM's own tokenizer (model.tokenizer) or a preset with a larger vocab_size")
        if self.task == "t2i":
            # unused without a source (and DDP needs every trained parameter to take part)
            model.source_embedder.requires_grad_(False)
        return model.train(), init

    def _check_latent_match(self):
        gen, vae = self.generator.config, self.vae
        grid = tuple(int(v) for v in gen.latent_size)
        if gen.latent_channels != vae.latent_channels or grid != self.latent_grid:
            raise ConfigError(
                f"the generator makes {gen.latent_channels}x{grid[0]}x{grid[1]} latents but the VAE "
                f"{self.vae_path.name} has {vae.latent_channels} latent channels on a "
                f"{self.latent_grid[0]}x{self.latent_grid[1]} grid "
                f"(data.image_size={self.cfg.data.image_size}). Use the VAE the generator was made for, or (for a new "
                f"generator) set model.overrides.latent_channels={vae.latent_channels} "
                f"model.overrides.latent_size=[{self.latent_grid[0]},{self.latent_grid[1]}]")

    def _vae_verdict(self, provenance, generator: str):
        """psvae_core.provenance's rule: is model.vae the VAE `provenance` records?"""
        return vae_mismatch(recorded_vae(provenance), self.vae_fingerprint, self.vae.latents_mean, self.vae.latents_std,
                            generator=generator, vae=self.vae_path.name)

    def _check_init_vae(self, path: Path):
        # from_file has read the file, so its provenance is valid JSON
        verdict = self._vae_verdict(json.loads(read_metadata(path).get("provenance", "{}")), path.name)
        if verdict.note:
            self.ctx.log("note: model.init_from: " + verdict.note)
        if verdict.problem:
            message = f"model.init_from: {verdict.problem}"
            if not self.cfg.model.allow_other_vae:
                raise ConfigError(message + "; use model.vae=<that VAE>, or pass model.allow_other_vae=true to "
                                  "adapt anyway")
            self.ctx.log("note: " + message)

    def _check_run_vae(self):
        """A resumed run must use the VAE it started with (the latents define what was learned), by the
        same rule as model.init_from."""
        record = self.ctx.run_dir / "generator_vae.json"
        if self.cfg.checkpoint.resume and record.is_file():
            before = json.loads(record.read_text())
            before.setdefault("vae_fingerprint", before.get("fingerprint"))  # a record written before the "vae" entry
            verdict = self._vae_verdict(before, f"in run {self.ctx.run_dir.name}")
            if verdict.problem:
                raise ConfigError(f"model.vae={self.vae_path}: {verdict.problem}. Resume with the VAE this run "
                                  f"started with, or start a new run")
        if self.ctx.rank == 0:
            self.ctx.run_dir.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(self.vae_provenance()) + "\n")

    # --- data ---------------------------------------------------------------------------------
    def _open(self, source: str):
        """A trainer.data source (map-style set or TarShardStream)."""
        d = self.cfg.data
        common = dict(format=d.format, size=d.image_size, seed=self.cfg.run.seed, min_side=d.min_side,
                      check_images=d.check_images)
        if self.task == "edit":
            return td.open_edit(source, **common)
        return td.open_t2i(source, text_fields=tuple(d.text_fields), image_column=d.hf_image_column,
                           text_column=d.hf_text_column, split=d.hf_split, **common)

    def _cached(self, dataset, what: str):
        """`dataset` served from the latent cache, filling what is missing first (split by rank)."""
        ctx, d, t = self.ctx, self.cfg.data, self.cfg.train
        cache = td.TensorCache.for_latents(d.latent_cache, self.vae_path, d.image_size, DTYPES[d.latent_cache_dtype])
        encode = lambda images: self._encode_raw(self.vae, images)  # noqa: E731
        common = dict(batch_size=t.batch_size, num_workers=t.num_workers, rank=ctx.rank, world_size=ctx.world_size,
                      barrier=ctx.barrier, log=ctx.log)
        if isinstance(dataset, td.TarShardStream):
            dataset, stats = td.fill_cache_from_tar(dataset, cache, encode, **common)
        else:
            stats = td.fill_cache(cache, dataset, encode, **common)
        self.reports[f"{what}_cache"] = {"folder": str(cache.folder), **stats}
        return td.CachedDataset(dataset, cache)

    def datasets(self):
        d, ctx = self.cfg.data, self.ctx
        train = self._open(d.source)
        val = self._open(d.val_source) if d.val_source else None
        streaming = isinstance(train, td.TarShardStream) or isinstance(val, td.TarShardStream)
        if streaming and not d.latent_cache:
            raise DataError(f"{d.source if isinstance(train, td.TarShardStream) else d.val_source} is a set of tar "
                            f"shards (streamed); the generator stages train on them through the latent cache: set "
                            f"data.latent_cache=DIR (it is encoded once, then training reads latents)")
        self.reports["train"] = train.report()
        if val is not None:
            self.reports["val"] = val.report()
        if d.latent_cache:
            train = self._cached(train, "train")
            self.reports["train_cached"] = train.report()  # what the cache serves (for tar shards: all the counts)
            if val is not None:
                val = self._cached(val, "val")
        if d.val_count and val is None:
            kept, held = split_holdout(len(train), d.val_count, self.cfg.run.seed)
            train, val = Subset(train, kept), Subset(train, held)
        self.train_size = len(train)
        ctx.log(f"data: {len(train)} training samples from {d.source}"
                + (f"; {len(val)} held out" if val is not None else "")
                + (f"; latents from the cache under {d.latent_cache}" if d.latent_cache
                   else "; latents encoded on the fly"))
        if ctx.rank == 0:
            ctx.run_dir.mkdir(parents=True, exist_ok=True)
            (ctx.run_dir / "data_report.json").write_text(json.dumps(self.reports, indent=2, default=str) + "\n")
        self.train_set = train
        return train, val

    def data_description(self) -> dict:
        d = self.cfg.data
        out = {"task": self.task, "source": d.source, "samples": getattr(self, "train_size", None),
               "image_size": d.image_size, "vae_fingerprint": self.vae_fingerprint,
               "latent_cache": self.reports.get("train_cache", {}).get("folder")}
        if d.val_source:
            out["val_source"] = d.val_source
        return out

    def collate(self, items: list[dict]) -> dict:
        out = {"key": [it["key"] for it in items], "text": [it["text"] for it in items]}
        for name in ("image", "source", "latent", "source_latent"):
            if name in items[0]:
                out[name] = torch.stack([it[name] for it in items])
        enc = self.tokenizer(out["text"], padding=True, truncation=True, max_length=self.cfg.data.max_text_tokens,
                             return_tensors="pt", return_token_type_ids=False)
        out["input_ids"], out["attention_mask"] = enc["input_ids"], enc["attention_mask"]
        return out

    # --- latents --------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode_raw(self, vae, images: torch.Tensor) -> torch.Tensor:
        """Posterior mean (raw) of images 0..1: the same function fills the cache and runs on the fly."""
        with self.frozen_precision():
            return td.encode_latents(vae, images.float())

    def _latents(self, batch: dict, name: str) -> Optional[torch.Tensor]:
        """Normalised latents [B,C,h,w] float32 of `name` ("image" = the target, or "source")."""
        cached = "latent" if name == "image" else f"{name}_latent"
        if cached in batch:
            raw = batch[cached].float()
        elif name in batch:
            raw = self._encode_raw(self.vae, batch[name])
        else:
            return None
        return self.vae.normalize_latents(raw.float())

    @torch.no_grad()
    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        with self.frozen_precision():
            return generation.decode(self.vae, z)

    # --- training -----------------------------------------------------------------------------
    def build(self) -> list[Trainable]:
        return [Trainable("generator", self.generator, self.cfg.optim, ema=True)]

    def _masks(self, b: int, step: int, micro: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        ctx, L = self.ctx, self.cfg.loss
        p_image = L.image_dropout if self.task == "edit" else 0.0
        accum = self.cfg.train.grad_accum
        keep_text, keep_image = cfg_dropout_masks(ctx.seed, step, b * ctx.world_size * accum, L.text_dropout, p_image)
        if micro == 0:
            self._drops = Counter()
        # Counts over this micro-batch of every process (every process draws the same masks).
        now = slice(micro * ctx.world_size * b, (micro + 1) * ctx.world_size * b)
        text_off, image_off = ~keep_text[now], ~keep_image[now]
        self._drops.update(samples=len(text_off), text_dropped=int(text_off.sum()))
        if self.task == "edit":
            self._drops.update(image_dropped=int(image_off.sum()), both_dropped=int((text_off & image_off).sum()))
        rows = micro_rows(b, ctx.rank, ctx.world_size, micro)
        keep_image = keep_image[rows].to(ctx.device) if self.task == "edit" else None
        return keep_text[rows].to(ctx.device), keep_image

    def training_step(self, models, batch, step, micro) -> StepResult:
        L = self.cfg.loss
        x0 = self._latents(batch, "image")
        source = self._latents(batch, "source") if self.task == "edit" else None
        b = x0.shape[0]
        keep_text, keep_image = self._masks(b, step, micro)
        mask = batch["attention_mask"] * keep_text[:, None].to(batch["attention_mask"].dtype)  # null text = no keys
        t = flow.train_times(self.noise((b,), step, micro, "flow-time"), self.shift, L.logit_mean, L.logit_std)
        noise = self.noise(tuple(x0.shape), step, micro, "flow-noise")
        loss = models.raw("generator").training_loss(x0, (batch["input_ids"], mask), source, keep_image, t=t,
                                                     noise=noise, wrapped=models["generator"])
        logs = {f"cfg/{k}": float(v) for k, v in self._drops.items()}
        return StepResult({"generator": {"flow": loss}}, logs)

    # --- evaluation, previews, export --------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model, batch):
        """Per-sample flow loss with fixed (t, noise) per sample key: comparable across validations."""
        L = self.cfg.loss
        x0 = self._latents(batch, "image")
        source = self._latents(batch, "source") if self.task == "edit" else None
        draws = [torch.Generator().manual_seed(derive_seed(self.ctx.seed, "val", key)) for key in batch["key"]]
        u = torch.cat([torch.randn(1, generator=g) for g in draws]).to(x0.device)  # each key's u, then its noise
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in draws]).to(x0.device)
        t = flow.train_times(u, self.shift, L.logit_mean, L.logit_std)
        per = model.training_loss(x0, (batch["input_ids"], batch["attention_mask"]), source, t=t, noise=noise,
                                  reduction="none")
        return {"flow_loss": per.double()}

    @torch.no_grad()
    def preview(self, model, batch):
        """t2i: samples for preview.prompts (or the batch's captions); edit: sources, edits, targets."""
        P = self.cfg.preview
        if self.task == "edit":
            source = self._latents(batch, "source")
            z = generation.generate(model, list(batch["text"]), source, steps=P.steps, shift=P.shift,
                                    guidance=P.guidance, image_guidance=P.image_guidance, seed=P.seed)
            target = batch["image"].float() if "image" in batch else self._decode(self._latents(batch, "image"))
            shown = batch["source"].float() if "source" in batch else self._decode(source)
            return torch.cat([shown, self._decode(z), target])
        prompts = list(P.prompts) or list(batch["text"])
        z = generation.generate(model, prompts, steps=P.steps, shift=P.shift, guidance=P.guidance, seed=P.seed)
        return self._decode(z)

    def vae_provenance(self) -> dict:
        """What the export records about its VAE (psvae_core.provenance; docs/TRAINER_GENERATOR.md §5)."""
        return vae_provenance(name=self.vae_path.name, path=str(self.vae_path), fingerprint=self.vae_fingerprint,
                              sha256=self.vae_sha256, latent_channels=self.vae.latent_channels,
                              latent_grid=self.latent_grid, latent_stats=self.vae_latent_stats)

    def export(self, model, folder: Path, provenance: dict) -> Optional[Path]:
        L = self.cfg.loss
        dropout = {"text": L.text_dropout, **({"image": L.image_dropout} if self.task == "edit" else {})}
        return self.write_export(model, folder / EXPORT_NAME, {
            **provenance, **self.vae_provenance(), "task": self.task, "init": self.init, "train_shift": self.shift,
            "cfg_dropout": dropout, "image_size": self.cfg.data.image_size, "dtype": self.cfg.export.dtype})


@register
class T2IStage(_GeneratorStage):
    """Text-to-image: [caption ; noisy latent], caption dropout for CFG."""

    name = "t2i"


@register
class EditStage(_GeneratorStage):
    """Instruction editing: [clean source latent ; instruction ; noisy latent]; text and source dropped
    independently."""

    name = "edit"
    task = "edit"
    config_class = EditConfig
