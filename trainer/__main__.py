"""`python -m trainer <stage> --config FILE [section.key=value ...]` (docs/TRAINER.md).

The same command runs under `accelerate launch -m trainer ...` and `torchrun -m trainer ...`.
Exit codes: 0 done, 2 config/data/resume/output-folder error, 3 halted by the NaN guard, 128+N stopped by
signal N after a clean checkpoint.
"""
from __future__ import annotations

import argparse
import gc
import logging
import sys

import torch.distributed as dist

from . import vae_stages  # noqa: F401  (registers svae, psvae, rae)
from . import generator_stages  # noqa: F401  (registers t2i, edit)
from psvae_core.checkpoint import CheckpointError

from .checkpointing import OutputError, ResumeError
from .config import ConfigError, load_config, to_yaml
from .data import DataError
from .loop import TrainingHalted, train
from .stage import STAGES


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=sorted(STAGES), help="what to train")
    parser.add_argument("--config", help="YAML config (examples: trainer/configs/)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=2e-4 train.max_steps=100")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    stage = STAGES[args.stage]
    try:
        cfg = load_config(stage.config_class, args.stage, args.config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        summary = train(stage, cfg)
    except (ConfigError, DataError, ResumeError, OutputError, CheckpointError, FileNotFoundError,
            TrainingHalted) as err:
        print(f"error: {err}", file=sys.stderr)
        return 3 if isinstance(err, TrainingHalted) else 2
    finally:
        _leave_process_group()
    return int(summary.get("exit_code", 0))


def _leave_process_group() -> None:
    # Gloo threads alive at interpreter exit abort the process (docs/TRAINER.md "Several processes"):
    # leave the group and collect the loop's reference cycles (DDP holds the group) while Python
    # still runs, so the group's destructor joins its threads with the GIL released.
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()


if __name__ == "__main__":
    sys.exit(main())
