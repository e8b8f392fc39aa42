"""Run logging on rank 0: metrics.jsonl (always), TensorBoard (optional), a tqdm bar (optional)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


def _drop_rows_after(path: Path, step: int) -> None:
    """A resumed run re-runs the steps after its checkpoint: drop their rows (and a line cut short
    by a kill), so that the log has one row per step and kind and a plot of it is right."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


class Tracker:
    """Does nothing on ranks other than 0, so callers never branch on the rank."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, progress: bool,
                 total_steps: int, start_step: int):
        self.enabled = enabled
        self.writer = self.bar = self.jsonl = None
        self._open = contextlib.ExitStack()  # closes what was opened, the last first
        if not enabled:
            return
        path = run_dir / "metrics.jsonl"
        _drop_rows_after(path, start_step)
        self.jsonl = self._open.enter_context(open(path, "a", encoding="utf-8"))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = self._open.enter_context(SummaryWriter(str(run_dir / "tensorboard")))
        if progress:
            from tqdm.auto import tqdm
            # A bar redraws in place on a terminal; in a log file it prints a line per update.
            self.bar = self._open.enter_context(tqdm(total=total_steps, initial=start_step, desc="train",
                                                     dynamic_ncols=True, file=sys.stderr,
                                                     mininterval=1.0 if sys.stderr.isatty() else 30.0))

    def log(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"kind": kind, "step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in values.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("kind", "step", "time") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def image(self, tag: str, step: int, grid: torch.Tensor) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, grid.clamp(0, 1), step)

    def progress(self, step: int, postfix: dict) -> None:
        if self.enabled and self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                 refresh=False)
            self.bar.refresh()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        self._open.close()
        self.enabled = False

