"""Typed training configs (OmegaConf structured configs from dataclasses): the stage's schema
defaults <- the YAML file <- dotted CLI overrides (`optim.lr=2e-4`). Unknown keys, wrong types and
choices outside a key's Literal are errors that name the key (`_explain`), so no stage writes its own
`if x not in (...)` check. `BaseConfig` holds the loop's sections; a stage subclasses it.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, List, Literal, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import (ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException,
                              ValidationError)

from psvae_core.dtypes import DType  # the storage-dtype choice key (export.dtype; the stages use it too)

CONFIG_VERSION = 1


class ConfigError(ValueError):
    """A config problem; the message names the key, the problem and the fix."""


# --------------------------------------------------------------------------- generic sections

@dataclass
class RunSection:
    name: str = "run"  # run folder: <output_dir>/<name>
    output_dir: str = "runs"
    seed: int = 0  # every random choice derives from it (data order, noise, init)


@dataclass
class TrainSection:
    max_steps: int = 1000  # optimiser steps
    batch_size: int = 8  # per process and micro-batch; global batch = batch_size x processes x grad_accum
    grad_accum: int = 1  # micro-batches per optimiser step
    num_workers: int = 2  # DataLoader worker processes per process
    grad_checkpointing: bool = False  # recompute block activations in backward (less memory, ~30% slower)
    fsdp: bool = False  # generator stages: shard weights, grads, optimiser and EMA over processes (FSDP2) instead of DDP
    # torch.compile of each repeated block (psvae_core/compile.py); off until the H200 measurement decides
    compile: bool = False
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"  # torch.compile's mode


@dataclass
class OptimSection:
    lr: float = 1e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW
    weight_decay: float = 0.0
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    schedule: Literal["constant", "cosine"] = "constant"  # cosine: after warm-up, down to lr * min_lr_ratio
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1


@dataclass
class EMASection:
    enabled: bool = True
    decay: float = 0.999
    warmup: bool = True  # effective decay min(decay, (1+n)/(10+n)) so early averages are not stuck at init
    every: int = 1  # update every N optimiser steps


@dataclass
class PrecisionSection:
    mixed: Literal["no", "bf16", "fp16"] = "no"  # fp16 uses a dynamic grad scaler
    frozen_fp32: bool = True  # frozen encoder / teacher forward in float32 whatever `mixed` says
    tf32: bool = True  # TF32 matmuls on Ampere+ GPUs


@dataclass
class CheckpointSection:
    every: int = 1000  # steps between checkpoints (0: only at the end and on SIGTERM/SIGINT)
    keep_last: int = 3  # complete checkpoints kept (older ones are deleted)
    resume: Optional[str] = None  # null | latest | path to a checkpoint folder
    allow_mismatch: bool = False  # resume even if the global batch or world size changed


@dataclass
class LogSection:
    every: int = 10  # steps between log lines (TensorBoard + metrics.jsonl)
    tensorboard: bool = True
    progress: bool = True  # tqdm bar on rank 0
    images_every: int = 500  # reconstruction grids (0 disables)
    images_count: int = 4


@dataclass
class ValidationSection:
    every: int = 1000  # steps between validations (0: only at the end)
    max_images: int = 256  # held-out images used per validation
    use_ema: bool = True


@dataclass
class NaNSection:
    max_consecutive: int = 20  # halt after this many non-finite steps in a row


@dataclass
class ExportSection:
    ema: bool = True  # export the EMA weights (else the raw ones)
    dtype: DType = "float32"
    stats_images: int = 2048  # training images used to measure the latent mean/std before export


@dataclass
class BaseConfig:
    """Sections every stage shares; a stage's schema subclasses this (and may name its own keys to
    check in RANGES: {"positive": keys, "non_negative": keys, "fractions": keys}, see check_ranges)."""

    RANGES: ClassVar[dict] = {}
    config_version: int = CONFIG_VERSION
    stage: str = MISSING  # set from the command line (`python -m trainer <stage>`)
    run: RunSection = field(default_factory=RunSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    ema: EMASection = field(default_factory=EMASection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    nan: NaNSection = field(default_factory=NaNSection)
    export: ExportSection = field(default_factory=ExportSection)


# --------------------------------------------------------------------------- loading

def _valid_keys(schema: DictConfig, full_key: str) -> list[str]:
    parent = full_key.rpartition(".")[0]
    node = OmegaConf.select(schema, parent) if parent else schema
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def _explain(err: OmegaConfBaseException, schema: DictConfig, origin: str) -> ConfigError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    if isinstance(err, ConfigKeyError):
        valid = _valid_keys(schema, str(key))
        section = str(key).rpartition(".")[0] or "the top level"
        return ConfigError(f"{origin}: unknown config key '{key}'. Valid keys in {section}: {', '.join(valid)}")
    if isinstance(err, MissingMandatoryValue):
        return ConfigError(f"{origin}: '{key}' must be set (add it to the YAML file or pass {key}=...)")
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        if msg.startswith("Invalid value") and "expected one of" in msg:  # a Literal (choice) key
            hint = ""
            if msg.startswith(("Invalid value 'False'", "Invalid value 'True'")):
                # YAML 1.1 reads a bare no/off/yes/on as a boolean
                hint = f" (YAML reads a bare no/yes as a boolean: quote it, e.g. {key}=\"'no'\" on the command line)"
            value, _, choices = msg.removeprefix("Invalid value ").partition(", expected one of ")
            return ConfigError(f"{origin}: '{key}' is {value}; use one of {choices}{hint}")
        return ConfigError(f"{origin}: wrong type for '{key}': {msg}")
    return ConfigError(f"{origin}: {str(err).splitlines()[0]} (key '{key}')")


def load_config(schema_cls, stage: str, path: Optional[str], overrides: list[str]) -> DictConfig:
    """Schema defaults <- YAML file <- dotted overrides; returns a read-only DictConfig."""
    schema = OmegaConf.structured(schema_cls)
    cfg = schema
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {path} does not exist; pass --config with a YAML file "
                              f"(examples in trainer/configs/)")
        try:
            loaded = OmegaConf.load(file)
        except Exception as err:  # yaml syntax errors
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        if loaded.get("stage") not in (None, stage):
            raise ConfigError(f"{path} is a config for stage '{loaded.stage}' but you ran stage '{stage}'")
        try:
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as err:
            raise _explain(err, schema, str(path)) from None
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"overrides must look like section.key=value; got {bad}")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides) + [f"stage={stage}"]))
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise _explain(err, schema, "command line" if path is None else f"{path} + command line") from None
    if cfg.config_version > CONFIG_VERSION:
        raise ConfigError(f"config_version {cfg.config_version} is newer than this trainer ({CONFIG_VERSION}); update it")
    check_base(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _check(cfg, key: str, ok, rule: str) -> None:
    value = OmegaConf.select(cfg, key)
    if not ok(value):
        raise ConfigError(f"'{key}' must be {rule}, got {value!r}; set it on the command line ({key}=...) "
                          f"or in the YAML file")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def check_ranges(cfg, positive=(), non_negative=(), fractions=()) -> None:
    """Keys that must be > 0, >= 0, or a finite number in [0, 1]; a null value is not checked."""
    for keys, ok, rule in ((positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0"),
                           (fractions, lambda v: _finite(v) and 0 <= v <= 1, "in [0, 1]")):
        for key in keys:
            _check(cfg, key, lambda v: v is None or ok(v), rule)


def check_base(cfg) -> None:
    """Value checks the types cannot express."""
    check_ranges(cfg, positive=("train.max_steps", "train.batch_size", "train.grad_accum", "log.every", "ema.every"),
                 non_negative=("train.num_workers", "checkpoint.every", "checkpoint.keep_last", "log.images_every",
                               "validation.every", "validation.max_images", "optim.warmup_steps",
                               "nan.max_consecutive", "export.stats_images"),
                 fractions=("optim.min_lr_ratio",))
    check_ranges(cfg, **OmegaConf.get_type(cfg).RANGES)
    # NaN passes every comparison and inf trains until the export: refuse both up front.
    _check(cfg, "optim.lr", lambda v: _finite(v) and v > 0, "a finite number > 0 (e.g. 1e-4)")
    _check(cfg, "optim.eps", lambda v: _finite(v) and v > 0, "a finite number > 0 (e.g. 1e-8)")
    for key in ("optim.weight_decay", "optim.grad_clip"):
        _check(cfg, key, lambda v: _finite(v) and v >= 0, "a finite number >= 0")
    _check(cfg, "optim.betas", lambda v: len(v) == 2 and all(_finite(b) and 0 <= b < 1 for b in v),
           "two numbers in [0, 1) (e.g. [0.9, 0.95])")
    _check(cfg, "ema.decay", lambda v: _finite(v) and 0 <= v < 1, "in [0, 1) (e.g. 0.999)")
    # The run folder is <output_dir>/<name>: a name with a path in it would write elsewhere.
    _check(cfg, "run.name", lambda v: v not in ("", ".", "..") and Path(v).name == v and "\\" not in v,
           "one folder name (no '/', '..' or absolute path; the folder goes under run.output_dir)")


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def config_hash(cfg) -> str:
    """sha256 of the resolved config, without the keys that do not change the result."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data.get("checkpoint", {}).pop("resume", None)
    data.get("log", {}).pop("progress", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def as_dict(section) -> dict[str, Any]:
    return OmegaConf.to_container(section, resolve=True)


def preset_config(config_class, preset, overrides, **fields):
    """`config_class.from_dict` of the preset (a config) with `overrides` (model.overrides) merged in,
    and `fields` set; a field the class refuses is a ConfigError naming model.overrides."""
    merged = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(preset.to_dict()),
                                                    OmegaConf.create(as_dict(overrides))))
    try:
        return config_class.from_dict({**merged, **fields})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.overrides: {err}") from None
