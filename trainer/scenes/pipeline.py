"""Retrain the whole scenes miniature on one GPU, over two GPU sessions of parts < 8.5 minutes (docs/SCENES.md).

    python -m trainer.scenes.pipeline PART --work WORK --out OUT [--smoke] [--artifacts DIR]
    trainer/scenes/retrain.sh PART OUT          (the same; WORK defaults to runs/scenes)
    python -m trainer.scenes.pipeline plan      (each part's estimated wall time, from RATES)

Session A trains the data, the toy encoder and the four autoencoders; session B the generators and
the evaluation, starting from session A's files committed in ARTIFACTS (the machine and WORK are
not kept between sessions):

    a1  data + encoder | svae (builds the frozen-encoder feature cache, shared with rae)
    a2  psvae | rae
    a3  pvae | evaluate --only vae (reconstruction, probes)
    b1  data | t2i on psvae
    b2  edit on psvae | t2i on svae
    b3  t2i on rae | edit on rae
    b4  evaluate --only generators (T2I, editing, the shipped models)

`|` separates waves (one after another); the jobs of a wave run together. Every job writes into
WORK and is skipped when its result is already there, so a part that stopped can simply be run
again. When a job ends its products (ARTIFACTS-layout files: encoder/, <vae>.safetensors,
vae_results.json; models/ from b4) are copied into OUT at once, and OUT/results.tar.gz (every log,
metrics file, report and the evaluation) is rewritten: after every job, every minute and on
SIGTERM, so a part cut short still returns what it did. OUT stays a few files, each < 16 MB.

--smoke runs the same jobs with tiny models, steps and data on a CPU: the check before spending GPU time.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "trainer" / "configs"
ARTIFACTS = ROOT / "trainer" / "scenes" / "artifacts"  # session A's files, committed for session B

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
# The generators' steps times this, so session B (five generators + the evaluation) fits one
# 30-minute session by RATES: T2I 3000 steps (checkpoints every 750), edit 1500.
GENERATOR_SCALE = 0.75

# Wall times on one H200 (docs/SCENES.md, Status): measured, except where marked assumed.
RATES = {
    "data": 80, "encoder": 90,                # s, measured side by side
    "feature_cache": 85,                      # s, 20 000 images through the frozen encoder
    "latent_cache": 40,                       # s, 20 000 images through a VAE (edit: 10 000 sources + targets)
    "start": 20,                              # s per training run: start-up, validation, export (assumed)
    "svae": 475, "rae": 475,                  # images/s at batch 64 (rae assumed = svae: the same decoder)
    "psvae": 400, "pvae": 400,                # images/s (assumed: the encoder trains, a frozen teacher beside it)
    "t2i": 2500,                              # images/s at batch 128
    "edit": 1250,                             # images/s (assumed: twice T2I's latent tokens per sample)
    "evaluate_vae": 120, "evaluate": 250,     # s (assumed; the scoring is CPU-side)
}
PART_LIMIT = 510  # s: 8.5 minutes, under the 10-minute limit of one GPU call


@dataclass
class Job:
    name: str
    done: Path  # the job's result; present = skip
    commands: Callable[[], list[list[str]]]  # started together (the data job writes three sets)
    marker: bool = False  # `done` is a marker written here when every command succeeded
    products: list = field(default_factory=list)  # (path in WORK, path in OUT): copied out when the job ends
    seconds: float = 0.0  # estimated wall time on one H200 (RATES)
    gpu: bool = True  # False: CPU only, overlaps the GPU jobs of its wave


@dataclass
class Plan:
    work: Path
    out: Path
    smoke: bool
    jobs: dict = field(default_factory=dict)


def _latent_channels(work: Path, vae: str) -> list[str]:
    """The RAE's latent is the encoder's features: the generator gets the encoder's width."""
    if vae != "rae":
        return []
    hidden = json.loads((work / "encoder" / "config.json").read_text())["hidden_size"]
    return [f"model.overrides.latent_channels={hidden}"]


def _steps(config: str, scale: float) -> tuple[list[str], int, int]:
    """(overrides, steps, batch): train.max_steps (and the T2I checkpoint spacing, so the curve keeps
    its points) times `scale`."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONFIGS / f"{config}.yaml")
    steps = max(1, round(cfg.train.max_steps * scale))
    out = [] if scale == 1.0 else [f"train.max_steps={steps}"]
    if scale != 1.0 and cfg.checkpoint.every:
        out.append(f"checkpoint.every={max(1, round(cfg.checkpoint.every * scale))}")
    return out, steps, cfg.train.batch_size


def build_plan(work: Path, out: Path, smoke: bool, scale: float = 1.0) -> Plan:
    plan = Plan(work, out, smoke)
    data, runs = work / "data", work / "runs"
    sizes = SMOKE_SIZES if smoke else SIZES
    py = [sys.executable]

    def add(job: Job):
        plan.jobs[job.name] = job

    def writer(kind: str, split: str, name: str) -> list[str]:
        return py + ["-m", "trainer.scenes", "write", "--split", split, "--kind", kind, "--count", str(sizes[name]),
                     "--seed", "0", "--workers", str(1 if smoke else DATA_WORKERS), "--out", str(data / name)]

    data_sets = [("t2i", "train", "t2i_train"), ("t2i", "val", "t2i_val"), ("edit", "train", "edit_train")]
    add(Job("data", data / "COMPLETE", lambda: [writer(*d) for d in data_sets], marker=True,
            seconds=RATES["data"], gpu=False))
    add(Job("encoder", work / "encoder" / "encoder_report.json",
            lambda: [py + ["-m", "trainer.scenes.encoder", "--out", str(work / "encoder")]
                     + (SMOKE_ENCODER if smoke else GPU_ENCODER)],
            products=[(work / "encoder", "artifacts/encoder")], seconds=RATES["encoder"]))

    def trainer(stage: str, config: str, name: str, extra: list[str], smoke_extra: list[str],
                job_scale: float) -> list[list[str]]:
        # resume=latest: a part stopped by the 10-minute limit continues where its checkpoints are
        return [py + ["-m", "trainer", stage, "--config", str(CONFIGS / f"{config}.yaml"), f"run.output_dir={runs}",
                      f"run.name={name}", "checkpoint.resume=latest"] + _steps(config, job_scale)[0] + extra
                + (smoke_extra if smoke else [])]

    def train_seconds(config: str, rate: str, job_scale: float, cache: str = "") -> float:
        _, steps, batch = _steps(config, job_scale)
        return RATES["start"] + (RATES[cache] if cache else 0) + steps * batch / RATES[rate]

    images = [f"data.source={data / 't2i_train'}", f"data.val_source={data / 't2i_val'}"]
    # svae and rae read one cache of the frozen encoder's features (the same encoder and images give
    # the same key): svae builds it in a1, rae reuses it in a2.
    frozen = [f"model.encoder_weights={work / 'encoder'}", f"data.cache_dir={work / 'feature_cache'}"]
    svae_export = runs / "scenes_svae" / "export" / "vae.safetensors"
    for name in ("svae", "rae"):
        export = runs / f"scenes_{name}" / "export" / "vae.safetensors"
        add(Job(name, export, lambda name=name: trainer(name, f"scenes_{name}", f"scenes_{name}", images + frozen,
                                                        SMOKE_VAE + SMOKE_VAE_NEW, scale),
                products=[(export, f"artifacts/{name}.safetensors")],
                seconds=train_seconds(f"scenes_{name}", name, scale, "feature_cache" if name == "svae" else "")))
    for name in ("psvae", "pvae"):
        export = runs / f"scenes_{name}" / "export" / "vae.safetensors"
        add(Job(name, export, lambda name=name: trainer("psvae", f"scenes_{name}", f"scenes_{name}",
                                                        images + [f"model.init_from={svae_export}"], SMOKE_VAE, scale),
                products=[(export, f"artifacts/{name}.safetensors")],
                seconds=train_seconds(f"scenes_{name}", name, scale)))
    gen_scale = scale * GENERATOR_SCALE
    for vae in ("rae", "svae", "psvae"):
        vae_file = runs / f"scenes_{vae}" / "export" / "vae.safetensors"
        common = [f"model.vae={vae_file}", f"data.latent_cache={work / 'latent_cache'}"]
        add(Job(f"t2i_{vae}", runs / f"scenes_t2i_{vae}" / "export" / "generator.safetensors",
                lambda common=common, vae=vae: trainer(
                    "t2i", "scenes_t2i", f"scenes_t2i_{vae}",
                    common + _latent_channels(work, vae) + [f"data.source={data / 't2i_train'}"],
                    SMOKE_GEN + SMOKE_GEN_NEW, gen_scale),
                seconds=train_seconds("scenes_t2i", "t2i", gen_scale, "latent_cache")))
        if vae != "svae":
            t2i_export = runs / f"scenes_t2i_{vae}" / "export" / "generator.safetensors"
            add(Job(f"edit_{vae}", runs / f"scenes_edit_{vae}" / "export" / "generator.safetensors",
                    lambda common=common, vae=vae, t2i_export=t2i_export: trainer(
                        "edit", "scenes_edit", f"scenes_edit_{vae}",
                        common + [f"model.init_from={t2i_export}", f"data.source={data / 'edit_train'}"],
                        SMOKE_EDIT, gen_scale),
                    seconds=train_seconds("scenes_edit", "edit", gen_scale, "latent_cache")))
    results = work / "results"  # the evaluation's output; packed into OUT/results.tar.gz

    def evaluate(only: str) -> list[list[str]]:
        return [py + ["-m", "trainer.scenes.evaluate", "--work", str(work), "--out", str(results), "--only", only]
                + (["--smoke"] if smoke else [])]

    add(Job("evaluate_vae", results / "vae_results.json", lambda: evaluate("vae"),
            products=[(results / "vae_results.json", "artifacts/vae_results.json")], seconds=RATES["evaluate_vae"]))
    add(Job("evaluate", results / "results.json", lambda: evaluate("generators"),
            products=[(results / "models", "models")], seconds=RATES["evaluate"]))
    return plan


PARTS = {
    "a1": [["data", "encoder"], ["svae"]],
    "a2": [["psvae"], ["rae"]],
    "a3": [["pvae"], ["evaluate_vae"]],
    "b1": [["data"], ["t2i_psvae"]],
    "b2": [["edit_psvae"], ["t2i_svae"]],
    "b3": [["t2i_rae"], ["edit_rae"]],
    "b4": [["evaluate"]],
}
SESSIONS = {"A": ["a1", "a2", "a3"], "B": ["b1", "b2", "b3", "b4"]}
RESTORED = ("encoder", "svae", "rae", "psvae", "pvae", "evaluate_vae")  # session B starts from their ARTIFACTS files

NEEDS = {"svae": ["data", "encoder"], "rae": ["data", "encoder"], "psvae": ["data", "svae"],
         "pvae": ["data", "svae"], "evaluate_vae": ["encoder", "rae", "svae", "pvae", "psvae"],
         "t2i_svae": ["data", "svae"], "t2i_rae": ["data", "rae", "encoder"], "t2i_psvae": ["data", "psvae"],
         "edit_rae": ["data", "t2i_rae"], "edit_psvae": ["data", "t2i_psvae"],
         "evaluate": ["evaluate_vae", "t2i_rae", "t2i_svae", "t2i_psvae", "edit_rae", "edit_psvae"]}


def part_seconds(plan: Plan, part: str) -> float:
    """Estimated wall time of a part: per wave its GPU jobs one after another (they share one GPU:
    no gain assumed), the CPU-only jobs beside them."""
    total = 0.0
    for wave in PARTS[part]:
        jobs = [plan.jobs[n] for n in wave]
        total += max([sum(j.seconds for j in jobs if j.gpu)] + [j.seconds for j in jobs if not j.gpu])
    return total


def restore(plan: Plan, artifacts: Path) -> list[str]:
    """Session B: put session A's files (ARTIFACTS) where the jobs would have written them."""
    restored = []
    for name in RESTORED:
        job = plan.jobs[name]
        for work_path, out_path in job.products:
            src = artifacts / Path(out_path).relative_to("artifacts")
            if job.done.exists() or not src.exists():
                continue
            work_path.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copyfile)(src, work_path)
            restored.append(name)
    return restored


def copy_products(plan: Plan, job: Job) -> None:
    for work_path, out_path in job.products:
        dest = plan.out / out_path
        dest.parent.mkdir(parents=True, exist_ok=True)
        if work_path.is_dir():
            shutil.copytree(work_path, dest, dirs_exist_ok=True)
        else:
            shutil.copyfile(work_path, dest)


PACKED_SUFFIXES = (".log", ".json", ".jsonl", ".md", ".png", ".txt")
FILE_LIMIT = 16 << 20  # bytes: what one file brought back from the GPU machine may hold


def pack(plan: Plan) -> list[Path]:
    """OUT/results.tar.gz: logs, wall times, each run's metrics and reports, the evaluation; the
    evaluation's sample grids (a few MB of PNG) apart in OUT/samples.tar, so neither nears the
    16 MB a file may hold. Models travel as their own files. Written beside and renamed: never half a file."""
    work, results = plan.work, plan.work / "results"
    samples = sorted((results / "samples").rglob("*.png"))
    files = sorted([*(work / "logs").glob("*.log"), work / "wall_times.json", work / "encoder" / "encoder_report.json",
                    *(work / "runs").glob("*/*.json*"), *(p for p in results.rglob("*") if p not in samples)])
    written = []
    for name, members, mode in (("results.tar.gz", files, "w:gz"), ("samples.tar", samples, "w")):
        members = [p for p in members if p.is_file() and p.suffix in PACKED_SUFFIXES]
        if not members:
            continue
        dest = plan.out / name
        tmp = dest.with_name(dest.name + ".tmp")
        with tarfile.open(tmp, mode) as tar:
            for path in members:
                tar.add(path, arcname=str(path.relative_to(work)))
        tmp.replace(dest)
        if dest.stat().st_size > FILE_LIMIT:
            print(f"warning: {dest} is {dest.stat().st_size / 2**20:.1f} MB, over what one file may bring back",
                  flush=True)
        written.append(dest)
    return written


def _run_wave(plan: Plan, names: list[str], log_dir: Path, times: dict) -> None:
    """Start every pending job of the wave, wait for all; a failed job stops the pipeline."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if plan.smoke:
        env.setdefault("CUDA_VISIBLE_DEVICES", "")  # smoke = CPU, even on a GPU machine
    running = []
    try:
        for name in names:
            job = plan.jobs[name]
            if job.done.exists():
                print(f"[{name}] already done ({job.done})", flush=True)
                continue
            log = open(log_dir / f"{name}.log", "w")
            procs = [subprocess.Popen(c, stdout=log, stderr=subprocess.STDOUT, env=env) for c in job.commands()]
            running.append((name, job, log, time.time(), procs))
            print(f"[{name}] started (log {log_dir / f'{name}.log'}; estimate {job.seconds:.0f} s)", flush=True)
        failed, packed = [], time.time()
        while running:  # poll, so each job's wall time ends when it does
            time.sleep(1)
            for entry in [e for e in running if all(p.poll() is not None for p in e[4])]:
                running.remove(entry)
                name, job, log, start, procs = entry
                log.close()
                times[name] = round(time.time() - start, 1)
                _finish(plan, name, job, [p.returncode for p in procs], times[name], log_dir, failed)
                pack(plan)
            if time.time() - packed > 60:  # what a SIGKILL would leave: at most a minute old
                packed = time.time()
                pack(plan)
        if failed:
            raise SystemExit(f"pipeline stopped: {', '.join(failed)} failed")
    finally:  # stopped (SIGTERM, a failure): end the jobs still running, keep their logs
        for name, job, log, start, procs in running:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait()
            log.close()
            times[name] = f"stopped after {time.time() - start:.1f} s"


def _finish(plan: Plan, name: str, job: Job, codes: list[int], seconds: float, log_dir: Path, failed: list) -> None:
    if any(codes):
        failed.append(name)
        print(f"[{name}] FAILED (exit {codes}) after {seconds} s; last lines of its log:", flush=True)
        print("".join(open(log_dir / f"{name}.log").readlines()[-40:]), flush=True)
        return
    if job.marker:
        job.done.parent.mkdir(parents=True, exist_ok=True)
        job.done.write_text(json.dumps({"seconds": seconds}) + "\n")
    copy_products(plan, job)
    print(f"[{name}] done in {seconds} s (estimate {job.seconds:.0f} s)", flush=True)


def _record(plan: Plan, part: str, times: dict, start: float) -> None:
    record = plan.work / "wall_times.json"
    allt = json.loads(record.read_text()) if record.is_file() else {}
    allt[part] = {**times, "total": round(time.time() - start, 1), "estimate": round(part_seconds(plan, part))}
    record.write_text(json.dumps(allt, indent=2) + "\n")


def run_part(plan: Plan, part: str, artifacts: Path = ARTIFACTS) -> dict:
    log_dir = plan.work / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    plan.out.mkdir(parents=True, exist_ok=True)
    if part in SESSIONS["B"]:
        restored = restore(plan, artifacts)
        if restored:
            print(f"{part}: from {artifacts}: {', '.join(restored)}", flush=True)
    print(f"{part}: estimate on one H200 {part_seconds(plan, part):.0f} s", flush=True)
    start, times = time.time(), {}
    try:
        for wave in PARTS[part]:
            for name in wave:  # dependencies of earlier parts must be done (data is made again if missing)
                if "data" in NEEDS.get(name, []) and not plan.jobs["data"].done.exists():
                    _run_wave(plan, ["data"], log_dir, times)
                missing = [d for d in NEEDS.get(name, []) if not plan.jobs[d].done.exists()]
                if missing:
                    where = f" (session B: session A's OUT/artifacts/ in {artifacts})" if part in SESSIONS["B"] else ""
                    raise SystemExit(f"{part}: {name} needs {', '.join(missing)}: run the earlier parts first{where}")
            t = time.time()
            _run_wave(plan, wave, log_dir, times)
            times[f"wave {'+'.join(wave)}"] = round(time.time() - t, 1)
    finally:
        _record(plan, part, times, start)
        pack(plan)
    print(f"{part} done in {time.time() - start:.0f} s", flush=True)
    return times


def _stop(signum, frame):
    raise SystemExit(f"stopped by signal {signum}")  # unwinds through the finally blocks: jobs ended, OUT packed


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=[*PARTS, *SESSIONS, "all", "plan"])
    p.add_argument("--work", default="runs/scenes", help="state kept between the parts of a session (data, runs, caches)")
    p.add_argument("--out", help="what to bring home: results.tar.gz, artifacts/, models/")
    p.add_argument("--artifacts", default=str(ARTIFACTS), help="session A's files, where session B starts from")
    p.add_argument("--smoke", action="store_true", help="tiny models/steps/data: the whole pipeline on a CPU")
    p.add_argument("--scale", type=float, default=float(os.environ.get("SCALE", 1.0)),
                   help="multiply every training run's steps (e.g. 0.5 if a1 shows a slower GPU than planned)")
    a = p.parse_args(argv)
    plan = build_plan(Path(a.work).resolve(), Path(a.out or "OUT").resolve(), a.smoke, a.scale)
    if a.part == "plan":
        for part in PARTS:
            print(f"{part}  {part_seconds(plan, part):4.0f} s  " + " | ".join(" + ".join(w) for w in PARTS[part]))
        for session, parts in SESSIONS.items():
            print(f"session {session}: {sum(part_seconds(plan, x) for x in parts):.0f} s")
        return
    if not a.out:
        p.error("--out is required")
    signal.signal(signal.SIGTERM, _stop)
    parts = list(PARTS) if a.part == "all" else SESSIONS.get(a.part, [a.part])
    for part in parts:
        run_part(plan, part, Path(a.artifacts))


if __name__ == "__main__":
    main()
