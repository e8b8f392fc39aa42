"""Retrain the whole scenes miniature on one GPU, in parts of under 10 minutes (docs/SCENES.md).

    python -m trainer.scenes.pipeline PART --work WORK --out OUT [--smoke]
    trainer/scenes/retrain.sh PART OUT          (the same; WORK defaults to runs/scenes)

PART is part1 .. part4 (in order; the machine stays warm between them, WORK keeps the state) or
all. Every job writes into WORK and is skipped when its result is already there, so a part that
stopped can simply be run again. Jobs of one wave run at the same time on the one GPU (the models
are small: one alone leaves most of an H200 idle); waves run one after another:

    part1  data + encoder        | svae + rae
    part2  psvae + pvae + t2i on the svae and rae latents
    part3  t2i on the psvae latents + edit on rae | edit on psvae
    part4  evaluation: results.json, results.md, plots, sample grids, the shipped models

The critical path (data, encoder, svae, psvae, t2i and edit on psvae: the shipped models) is in
every part, the comparison runs fill the GPU beside it. OUT gets each part's logs and, from part4,
everything to bring home (small files only: < 16 MB each, ~45 MB in all).

--smoke runs the same jobs with tiny models, steps and data on a CPU in a few minutes: the check
before spending GPU time.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# Data sizes (scenes). The VAEs train on the T2I images (their captions are ignored).
SIZES = {"t2i_train": 20000, "t2i_val": 256, "edit_train": 10000}
SMOKE_SIZES = {"t2i_train": 16, "t2i_val": 4, "edit_train": 16}
DATA_WORKERS = 5  # writer processes per set (three sets at once, beside the encoder's rendering)

# Tiny models and steps for --smoke (the same jobs and code paths, a CPU-sized amount of work).
SMOKE_ENCODER = ["--steps", "4", "--batch-size", "4", "--train-scenes", "16", "--probe-train", "8",
                 "--probe-test", "4", "--hidden", "32", "--layers", "2", "--heads", "2", "--workers", "2"]
SMOKE_VAE = ["train.max_steps=2", "train.batch_size=2", "train.num_workers=0", "precision.mixed='no'",
             "export.stats_images=4", "validation.max_images=2"]
SMOKE_VAE_NEW = ["model.overrides.pixel_decoder.base_channels=8"]  # svae/rae build the decoder; psvae inherits it
SMOKE_GEN = ["train.max_steps=4", "train.batch_size=2", "train.num_workers=0", "precision.mixed='no'",
             "checkpoint.every=2", "validation.max_images=2", "preview.steps=2"]
SMOKE_GEN_NEW = ["model.overrides.lm.hidden_size=32", "model.overrides.lm.num_hidden_layers=1",
                 "model.overrides.lm.intermediate_size=64", "model.overrides.head_width=32",
                 "model.overrides.head_depth=1"]
SMOKE_EDIT = ["train.max_steps=2", "train.batch_size=2", "train.num_workers=0", "precision.mixed='no'",
              "validation.max_images=2", "preview.steps=2"]
GPU_ENCODER = ["--steps", "1500", "--batch-size", "128", "--train-scenes", "12000", "--workers", "8"]


@dataclass
class Job:
    name: str
    done: Path  # the job's result; present = skip
    commands: Callable[[], list[list[str]]]  # started together (the data job writes three sets)
    marker: bool = False  # `done` is a marker written here when every command succeeded


@dataclass
class Plan:
    work: Path
    out: Path
    smoke: bool
    jobs: dict = field(default_factory=dict)

    def run_dir(self, name: str) -> Path:
        return self.work / "runs" / name


def _python() -> list[str]:
    return [sys.executable]


def _latent_channels(work: Path, vae: str) -> list[str]:
    """The RAE's latent is the encoder's features: the generator gets the encoder's width."""
    if vae != "rae":
        return []
    hidden = json.loads((work / "encoder" / "config.json").read_text())["hidden_size"]
    return [f"model.overrides.latent_channels={hidden}"]


def _scaled(config: str, scale: float) -> list[str]:
    """train.max_steps (and the T2I checkpoint spacing, so the curve keeps its points) times `scale`."""
    if scale == 1.0:
        return []
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONFIGS / f"{config}.yaml")
    steps = max(1, round(cfg.train.max_steps * scale))
    out = [f"train.max_steps={steps}"]
    if cfg.checkpoint.every:
        out.append(f"checkpoint.every={max(1, round(cfg.checkpoint.every * scale))}")
    return out


def build_plan(work: Path, out: Path, smoke: bool, scale: float = 1.0) -> Plan:
    plan = Plan(work, out, smoke)
    data, runs = work / "data", work / "runs"
    sizes = SMOKE_SIZES if smoke else SIZES
    py = _python()

    def add(job: Job):
        plan.jobs[job.name] = job

    def writer(kind: str, split: str, name: str) -> list[str]:
        return py + ["-m", "trainer.scenes", "write", "--split", split, "--kind", kind, "--count", str(sizes[name]),
                     "--seed", "0", "--workers", str(1 if smoke else DATA_WORKERS), "--out", str(data / name)]

    data_sets = [("t2i", "train", "t2i_train"), ("t2i", "val", "t2i_val"), ("edit", "train", "edit_train")]
    add(Job("data", data / "COMPLETE", lambda: [writer(*d) for d in data_sets], marker=True))
    add(Job("encoder", work / "encoder" / "encoder_report.json",
            lambda: [py + ["-m", "trainer.scenes.encoder", "--out", str(work / "encoder")]
                     + (SMOKE_ENCODER if smoke else GPU_ENCODER)]))

    def trainer(stage: str, config: str, name: str, extra: list[str], smoke_extra: list[str]) -> list[list[str]]:
        # resume=latest: a part stopped by the 10-minute limit continues where its checkpoints are
        return [py + ["-m", "trainer", stage, "--config", str(CONFIGS / f"{config}.yaml"), f"run.output_dir={runs}",
                      f"run.name={name}", "checkpoint.resume=latest"] + _scaled(config, scale) + extra
                + (smoke_extra if smoke else [])]

    images = [f"data.source={data / 't2i_train'}", f"data.val_source={data / 't2i_val'}"]
    svae_export = runs / "scenes_svae" / "export" / "vae.safetensors"
    for name in ("svae", "rae"):
        add(Job(name, runs / f"scenes_{name}" / "export" / "vae.safetensors",
                lambda name=name: trainer(name, f"scenes_{name}", f"scenes_{name}",
                                          images + [f"model.encoder_weights={work / 'encoder'}"],
                                          SMOKE_VAE + SMOKE_VAE_NEW)))
    for name in ("psvae", "pvae"):
        add(Job(name, runs / f"scenes_{name}" / "export" / "vae.safetensors",
                lambda name=name: trainer("psvae", f"scenes_{name}", f"scenes_{name}",
                                          images + [f"model.init_from={svae_export}"], SMOKE_VAE)))
    for vae in ("rae", "svae", "psvae"):
        vae_file = runs / f"scenes_{vae}" / "export" / "vae.safetensors"
        common = [f"model.vae={vae_file}", f"data.latent_cache={work / 'latent_cache'}"]
        add(Job(f"t2i_{vae}", runs / f"scenes_t2i_{vae}" / "export" / "generator.safetensors",
                lambda common=common, vae=vae: trainer(
                    "t2i", "scenes_t2i", f"scenes_t2i_{vae}",
                    common + _latent_channels(work, vae) + [f"data.source={data / 't2i_train'}"],
                    SMOKE_GEN + SMOKE_GEN_NEW)))
        if vae != "svae":
            t2i_export = runs / f"scenes_t2i_{vae}" / "export" / "generator.safetensors"
            add(Job(f"edit_{vae}", runs / f"scenes_edit_{vae}" / "export" / "generator.safetensors",
                    lambda common=common, vae=vae, t2i_export=t2i_export: trainer(
                        "edit", "scenes_edit", f"scenes_edit_{vae}",
                        common + [f"model.init_from={t2i_export}", f"data.source={data / 'edit_train'}"],
                        SMOKE_EDIT)))
    add(Job("evaluate", out / "results.json",
            lambda: [py + ["-m", "trainer.scenes.evaluate", "--work", str(work), "--out", str(out)]
                     + (["--smoke"] if smoke else [])]))
    return plan


PARTS = {
    "part1": [["data", "encoder"], ["svae", "rae"]],
    "part2": [["psvae", "pvae", "t2i_svae", "t2i_rae"]],
    "part3": [["t2i_psvae", "edit_rae"], ["edit_psvae"]],
    "part4": [["evaluate"]],
}


def _run_wave(plan: Plan, names: list[str], log_dir: Path) -> dict:
    """Start every pending job of the wave, wait for all; a failed job stops the pipeline."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if plan.smoke:
        env.setdefault("CUDA_VISIBLE_DEVICES", "")  # smoke = CPU, even on a GPU machine
    running, times = [], {}
    for name in names:
        job = plan.jobs[name]
        if job.done.exists():
            print(f"[{name}] already done ({job.done})", flush=True)
            continue
        log = open(log_dir / f"{name}.log", "w")
        procs = [subprocess.Popen(c, stdout=log, stderr=subprocess.STDOUT, env=env) for c in job.commands()]
        running.append((name, job, log, time.time(), procs))
        print(f"[{name}] started (log {log_dir / f'{name}.log'})", flush=True)
    failed = []
    while running:  # poll, so each job's wall time ends when it does
        time.sleep(1)
        for entry in [e for e in running if all(p.poll() is not None for p in e[4])]:
            running.remove(entry)
            name, job, log, start, procs = entry
            log.close()
            times[name] = round(time.time() - start, 1)
            _finish(name, job, [p.returncode for p in procs], times[name], log_dir, failed)
    if failed:
        raise SystemExit(f"pipeline stopped: {', '.join(failed)} failed")
    return times


def _finish(name: str, job: Job, codes: list[int], seconds: float, log_dir: Path, failed: list) -> None:
    if any(codes):
        failed.append(name)
        print(f"[{name}] FAILED (exit {codes}) after {seconds} s; last lines of its log:", flush=True)
        print("".join(open(log_dir / f"{name}.log").readlines()[-40:]), flush=True)
    else:
        if job.marker:
            job.done.parent.mkdir(parents=True, exist_ok=True)
            job.done.write_text(json.dumps({"seconds": seconds}) + "\n")
        print(f"[{name}] done in {seconds} s", flush=True)


def run_part(plan: Plan, part: str) -> dict:
    log_dir = plan.work / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    plan.out.mkdir(parents=True, exist_ok=True)
    start, times = time.time(), {}
    try:
        for wave in PARTS[part]:
            for name in wave:  # dependencies of earlier parts must be done
                missing = [d for d in _needs(name) if not plan.jobs[d].done.exists()]
                if missing:
                    raise SystemExit(f"{part}: {name} needs {', '.join(missing)}: run the earlier parts first")
            t = time.time()
            times.update(_run_wave(plan, wave, log_dir))
            times[f"wave {'+'.join(wave)}"] = round(time.time() - t, 1)
    finally:
        (plan.out / "logs").mkdir(exist_ok=True)
        for log in log_dir.glob("*.log"):
            shutil.copyfile(log, plan.out / "logs" / log.name)
        record = plan.work / "wall_times.json"
        allt = json.loads(record.read_text()) if record.is_file() else {}
        allt[part] = {**times, "total": round(time.time() - start, 1)}
        record.write_text(json.dumps(allt, indent=2) + "\n")
        shutil.copyfile(record, plan.out / "wall_times.json")
    print(f"{part} done in {time.time() - start:.0f} s", flush=True)
    return times


NEEDS = {"svae": ["data", "encoder"], "rae": ["data", "encoder"], "psvae": ["svae"], "pvae": ["svae"],
         "t2i_svae": ["svae"], "t2i_rae": ["rae"], "t2i_psvae": ["psvae"], "edit_rae": ["t2i_rae"],
         "edit_psvae": ["t2i_psvae"],
         "evaluate": ["rae", "svae", "pvae", "psvae", "t2i_rae", "t2i_svae", "t2i_psvae", "edit_rae", "edit_psvae"]}


def _needs(name: str) -> list[str]:
    return NEEDS.get(name, [])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=[*PARTS, "all"])
    p.add_argument("--work", default="runs/scenes", help="state kept between parts (data, runs, caches)")
    p.add_argument("--out", required=True, help="what to bring home: logs, results, plots, shipped models")
    p.add_argument("--smoke", action="store_true", help="tiny models/steps/data: the whole pipeline on a CPU")
    p.add_argument("--scale", type=float, default=float(os.environ.get("SCALE", 1.0)),
                   help="multiply every training run's steps (e.g. 0.5 if part1 shows a slower GPU than planned)")
    a = p.parse_args(argv)
    plan = build_plan(Path(a.work).resolve(), Path(a.out).resolve(), a.smoke, a.scale)
    for part in (list(PARTS) if a.part == "all" else [a.part]):
        run_part(plan, part)


if __name__ == "__main__":
    main()
