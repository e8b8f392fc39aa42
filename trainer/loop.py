"""The one training loop. It knows nothing about autoencoders: a `Stage` supplies datasets,
modules and losses (stage.py); this file supplies processes, precision, accumulation, clipping,
EMA, checkpoints, logging, the NaN guard, validation, previews, signals and the final export.
What makes a resume exact and N processes equal one: docs/TRAINER.md "Exact resume and checkpoints".
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import time
import warnings
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import (DistributedDataParallelKwargs, broadcast_object_list, gather_object,
                              send_to_device)
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.utils.data import DataLoader

from psvae_core.compile import compile_blocks
from psvae_core.dtypes import to_dtype

from . import __version__, checkpointing as ckpt, sharding
from .config import ConfigError, config_hash, to_yaml
from .data import GlobalBatchSampler, shard_indices
from .ema import EMA
from .rng import capture_rng_state, restore_rng_state, seed_everything
from .stage import Context, Models, Stage, Trainable
from .tracking import Tracker



class TrainingHalted(RuntimeError):
    """Too many non-finite steps in a row; the message names the loss terms."""


def lr_factor(step: int, optim, max_steps: int) -> float:
    """LR multiplier at `step`: linear warm-up, then constant or cosine down to min_lr_ratio."""
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class _Group:
    """A Trainable once the loop owns it: wrapped module, optimiser, schedule, EMA, and (sharded)
    a parameter-free template to rebuild the whole module for evaluation and export."""

    def __init__(self, spec: Trainable, wrapped, raw, max_steps: int, ema: Optional[EMA],
                 template: Optional[torch.nn.Module] = None, fused: bool = False):
        self.name, self.spec, self.wrapped, self.raw, self.ema = spec.name, spec, wrapped, raw, ema
        self.template = template
        o = spec.optim
        groups = defaultdict(list)
        for pname, p in raw.named_parameters():
            if p.requires_grad:
                scale = next((s for prefix, s in spec.lr_scales.items() if pname.startswith(prefix)), 1.0)
                groups[scale].append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": ps, "lr": o.lr * s} for s, ps in sorted(groups.items())],
            lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps, fused=fused or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, o, max_steps))
        self.params = [p for ps in groups.values() for p in ps]


def _signal_handlers(flag: dict):
    def handler(signum, _frame):
        flag["signal"] = signum
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    return previous


def _worker_init(_):
    # Ctrl+C reaches the whole process group; only the main process handles it (clean save).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Loop:
    def __init__(self, stage_cls: type[Stage], cfg):
        self.cfg = cfg
        cuda = torch.cuda.is_available()
        # On CPU accelerate only forms a gloo process group with cpu=True; mixed precision is then our
        # own autocast (the config, not the launcher, decides precision: one place to set it).
        # Gradients as views of DDP's buckets: no copy into the buckets, one gradient buffer less.
        ddp = DistributedDataParallelKwargs(gradient_as_bucket_view=True)
        self.acc = Accelerator(mixed_precision=cfg.precision.mixed if cuda else "no", cpu=not cuda,
                               kwargs_handlers=[ddp])
        launcher_mp = os.environ.get("ACCELERATE_MIXED_PRECISION")
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        launcher_fsdp = str(self.acc.distributed_type).endswith("FSDP")
        self.sharded = (cfg.train.fsdp or launcher_fsdp) and self.world > 1
        if self.sharded and not stage_cls.shard_units:
            raise ConfigError(f"the '{cfg.stage}' stage does not support FSDP (train.fsdp / accelerate launch "
                              f"--use_fsdp); it trains with DDP: set train.fsdp=false and launch with --multi_gpu")
        self.device, self.main = self.acc.device, self.rank == 0
        self.run_dir = Path(cfg.run.output_dir) / cfg.run.name
        self.ckpt_root = self.run_dir / "checkpoints"
        if cuda and cfg.precision.tf32:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        # Training batches have one shape: let cuDNN time its convolution algorithms once.
        torch.backends.cudnn.benchmark = cuda
        self.amp_dtype = None if cfg.precision.mixed == "no" else to_dtype(cfg.precision.mixed)
        self.global_batch = cfg.train.batch_size * self.world * cfg.train.grad_accum
        self.hash = config_hash(cfg)
        self.resume_dir = ckpt.resolve_resume(cfg.checkpoint.resume, self.ckpt_root, self.log)
        if self.resume_dir is None and ckpt.complete_checkpoints(self.ckpt_root):
            raise ckpt.ResumeError(f"{self.run_dir} already has checkpoints; pass checkpoint.resume=latest to "
                                   f"continue that run, or choose another run.name")
        if self.main:  # the first write: a folder that cannot take one is refused before any work
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
            except OSError as err:
                raise ckpt.output_error(self.run_dir, err, "creating the run folder") from None
        self.acc.wait_for_everyone()
        seed_everything(cfg.run.seed)
        self.ctx = Context(run_dir=self.run_dir, device=self.device, rank=self.rank, world_size=self.world,
                           seed=cfg.run.seed, autocast_dtype=self.amp_dtype,
                           reduce_mean=partial(self.acc.reduce, reduction="mean"), log=self.log)
        self.stage = stage_cls(cfg, self.ctx)
        if launcher_mp and launcher_mp != cfg.precision.mixed:
            self.log(f"note: the launcher asked for mixed precision {launcher_mp!r}; the config's "
                     f"precision.mixed={cfg.precision.mixed!r} is used")
        if launcher_fsdp:
            self.log("note: FSDP from the launcher: the trainer shards with FSDP2 over the stage's blocks "
                     "(accelerate's other FSDP options are not used)")
        if cfg.train.fsdp and self.world == 1:
            self.log("note: train.fsdp with one process: nothing to shard, training unsharded")

    # ------------------------------------------------------------------ small helpers
    def log(self, text: str) -> None:
        if self.main:
            tracker = getattr(self, "tracker", None)
            if tracker is not None and tracker.enabled:
                tracker.message(text)
            else:
                print(text, flush=True)

    def _any(self, flag) -> bool:
        """Whether `flag` (a bool, or a bool tensor on the device) is true on any process."""
        return bool(self.acc.reduce(torch.as_tensor(flag, device=self.device).float().reshape(1), "max").item() > 0)

    def autocast(self):
        # Not accelerator.autocast: on CPU accelerate runs without mixed precision (see __init__).
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _to_device(self, batch):
        return send_to_device(batch, self.device, non_blocking=True)

    def _loader(self, dataset, step: int) -> DataLoader:
        t = self.cfg.train
        sampler = GlobalBatchSampler(len(dataset), t.batch_size, self.world, self.rank, self.cfg.run.seed,
                                     t.grad_accum, step)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=t.num_workers, collate_fn=self.stage.collate,
                          pin_memory=self.device.type == "cuda", worker_init_fn=_worker_init if t.num_workers else None,
                          persistent_workers=False)

    def eval_model(self, group: _Group, use_ema: bool):
        """The module used for validation/preview/export: an EMA copy, or the plain module. Sharded,
        a whole copy rebuilt on every process (all processes must call this)."""
        ema = group.ema if use_ema else None
        if self.sharded:
            return sharding.materialize(group.template, group.raw, ema.full_shadow() if ema else {}).eval()
        return ema.copy_of(group.raw).eval() if ema else group.raw

    # ------------------------------------------------------------------ checkpoint I/O
    def _save(self, step: int) -> None:
        root = self.ckpt_root
        tmp = ckpt.tmp_dir(root, step)
        try:
            if self.main:
                ckpt.begin(root, step)
            self.acc.wait_for_everyone()
            ckpt.save_object(tmp / f"rng_rank{self.rank}.pt", capture_rng_state())
            # Every process takes part in gathering full tensors (copies when replicated, gathers when sharded).
            for g in self.groups.values():
                weights = sharding.model_state(g.raw)
                shadow = g.ema.full_shadow() if g.ema is not None else None
                optimizer = sharding.optimizer_state(g.raw, g.optimizer)
                if self.main:
                    ckpt.save_tensors(tmp / f"{g.name}.safetensors", weights)
                    if shadow is not None:
                        ckpt.save_tensors(tmp / f"{g.name}.ema.safetensors", shadow)
                        ckpt.write_json(tmp / f"{g.name}.ema.json", {"num_updates": g.ema.num_updates})
                    ckpt.save_object(tmp / f"{g.name}.optim.pt", {"optimizer": optimizer,
                                                                  "scheduler": g.scheduler.state_dict()})
            if self.main:
                if self.scaler.is_enabled():
                    ckpt.save_object(tmp / "scaler.pt", self.scaler.state_dict())
                ckpt.write_json(tmp / "trainer_state.json", {
                    "step": step, **self.counters, "stage": self.cfg.stage,
                    "world_size": self.world, "batch_size": self.cfg.train.batch_size,
                    "grad_accum": self.cfg.train.grad_accum, "global_batch": self.global_batch,
                    "config_hash": self.hash, "trainer_version": __version__})
                (tmp / "config.yaml").write_text(to_yaml(self.cfg))
            self.acc.wait_for_everyone()
            if self.main:
                final = ckpt.commit(root, step, self.cfg.checkpoint.keep_last)
                self.log(f"saved checkpoint {final}")
            self.acc.wait_for_everyone()
        except OSError as err:  # the previous complete checkpoint stays as it is
            shutil.rmtree(tmp, ignore_errors=True)
            raise ckpt.output_error(root, err, f"writing checkpoint {ckpt.step_dir_name(step)}") from None

    def _read_state(self, folder: Path) -> dict:
        state = ckpt.read_json(folder / "trainer_state.json")
        if state.get("stage") != self.cfg.stage:
            raise ckpt.ResumeError(f"{folder} is a '{state.get('stage')}' checkpoint; this run is '{self.cfg.stage}'")
        # Data order and training noise are drawn per global batch, so only the global batch must
        # match: a 2-GPU checkpoint continues exactly on 1 GPU (or with another accumulation split).
        if state.get("global_batch") != self.global_batch and not self.cfg.checkpoint.allow_mismatch:
            raise ckpt.ResumeError(f"{folder} was written with global batch {state.get('global_batch')}, this run has "
                                   f"{self.global_batch}: the data order and the noise would not continue exactly. "
                                   f"Use the same global batch (batch_size x processes x grad_accum), or pass "
                                   f"checkpoint.allow_mismatch=true to resume anyway")
        if state.get("world_size") != self.world:
            self.log(f"note: resuming a {state.get('world_size')}-process checkpoint on {self.world} process(es) "
                     f"with the same global batch {self.global_batch}")
        if state.get("config_hash") != self.hash:
            self.log(f"note: the config differs from the one {folder.name} was written with (see its config.yaml)")
        return state

    def _load_rest(self, folder: Path, state: dict) -> None:
        for g in self.groups.values():
            blob = ckpt.load_object(folder / f"{g.name}.optim.pt")
            sharding.load_optimizer_state(g.raw, g.optimizer, blob["optimizer"])
            g.scheduler.load_state_dict(blob["scheduler"])
            if g.ema is not None:
                g.ema.load_state_dict({"shadow": ckpt.load_tensors(folder / f"{g.name}.ema.safetensors"),
                                       "num_updates": ckpt.read_json(folder / f"{g.name}.ema.json")["num_updates"]})
        if self.scaler.is_enabled() and (folder / "scaler.pt").is_file():
            self.scaler.load_state_dict(ckpt.load_object(folder / "scaler.pt"))
        rng_file = folder / f"rng_rank{self.rank}.pt"
        if state["world_size"] == self.world and rng_file.is_file():
            restore_rng_state(ckpt.load_object(rng_file))

    # ------------------------------------------------------------------ setup
    def _setup(self):
        cfg = self.cfg
        self.train_ds, self.val_ds = self.stage.datasets()
        GlobalBatchSampler(len(self.train_ds), cfg.train.batch_size, self.world, self.rank, cfg.run.seed,
                           cfg.train.grad_accum)  # size check
        specs = self.stage.build()
        state = self._read_state(self.resume_dir) if self.resume_dir is not None else None
        if state is not None:
            for spec in specs:
                weights = ckpt.load_tensors(self.resume_dir / f"{spec.name}.safetensors")
                spec.module.load_state_dict(weights, strict=True)
        self.groups: dict[str, _Group] = {}
        for spec in specs:
            spec.module.to(self.device)
            if cfg.train.compile:  # before wrapping and before the EMA copies anything
                count = compile_blocks(spec.module, cfg.train.compile_mode)
                self.log(f"torch.compile ({cfg.train.compile_mode}) of {count} blocks of '{spec.name}'")
            template = None
            # One fused AdamW kernel: on CUDA, and on FSDP's shards on any device; not sharded with fp16
            # (torch 2.14's ShardedGradScaler breaks it: docs/TRAINER.md "Several processes").
            fused = self.device.type == "cuda" or (self.sharded and cfg.precision.mixed != "fp16")
            if self.sharded:
                template = sharding.meta_template(spec.module)
                units = sharding.shard(spec.module, self.stage.shard_units, self.device)
                wrapped = raw = spec.module
                local = sum(p.to_local().numel() for p in raw.parameters())
                kinds = " + ".join(f"{sum(isinstance(u, c) for u in units)} {c.__name__}" for c in self.stage.shard_units)
                self.log(f"FSDP: '{spec.name}' sharded over {self.world} processes in {kinds} units and the root, "
                         f"{'fused' if fused else 'unfused'} AdamW ({local:,} of "
                         f"{sum(p.numel() for p in raw.parameters()):,} parameters on rank {self.rank})")
            else:
                wrapped = self.acc.prepare(spec.module)
                raw = self.acc.unwrap_model(wrapped)
            ema = EMA(raw, cfg.ema.decay, cfg.ema.warmup) if (spec.ema and cfg.ema.enabled) else None
            self.groups[spec.name] = _Group(spec, wrapped, raw, cfg.train.max_steps, ema, template, fused)
        unwrap = (lambda m: m) if self.sharded else self.acc.unwrap_model
        self.models = Models({n: g.wrapped for n, g in self.groups.items()}, unwrap)
        self.main_group = self.groups[specs[0].name]
        # Without fp16 a disabled scaler: scale, unscale_ and update do nothing, step only steps.
        fp16 = cfg.precision.mixed == "fp16"
        self.scaler = (ShardedGradScaler(enabled=fp16) if self.sharded
                       else torch.amp.GradScaler(self.device.type, enabled=fp16))
        self.step = 0
        self.counters = {"nan_steps": 0, "nan_consecutive": 0, "scaler_skips": 0}
        if state is not None:
            self._load_rest(self.resume_dir, state)
            self.step = int(state["step"])
            self.counters.update({k: int(state.get(k, 0)) for k in self.counters})
            self.log(f"resumed from {self.resume_dir} at step {self.step}")

    # ------------------------------------------------------------------ one optimiser step
    def _train_step(self, batches) -> tuple[dict, dict, list[str]]:
        """Accumulate, agree on non-finite losses, clip, step, advance the schedules, update the EMA.
        Returns the mean losses, the logs (on the device until a log step reads them) and the
        non-finite terms. Two host syncs, both to decide whether to step: any non-finite loss, grad norm."""
        sums, logs, active, finite = self._accumulate(batches)
        bad = self._agree_on_nonfinite(finite)
        grad_norms = {} if bad else self._clip(active)
        if not bad:
            bad = self._optimizer_step(active, grad_norms)
        self._advance_schedules()
        if bad:
            self._count_skipped(bad)
        else:
            self.counters["nan_consecutive"] = 0
            self._update_ema()
        self.step += 1
        return sums, {**logs, **grad_norms}, bad

    def _accumulate(self, batches) -> tuple[dict, dict, set, dict]:
        """Forward and backward over grad_accum micro-batches; gradients are reduced over processes on
        the last one only. Returns mean losses, logs, the groups with a loss, and per term a bool
        tensor: finite in every micro-batch. Nothing here waits for the device."""
        accum = self.cfg.train.grad_accum
        sums, logs, active, finite = {}, {}, set(), {}
        for micro in range(accum):
            start = time.perf_counter()
            batch = next(batches)
            self.data_wait += time.perf_counter() - start
            batch = self._to_device(batch)
            with self._gradient_sync(micro == accum - 1):
                with self.autocast():
                    result = self.stage.training_step(self.models, batch, self.step, micro)
                total = None
                for group, terms in result.losses.items():
                    active.add(group)
                    for term, value in terms.items():
                        value, name = value.float(), f"{group}/{term}"
                        ok = torch.isfinite(value.detach()).all()
                        finite[name] = finite[name] & ok if name in finite else ok
                        sums[name] = sums.get(name, 0.0) + value.detach() / accum
                        total = value if total is None else total + value
                if total is not None:
                    self.scaler.scale(total / accum).backward()
            logs.update({k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in result.logs.items()})
        return sums, logs, active, finite

    def _gradient_sync(self, sync: bool):
        stack = contextlib.ExitStack()
        if self.sharded:
            for g in self.groups.values():
                g.wrapped.set_requires_gradient_sync(sync)
        elif not sync and self.world > 1:
            for g in self.groups.values():
                stack.enter_context(self.acc.no_sync(g.wrapped))
        return stack

    def _agree_on_nonfinite(self, finite: dict) -> list[str]:
        """Every process skips the step if any saw a non-finite loss; all name the same terms."""
        names = sorted(finite)
        nonfinite = ~torch.stack([finite[n] for n in names]) if names else torch.zeros(0, dtype=torch.bool)
        if not self._any(nonfinite.any()):
            return []
        return sorted(set(gather_object([n for n, flag in zip(names, nonfinite.tolist()) if flag])))

    def _clip(self, active: set) -> dict[str, float]:
        """Unscale (fp16) and clip each stepped group's gradients; returns their norms before clipping."""
        grad_norms = {}
        for name in sorted(active):
            g = self.groups[name]
            self.scaler.unscale_(g.optimizer)
            clip = g.spec.optim.grad_clip or float("inf")  # 0 disables clipping
            norm = torch.nn.utils.clip_grad_norm_(g.params, clip)  # sharded: itself a shard until gathered
            grad_norms[f"grad_norm/{name}"] = sharding.full_tensor(norm).detach()
        return grad_norms

    def _optimizer_step(self, active: set, grad_norms: dict) -> list[str]:
        """Step the optimisers; returns the non-finite gradient norms when that skips the step
        (without fp16 scaler; with it, the scaler skips and lowers its scale)."""
        names = sorted(grad_norms)
        finite = torch.stack([grad_norms[k].float() for k in names]).isfinite().tolist() if names else []
        nonfinite = [k for k, ok in zip(names, finite) if not ok]
        if nonfinite and not self.scaler.is_enabled():
            return nonfinite
        if nonfinite:
            self.counters["scaler_skips"] += 1
        for name in sorted(active):
            self.scaler.step(self.groups[name].optimizer)
        self.scaler.update()
        return []

    def _advance_schedules(self) -> None:
        for g in self.groups.values():
            g.optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # a group not stepped yet (discriminator before its start) still
                warnings.simplefilter("ignore", UserWarning)  # advances: the LR is a function of the global step
                g.scheduler.step()

    def _count_skipped(self, bad: list[str]) -> None:
        c = self.counters
        c["nan_steps"] += 1
        c["nan_consecutive"] += 1
        self.log(f"step {self.step}: non-finite {', '.join(bad)}; step skipped "
                 f"({c['nan_consecutive']} in a row, {c['nan_steps']} in total)")
        if c["nan_consecutive"] >= max(1, self.cfg.nan.max_consecutive):
            raise TrainingHalted(f"halted: {c['nan_consecutive']} non-finite steps in a row "
                                 f"(last: {', '.join(bad)}). Lower optim.lr, use precision.mixed=bf16 or no, "
                                 f"or resume from an earlier checkpoint")

    def _update_ema(self) -> None:
        if (self.step + 1) % self.cfg.ema.every == 0:
            for g in self.groups.values():
                if g.ema is not None:
                    g.ema.update(g.raw)

    # ------------------------------------------------------------------ validation / previews
    @torch.no_grad()
    def validate(self) -> dict:
        if self.val_ds is None or len(self.val_ds) == 0:
            return {}
        cfg = self.cfg
        model = self.eval_model(self.main_group, cfg.validation.use_ema)
        n = min(len(self.val_ds), cfg.validation.max_images)
        mine = shard_indices(n, self.world, self.rank)
        sums: dict[str, float] = defaultdict(float)
        bs = cfg.train.batch_size
        for i in range(0, len(mine), bs):
            batch = self._to_device(self.stage.collate([self.val_ds[j] for j in mine[i:i + bs]]))
            with self.autocast():
                metrics = self.stage.evaluate(model, batch)
            for k, v in metrics.items():
                sums[k] += float(v.float().sum())
        names = broadcast_object_list([sorted(sums)])[0]
        totals = torch.tensor([sums.get(k, 0.0) for k in names], dtype=torch.float64, device=self.device)
        return {k: float(v) / n for k, v in zip(names, self.acc.reduce(totals, "sum").tolist())}

    @torch.no_grad()
    def preview(self) -> None:
        cfg = self.cfg
        source = self.val_ds if self.val_ds is not None and len(self.val_ds) else self.train_ds
        count = min(cfg.log.images_count, len(source))
        batch = self._to_device(self.stage.collate([source[i] for i in range(count)]))
        model = self.eval_model(self.main_group, cfg.validation.use_ema)
        if not self.main:  # sharded: every process helped to gather the model
            return
        with self.autocast():
            images = self.stage.preview(model, batch)
        if images is None:
            return
        from torchvision.utils import make_grid, save_image
        grid = make_grid(images.float().clamp(0, 1).cpu(), nrow=count, padding=2)
        out = self.run_dir / "samples"
        out.mkdir(exist_ok=True)
        save_image(grid, out / f"step_{self.step:08d}.png")
        self.tracker.image("reconstructions", self.step, grid)

    # ------------------------------------------------------------------ export
    def export(self) -> Optional[Path]:
        cfg = self.cfg
        model = self.eval_model(self.main_group, cfg.export.ema)
        provenance = {"trainer": __version__, "stage": cfg.stage, "step": self.step, "config_hash": self.hash,
                      "seed": cfg.run.seed, "ema": bool(cfg.export.ema and self.main_group.ema is not None),
                      "global_batch": self.global_batch, "data": self.stage.data_description()}
        path = self.stage.export(model, self.run_dir / "export", provenance)
        self.acc.wait_for_everyone()
        return path

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        cfg = self.cfg
        self._setup()
        self.tracker = Tracker(self.run_dir, self.main, cfg.log.tensorboard, cfg.log.progress,
                               cfg.train.max_steps, self.step)
        flag: dict = {}
        previous = _signal_handlers(flag)
        batches = iter(self._loader(self.train_ds, self.step))
        last_saved = self.step if self.resume_dir is not None else -1
        summary: dict = {"run_dir": str(self.run_dir), "start_step": self.step}
        # The log window: its start, its steps, and the seconds spent in it waiting for batches.
        self.window_start, self.window_steps, self.data_wait = time.perf_counter(), 0, 0.0
        try:
            if self.main and self.step == 0:
                self.log(f"training '{cfg.stage}' for {cfg.train.max_steps} steps, global batch "
                         f"{self.global_batch} ({self.world} process(es)) -> {self.run_dir} "
                         f"({ckpt.free_space(self.run_dir)} free)")
            while self.step < cfg.train.max_steps:
                losses, logs, _ = self._train_step(batches)
                if cfg.train.compile and self.step == summary["start_step"] + 1:  # compiling happens in the first call
                    self.log(f"torch.compile: the first step took {time.perf_counter() - self.window_start:.1f} s "
                             f"(compilation and data loader start-up included)")
                self.window_steps += 1
                step = self.step
                if step % cfg.log.every == 0 or step == cfg.train.max_steps:
                    self._log_train(step, losses, logs)
                if cfg.log.images_every and step % cfg.log.images_every == 0 and (self.main or self.sharded):
                    self.preview()
                if cfg.validation.every and step % cfg.validation.every == 0 and step < cfg.train.max_steps:
                    self._log_validation(step)
                stop = self._any(bool(flag.get("signal"))) if self.world > 1 else bool(flag.get("signal"))
                if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or stop:
                    self._save(step)
                    last_saved = step
                if stop:
                    signum = flag.get("signal") or signal.SIGTERM
                    self.log(f"stopped by signal {signum} at step {step}; checkpoint saved. Continue with "
                             f"checkpoint.resume=latest")
                    summary.update(stopped=True, step=step, exit_code=128 + int(signum))
                    return summary
            if last_saved != self.step:
                self._save(self.step)
            summary["validation"] = self._log_validation(self.step)
            summary["export"] = str(self.export() or "")
            summary.update(step=self.step, stopped=False, exit_code=0, **self.counters)
            return summary
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.tracker.close()

    def _log_train(self, step: int, losses: dict, logs: dict) -> None:
        """A metrics row (losses averaged over processes, speed of the window) and the bar; a new window."""
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        mean = {k: float(self.acc.reduce(v, "mean")) for k, v in losses.items()}
        lr = self.main_group.scheduler.get_last_lr()[0]
        ips = self.window_steps * self.global_batch / elapsed
        speed = {"images_per_s": ips, "data_wait_share": self.data_wait / elapsed}
        memory = {"gpu_peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30} if torch.cuda.is_available() else {}
        logs = {k: float(v) for k, v in logs.items()}
        self.tracker.log("train", step, {**mean, **logs, "lr": lr, **speed, **memory, **self.counters})
        main_loss = sum(v for k, v in mean.items() if k.startswith(self.main_group.name + "/"))
        self.tracker.progress(step, {"loss": main_loss, "lr": lr, "img/s": ips})
        self.window_start, self.window_steps, self.data_wait = time.perf_counter(), 0, 0.0

    def _log_validation(self, step: int) -> dict:
        metrics = self.validate()
        if metrics:
            self.tracker.log("val", step, metrics)
            self.log(f"step {step} validation: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
        return metrics


def train(stage_cls: type[Stage], cfg) -> dict:
    return Loop(stage_cls, cfg).run()
