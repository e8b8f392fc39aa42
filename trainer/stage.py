"""The contract between the generic training loop (`loop.py`) and a stage, and the stage registry
(docs/TRAINER.md "Stages and the loop"). A stage says WHAT is trained (datasets, modules, losses,
validation, export); the loop says HOW (processes, precision, accumulation, checkpoints, ...).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from psvae_core.checkpoint import CheckpointError
from psvae_core.dtypes import DTYPES

from .config import ConfigError
from .rng import step_noise


@dataclass
class Trainable:
    """One optimiser's worth of parameters."""

    name: str
    module: nn.Module
    optim: Any  # an `OptimSection`-shaped config
    # parameter-name prefix (of `module.named_parameters()`) -> LR multiplier, e.g. {"vae.encoder.": 0.1}
    lr_scales: dict = field(default_factory=dict)
    ema: bool = False  # keep an EMA of this module (used for validation and export)


@dataclass
class StepResult:
    """losses: group name -> {term: weighted scalar loss} (the loop sums each group's terms, so the log
    shows every term and the NaN guard names the one that broke); a group absent this step is not
    stepped. logs: extra scalars to log (detached), e.g. the adaptive GAN weight."""

    losses: dict[str, dict[str, torch.Tensor]]
    logs: dict[str, Any] = field(default_factory=dict)


class Models:
    """`models[name]`: the module as the loop wrapped it (DDP/FSDP), to call in training;
    `models.raw(name)`: the plain one."""

    def __init__(self, wrapped: dict[str, nn.Module], unwrap):
        self._wrapped, self._unwrap = wrapped, unwrap

    def __getitem__(self, name: str) -> nn.Module:
        return self._wrapped[name]

    def __contains__(self, name: str) -> bool:
        return name in self._wrapped

    def raw(self, name: str) -> nn.Module:
        return self._unwrap(self._wrapped[name])


@dataclass
class Context:
    """What a stage may know about the run."""

    run_dir: Path
    device: torch.device
    rank: int
    world_size: int
    seed: int
    autocast_dtype: Optional[torch.dtype]  # None: float32
    reduce_mean: Any  # tensor -> its mean over processes (identity in one process)
    log: Any  # str -> None, printed on rank 0

    def barrier(self) -> None:
        """Wait for every process (nothing in one)."""
        if self.world_size > 1:
            torch.distributed.barrier()


class Stage:
    name: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    # Module classes that are their own FSDP unit (run by their forward, best once a step in module
    # order: each prefetches the next); empty: DDP only, FSDP is refused.
    shard_units: ClassVar[tuple[type, ...]] = ()

    def __init__(self, cfg, ctx: Context):
        self.cfg, self.ctx = cfg, ctx

    # --- required ---------------------------------------------------------------------------
    def datasets(self) -> tuple[torch.utils.data.Dataset, Optional[torch.utils.data.Dataset]]:
        raise NotImplementedError

    def build(self) -> list[Trainable]:
        raise NotImplementedError

    def training_step(self, models: Models, batch: dict, step: int, micro: int) -> StepResult:
        raise NotImplementedError

    # --- optional ---------------------------------------------------------------------------
    def data_description(self) -> dict:
        """What the model was trained on, for the export's provenance."""
        return {}

    def collate(self, items: list[dict]) -> dict:
        return torch.utils.data.default_collate(items)

    def evaluate(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """Per-sample metrics `[B]` of the (EMA) main model on a held-out batch."""
        return {}

    def preview(self, model: nn.Module, batch: dict) -> Optional[torch.Tensor]:
        """Images `[N,3,H,W]` in 0..1 to show as a grid, or None."""
        return None

    def export(self, model: nn.Module, folder: Path, provenance: dict) -> Optional[Path]:
        """Write the inference file(s) of the (EMA) main model; runs on every process (rank 0 writes)."""
        return None

    # --- shared by the stages -------------------------------------------------------------------
    def noise(self, shape, step: int, micro: int, what: str, uniform: bool = False) -> torch.Tensor:
        """This process's rows of the step's noise `what` (rng.step_noise): the same for any process layout."""
        c = self.ctx
        return step_noise(shape, c.rank, c.world_size, micro, self.cfg.train.grad_accum, c.device, c.seed, what,
                          step, uniform=uniform)

    def frozen_precision(self):
        """Frozen networks (encoder, teacher, the generator's VAE) run in float32 when
        precision.frozen_fp32, whatever the autocast."""
        if self.cfg.precision.frozen_fp32:
            return torch.autocast(device_type=self.ctx.device.type, enabled=False)
        return contextlib.nullcontext()

    def write_export(self, model: nn.Module, path: Path, provenance: dict) -> Path:
        """Rank 0 saves `model` (a psvae_core model: `save(path, provenance, dtype)`) in export.dtype;
        every process returns the path."""
        if self.ctx.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            model.save(path, provenance=provenance, dtype=DTYPES[self.cfg.export.dtype])
            self.ctx.log(f"exported {path}")
        return path


def open_export(load, path: Path, setting: str, value, what: str):
    """`load(path)` of the export file a setting names; a missing or unreadable file is a ConfigError."""
    if not path.is_file():
        raise ConfigError(f"{setting}={value}: no such file; point it at {what}")
    try:
        return load(path)
    except CheckpointError as err:
        raise ConfigError(f"{setting}: {err}") from None


STAGES: dict[str, type[Stage]] = {}


def register(cls: type[Stage]) -> type[Stage]:
    if not cls.name or cls.name in STAGES:
        raise ValueError(f"stage name {cls.name!r} is empty or taken")
    STAGES[cls.name] = cls
    return cls
