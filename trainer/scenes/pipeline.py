"""Retrain the whole scenes miniature on one GPU (docs/SCENES.md): one command, every job in
dependency order, several at once on the one GPU.

    python -m trainer.scenes.pipeline all --work WORK --out OUT [--deadline S] [--smoke] [--scale X]
    python -m trainer.scenes.pipeline JOB [JOB ...] --work WORK --out OUT   (some jobs; the rest done before)
    trainer/scenes/retrain.sh OUT                (= all; WORK defaults to runs/scenes)
    python -m trainer.scenes.pipeline plan       (each job's estimated wall time, from RATES)

The jobs (NEEDS says what each waits for):

    data, encoder                 the scenes sets (CPU) and the toy encoder, side by side
    svae, then rae                frozen-encoder stages; rae reuses svae's feature cache
    psvae, pvae                   stage 2 from the svae export (with and without the semantic loss)
    t2i_{rae,svae,psvae}          the same generator on each latent; edit_{rae,psvae} from those
    evaluate_{vae,t2i,edit}       the tables' numbers, each as soon as its models exist
    report                        results.md/json, plots, the shipped models (OUT/models)

Every job writes into WORK and is skipped when its result is already there, so a run that stopped
can simply be started again (training resumes from its checkpoints). When a job ends its products
(encoder/, <vae>.safetensors, the evaluation) are copied into OUT at once, and OUT/results.tar.gz
(every log, metrics file, report) is rewritten: after every job, every minute and on SIGTERM.
`--deadline S`: WRAP_UP seconds before S the training still running is stopped and the evaluation
runs on what exists, so a time-limited machine still returns a complete, honest report.

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
# Training steps per config (times --scale), sized so that the whole run fits one 30-minute GPU
# lease by RATES: stage 2 (psvae, pvae) fine-tunes the svae export, so it needs fewer steps than
# the autoencoders trained from scratch; T2I saves a checkpoint every T2I_CHECKPOINT_EVERY steps
# (the convergence curve's points); edit continues a T2I export.
STEPS = {"scenes_svae": 1000, "scenes_rae": 1000, "scenes_psvae": 800, "scenes_pvae": 800,
         "scenes_t2i": 4000, "scenes_edit": 1500}
T2I_CHECKPOINT_EVERY = 1000
VAE_CHECKPOINT_EVERY = 250  # so that a run stopped and started again loses at most this many steps

# Wall times on one H200 (docs/SCENES.md, Status): measured, except where marked assumed.
RATES = {
    "data": 80, "encoder": 90,                # s, measured side by side
    "feature_cache": 85,                      # s, 20 000 images through the frozen encoder
    "latent_cache": 40,                       # s, 20 000 images through a VAE (edit: 10 000 sources + targets)
    "start": 20,                              # s per training run: start-up, validation, export (assumed)
    "svae": 475, "rae": 475,                  # images/s at batch 64 (rae assumed = svae: the same decoder)
    "psvae": 400, "pvae": 400,                # images/s (assumed: the encoder trains, a frozen teacher beside it)
    "t2i": 4000,                              # images/s at batch 256 (assumed; 2000-2500 at batch 128 measured)
    "edit": 2000,                             # images/s at batch 256 (assumed: twice T2I's latent tokens per sample)
    "evaluate_vae": 90, "evaluate_t2i": 90,   # s (assumed; the scoring is CPU-side, 12 processes)
    "evaluate_edit": 40, "report": 10,
}


@dataclass
class Job:
    name: str
    done: Path  # the job's result; present = skip
    commands: Callable[[], list[list[str]]]  # started together (the data job writes three sets)
    marker: bool = False  # `done` is a marker written here when every command succeeded
    products: list = field(default_factory=list)  # (path in WORK, path in OUT): copied out when the job ends
    seconds: float = 0.0  # estimated wall time on one H200 (RATES)
    gpu: bool = True  # False: CPU only, runs beside the GPU jobs
    evaluation: bool = False  # starts once its NEEDS have ended, done or not, and evaluates what exists


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
    """(overrides, steps, batch): STEPS[config] times `scale` (and the T2I checkpoint spacing with
    it, so the curve keeps its points)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONFIGS / f"{config}.yaml")
    steps = max(1, round(STEPS[config] * scale))
    out = [f"train.max_steps={steps}"]
    if cfg.checkpoint.every:
        out.append(f"checkpoint.every={max(1, round(T2I_CHECKPOINT_EVERY * scale))}")
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

    def trainer(stage: str, config: str, name: str, extra: list[str], smoke_extra: list[str]) -> list[list[str]]:
        # resume=latest: a run stopped and started again continues where its checkpoints are
        return [py + ["-m", "trainer", stage, "--config", str(CONFIGS / f"{config}.yaml"), f"run.output_dir={runs}",
                      f"run.name={name}", "checkpoint.resume=latest"] + _steps(config, scale)[0] + extra
                + (smoke_extra if smoke else [])]

    def train_seconds(config: str, rate: str, cache: str = "") -> float:
        _, steps, batch = _steps(config, scale)
        return RATES["start"] + (RATES[cache] if cache else 0) + steps * batch / RATES[rate]

    images = [f"data.source={data / 't2i_train'}", f"data.val_source={data / 't2i_val'}"]
    # svae and rae read one cache of the frozen encoder's features (the same encoder and images give
    # the same key): svae builds it, rae (after svae) reuses it.
    frozen = [f"model.encoder_weights={work / 'encoder'}", f"data.cache_dir={work / 'feature_cache'}"]
    saves = [] if smoke else [f"checkpoint.every={VAE_CHECKPOINT_EVERY}"]
    svae_export = runs / "scenes_svae" / "export" / "vae.safetensors"
    for name in ("svae", "rae"):
        export = runs / f"scenes_{name}" / "export" / "vae.safetensors"
        add(Job(name, export, lambda name=name: trainer(name, f"scenes_{name}", f"scenes_{name}", images + frozen + saves,
                                                        SMOKE_VAE + SMOKE_VAE_NEW),
                products=[(export, f"artifacts/{name}.safetensors")],
                seconds=train_seconds(f"scenes_{name}", name, "feature_cache" if name == "svae" else "")))
    for name in ("psvae", "pvae"):
        export = runs / f"scenes_{name}" / "export" / "vae.safetensors"
        add(Job(name, export, lambda name=name: trainer("psvae", f"scenes_{name}", f"scenes_{name}",
                                                        images + saves + [f"model.init_from={svae_export}"],
                                                        SMOKE_VAE),
                products=[(export, f"artifacts/{name}.safetensors")],
                seconds=train_seconds(f"scenes_{name}", name)))
    for vae in ("rae", "svae", "psvae"):
        vae_file = runs / f"scenes_{vae}" / "export" / "vae.safetensors"
        common = [f"model.vae={vae_file}", f"data.latent_cache={work / 'latent_cache'}"]
        add(Job(f"t2i_{vae}", runs / f"scenes_t2i_{vae}" / "export" / "generator.safetensors",
                lambda common=common, vae=vae: trainer(
                    "t2i", "scenes_t2i", f"scenes_t2i_{vae}",
                    common + _latent_channels(work, vae) + [f"data.source={data / 't2i_train'}"],
                    SMOKE_GEN + SMOKE_GEN_NEW),
                seconds=train_seconds("scenes_t2i", "t2i", "latent_cache")))
        if vae != "svae":
            t2i_export = runs / f"scenes_t2i_{vae}" / "export" / "generator.safetensors"
            add(Job(f"edit_{vae}", runs / f"scenes_edit_{vae}" / "export" / "generator.safetensors",
                    lambda common=common, vae=vae, t2i_export=t2i_export: trainer(
                        "edit", "scenes_edit", f"scenes_edit_{vae}",
                        common + [f"model.init_from={t2i_export}", f"data.source={data / 'edit_train'}"],
                        SMOKE_EDIT),
                    seconds=train_seconds("scenes_edit", "edit", "latent_cache")))
    results = work / "results"  # the evaluation's output; packed into OUT/results.tar.gz

    def evaluate(only: str) -> list[list[str]]:
        return [py + ["-m", "trainer.scenes.evaluate", "--work", str(work), "--out", str(results), "--only", only]
                + (["--smoke"] if smoke else [])]

    for part in ("vae", "t2i", "edit"):
        add(Job(f"evaluate_{part}", results / f"{part}_results.json", lambda part=part: evaluate(part),
                products=[(results / f"{part}_results.json", f"artifacts/{part}_results.json")],
                seconds=RATES[f"evaluate_{part}"], evaluation=True))
    add(Job("report", results / "results.json", lambda: evaluate("report"),
            products=[(results / "models", "models")], seconds=RATES["report"], evaluation=True))
    return plan


# Dependencies: a training job starts when every job it needs is done (and is skipped if one of them
# failed); an evaluation job (`Job.evaluation`) starts once each job it needs has ended either way,
# and evaluates what exists.
NEEDS = {"svae": ["data", "encoder"], "rae": ["svae"],  # rae after svae: it reuses svae's feature cache
         "psvae": ["svae"], "pvae": ["svae"],
         "t2i_svae": ["svae"], "t2i_rae": ["rae"], "t2i_psvae": ["psvae"],
         "edit_rae": ["t2i_rae"], "edit_psvae": ["t2i_psvae"],
         "evaluate_vae": ["encoder", "rae", "svae", "pvae", "psvae"],
         "evaluate_t2i": ["t2i_rae", "t2i_svae", "t2i_psvae"], "evaluate_edit": ["edit_rae", "edit_psvae"],
         "report": ["evaluate_vae", "evaluate_t2i", "evaluate_edit"]}
# Start order when several jobs are ready: the shipped default's chain first (svae -> psvae ->
# t2i_psvae -> edit_psvae), so a run cut short by its deadline still has it; the comparisons after.
ORDER = ["data", "encoder", "svae", "psvae", "t2i_psvae", "edit_psvae", "t2i_svae", "pvae", "rae", "t2i_rae",
         "edit_rae", "evaluate_vae", "evaluate_t2i", "evaluate_edit", "report"]
GPU_SLOTS = 3  # GPU jobs at once: small models leave the H200 idle between kernels, so they share it well
WRAP_UP = 150  # s before --deadline: stop the training still running, evaluate what exists, report


def critical_path(plan: Plan, name: str = "report") -> float:
    """Estimated wall time until `name` ends if every job ran alone on the GPU at its RATES."""
    return plan.jobs[name].seconds + max([critical_path(plan, d) for d in NEEDS.get(name, [])] + [0.0])


def gpu_seconds(plan: Plan) -> float:
    """Every GPU job's estimate added up: the wall time if sharing the GPU gained nothing."""
    return sum(j.seconds for j in plan.jobs.values() if j.gpu)


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


def run(plan: Plan, names: list[str], deadline: float | None = None, slots: int = GPU_SLOTS) -> dict:
    """Run `names` (and nothing else) by NEEDS and ORDER, up to `slots` GPU jobs at once; CPU-only
    jobs beside them. `deadline` (s from now): WRAP_UP before it, training still running is stopped
    and what exists is evaluated. Returns each job's state: done, failed, skipped or stopped."""
    log_dir = plan.work / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    plan.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if plan.smoke:
        env.setdefault("CUDA_VISIBLE_DEVICES", "")  # smoke = CPU, even on a GPU machine
    start, times, state, running = time.time(), {}, {}, {}
    todo = [n for n in ORDER if n in names]
    for name in todo:
        if plan.jobs[name].done.exists():
            state[name] = "done"
            print(f"[{name}] already done ({plan.jobs[name].done})", flush=True)
    todo = [n for n in todo if n not in state]

    def ended(dep: str) -> bool:  # will not change any more
        return dep in state or (dep not in todo and dep not in running)

    def done(dep: str) -> bool:
        return state.get(dep) == "done" or (dep not in todo and dep not in running and plan.jobs[dep].done.exists())

    def stop(name: str, why: str) -> None:
        log, t0, procs = running.pop(name)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
        log.close()
        state[name], times[name] = "stopped", f"{why} after {time.time() - t0:.1f} s"
        print(f"[{name}] {times[name]}", flush=True)

    wrapped, packed = False, time.time()
    try:
        while todo or running:
            if deadline is not None and not wrapped and time.time() - start > deadline - WRAP_UP:
                wrapped = True  # from now on only evaluation: what is done is what the results show
                for name in [n for n in running if not plan.jobs[n].evaluation]:
                    stop(name, "stopped at the deadline")
                for name in [n for n in todo if not plan.jobs[n].evaluation]:
                    todo.remove(name)
                    state[name] = "skipped"
            for name in list(todo):
                job, needs = plan.jobs[name], NEEDS.get(name, [])
                if not job.evaluation and any(ended(d) and not done(d) for d in needs):
                    todo.remove(name)
                    state[name] = "skipped"
                    print(f"[{name}] skipped: needs {', '.join(d for d in needs if not done(d))}", flush=True)
                    continue
                ready = all(ended(d) for d in needs) if job.evaluation else all(done(d) for d in needs)
                if not ready or (job.gpu and sum(plan.jobs[n].gpu for n in running) >= slots):
                    continue
                todo.remove(name)
                log = open(log_dir / f"{name}.log", "w")
                procs = [subprocess.Popen(c, stdout=log, stderr=subprocess.STDOUT, env=env) for c in job.commands()]
                running[name] = (log, time.time(), procs)
                print(f"[{name}] started at {time.time() - start:.0f} s (estimate {job.seconds:.0f} s)", flush=True)
            for name in [n for n, (_, _, procs) in running.items() if all(p.poll() is not None for p in procs)]:
                log, t0, procs = running.pop(name)
                log.close()
                times[name] = round(time.time() - t0, 1)
                state[name] = _finish(plan, name, [p.returncode for p in procs], times[name], log_dir)
                pack(plan)
            if time.time() - packed > 60:  # what a SIGKILL would leave: at most a minute old
                packed = time.time()
                _record(plan, times, state, start)
                pack(plan)
            time.sleep(0.5)
    finally:  # stopped (SIGTERM): end the jobs still running, keep their logs
        for name in list(running):
            stop(name, "stopped")
        _record(plan, times, state, start)
        pack(plan)
    print(f"pipeline ended in {time.time() - start:.0f} s: "
          + ", ".join(f"{n} {state.get(n, 'not run')}" for n in ORDER if n in names), flush=True)
    return state


def _finish(plan: Plan, name: str, codes: list[int], seconds: float, log_dir: Path) -> str:
    job = plan.jobs[name]
    if any(codes):
        print(f"[{name}] FAILED (exit {codes}) after {seconds} s; last lines of its log:", flush=True)
        print("".join(open(log_dir / f"{name}.log").readlines()[-40:]), flush=True)
        return "failed"
    if job.marker:
        job.done.parent.mkdir(parents=True, exist_ok=True)
        job.done.write_text(json.dumps({"seconds": seconds}) + "\n")
    copy_products(plan, job)
    print(f"[{name}] done in {seconds} s (estimate {job.seconds:.0f} s)", flush=True)
    return "done"


def _record(plan: Plan, times: dict, state: dict, start: float) -> None:
    record = plan.work / "wall_times.json"
    old = json.loads(record.read_text()) if record.is_file() else {}
    runs = old.get("runs", [])
    entry = {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start)), "seconds": times, "state": state,
             "total": round(time.time() - start, 1)}
    runs = [r for r in runs if r.get("started") != entry["started"]] + [entry]
    record.write_text(json.dumps({"runs": runs}, indent=2) + "\n")


def _stop(signum, frame):
    raise SystemExit(f"stopped by signal {signum}")  # unwinds through the finally block: jobs ended, OUT packed


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jobs", nargs="+", help=f"all, plan, or job names: {', '.join(ORDER)}")
    p.add_argument("--work", default="runs/scenes", help="data, runs and caches (a run that stopped continues here)")
    p.add_argument("--out", help="what to bring home: results.tar.gz, samples.tar, artifacts/, models/")
    p.add_argument("--smoke", action="store_true", help="tiny models/steps/data: the whole pipeline on a CPU")
    p.add_argument("--scale", type=float, default=float(os.environ.get("SCALE", 1.0)),
                   help="multiply every training run's steps")
    p.add_argument("--deadline", type=float, default=None,
                   help=f"seconds: {WRAP_UP} s before it, stop training and evaluate what exists")
    a = p.parse_args(argv)
    plan = build_plan(Path(a.work).resolve(), Path(a.out or "OUT").resolve(), a.smoke, a.scale)
    if a.jobs == ["plan"]:
        for name in ORDER:
            job = plan.jobs[name]
            print(f"{name:14s} {job.seconds:4.0f} s  {'GPU' if job.gpu else 'CPU'}  needs {', '.join(NEEDS.get(name, [])) or '-'}")
        print(f"critical path {critical_path(plan):.0f} s; GPU jobs added up {gpu_seconds(plan):.0f} s")
        return
    if not a.out:
        p.error("--out is required")
    unknown = [n for n in a.jobs if n != "all" and n not in plan.jobs]
    if unknown:
        p.error(f"unknown job(s) {', '.join(unknown)}: pick from all, plan, {', '.join(ORDER)}")
    signal.signal(signal.SIGTERM, _stop)
    state = run(plan, ORDER if a.jobs == ["all"] else a.jobs, a.deadline)
    if any(v == "failed" for v in state.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
