"""Benchmark outputs for the external scorers (docs/PAPER.md §5.4): GenEval, DPG-Bench, GEdit-Bench.

    python -m trainer.benchmarks geneval --vae VAE --generator GEN --prompts evaluation_metadata.jsonl --out OUT
    python -m trainer.benchmarks dpg     --vae VAE --generator GEN --prompts dpg_bench/prompts --out OUT
    python -m trainer.benchmarks gedit   --vae VAE --generator GEN --prompts gedit.jsonl --out OUT

Writes exactly the layout each scorer reads, then prints the scorer's command as a template (the
scorers need their own environments). Every image has its own seed, derived from (--seed, prompt
index or id, sample index), so a run is reproducible whatever the batch size, sharding or
interruptions. Runs resume: outputs already on disk are kept after checking the settings each PNG
carries in a "psvae" text chunk. Images are `psvae_core.generation.generate`'s, as in ComfyUI.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from psvae_core import flow, generation
from psvae_core.autoencoder import PSVAE
from psvae_core.checkpoint import read_header
from psvae_core.dtypes import DTYPES
from psvae_core.fusion import FusionDiffuser

from .data import DataError, jsonl_lines, launcher_rank, load_image, to_pil
from .data.sources import resolve
from .rng import derive_seed

logger = logging.getLogger(__name__)

BENCHMARKS = ("geneval", "dpg", "gedit")
PNG_KEY = "psvae"


class BenchmarkError(DataError):
    """Bad prompts or an output folder that does not match this run."""


def model_id(path) -> str:
    """A cheap identity of a model file: sha256 of its safetensors header (names, shapes, offsets,
    config, provenance), so any re-export gives a new id without hashing gigabytes."""
    return hashlib.sha256(json.dumps(read_header(path), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SamplingSettings:
    steps: int = flow.DEFAULT_STEPS
    cfg: float = flow.DEFAULT_GUIDANCE
    shift: float = flow.DEFAULT_SHIFT
    image_cfg: Optional[float] = 1.5  # edits only; None = plain text CFG with the source always kept
    batch_size: int = 8
    seed: int = 0


class BenchmarkSampler:
    """A VAE + generator pair that turns (prompt, seed) or (source, instruction, seed) into images;
    each row's noise comes from its own seed, so an image does not depend on its batch."""

    def __init__(self, vae: PSVAE, generator: FusionDiffuser, settings: SamplingSettings = SamplingSettings(),
                 vae_id: str = "", generator_id: str = ""):
        if generator.tokenizer is None:
            raise BenchmarkError("the generator file carries no tokenizer; export it with one (from_pretrained_lm)")
        if generator.config.latent_channels != vae.latent_channels:
            raise BenchmarkError(f"the generator makes {generator.config.latent_channels}-channel latents but the VAE "
                                 f"decodes {vae.latent_channels}; pick the VAE the generator was trained on")
        self.vae, self.generator, self.settings = vae.eval(), generator.eval(), settings
        self.ids = {"vae": vae_id, "generator": generator_id}
        self.batches = 0  # sampler calls (tests, progress)

    @classmethod
    def from_files(cls, vae_file, generator_file, settings: SamplingSettings = SamplingSettings(),
                   device="cpu", dtype: torch.dtype = torch.float32) -> "BenchmarkSampler":
        vae = PSVAE.from_file(vae_file, device=device)
        generator = FusionDiffuser.from_file(generator_file, device=device).to(dtype=dtype)
        return cls(vae, generator, settings, model_id(vae_file), model_id(generator_file))

    def generate(self, texts: Sequence[str], seeds: Sequence[int], sources: Optional[torch.Tensor] = None):
        """[B,3,H,W] in 0..1: one image per (prompt, seed), or the edit of each source [B,3,S,S] (0..1)
        with dual guidance (text cfg, image_cfg) as in training."""
        s = self.settings
        self.batches += 1
        source = None if sources is None else generation.encode_source(self.vae, sources)
        return generation.generate(self.generator, list(texts), source, seed=list(seeds), steps=s.steps, shift=s.shift,
                                   guidance=s.cfg, image_guidance=s.image_cfg if source is not None else None,
                                   vae=self.vae)

    def run_settings(self, benchmark: str) -> dict:
        """What every output PNG of a run records, and what a resumed run must match."""
        s = self.settings
        out = {"benchmark": benchmark, **self.ids, "steps": s.steps, "cfg": s.cfg, "shift": s.shift, "seed": s.seed}
        if benchmark == "gedit":
            out["image_cfg"] = s.image_cfg
        return out


@dataclass
class Job:
    """One image to make: its file (a DPG-Bench grid's for its tiles), what the PNG records beside the
    run settings, and its inputs."""

    path: Path
    seed: int
    text: str
    info: dict
    source: Optional[Path] = None


def save_png(image: Image.Image, path: Path, info: dict) -> None:
    """Atomic PNG write (hidden temporary name, then rename) with `info` in a text chunk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    chunk = PngInfo()
    chunk.add_text(PNG_KEY, json.dumps(info, sort_keys=True))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG", pnginfo=chunk)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _Run:
    """One benchmark run: the first `limit` of its prompt `rows` (none is an error), this shard's share,
    the settings every PNG records (+ `extra`), the resume check and the generation loop."""

    def __init__(self, sampler: BenchmarkSampler, bench: str, rows: list, prompts, limit: Optional[int] = None,
                 shard: tuple[int, int] = (0, 1), overwrite: bool = False, log: Callable[[str], None] = print,
                 **extra):
        if not rows:
            raise BenchmarkError(f"{prompts} holds no prompt")
        rank, world = shard
        if not 0 <= rank < world:
            raise ValueError(f"shard {rank}/{world}: rank must be in 0..{world - 1}")
        self.sampler, self.rows, self.shard, self.overwrite, self.log = sampler, rows[:limit], shard, overwrite, log
        self.settings = {**sampler.run_settings(bench), **extra}
        self.kept = 0

    def mine(self, index: int) -> bool:
        return index % self.shard[1] == self.shard[0]

    def seed(self, *key) -> int:
        return derive_seed(self.sampler.settings.seed, *key)

    def done(self, path: Path) -> bool:
        """Whether `path` exists and was made with this run's settings (other settings are an error)."""
        if self.overwrite or not path.is_file():
            return False
        try:
            with Image.open(path) as image:
                info = json.loads(image.info.get(PNG_KEY, "null"))
        except (OSError, ValueError):
            info = None
        if info is None:  # unreadable (a crash outside our atomic write?): make it again
            logger.warning("%s is unreadable; regenerating it", path)
            return False
        made = info.get("run", {})
        if made != self.settings:
            changes = ", ".join(f"{k}: {made.get(k)} -> {v}" for k, v in self.settings.items() if made.get(k) != v)
            raise BenchmarkError(f"{path} was made with other settings ({changes}); "
                                 "use another --out, or --overwrite to replace the outputs")
        self.kept += 1
        return True

    def save(self, job: Job, image: Image.Image) -> None:
        save_png(image, job.path, {"run": self.settings, **job.info})

    def generate(self, jobs: list[Job], scorer: Callable[[], str],
                 write: Optional[Callable[[Job, Image.Image], None]] = None) -> dict:
        """Generates `jobs` in batches, hands each image to `write` (default: `save`), then logs the scorer's
        command line (`scorer()`) and returns the counts."""
        sampler, write = self.sampler, write or self.save
        bs, start = max(1, sampler.settings.batch_size), time.time()
        for i in range(0, len(jobs), bs):
            batch = jobs[i:i + bs]
            sources = torch.stack([load_image(j.source) for j in batch]) if batch[0].source is not None else None
            for job, image in zip(batch, sampler.generate([j.text for j in batch], [j.seed for j in batch], sources)):
                write(job, to_pil(image))
            done = i + len(batch)
            rate = done / max(time.time() - start, 1e-9)
            self.log(f"  {done}/{len(jobs)} images ({rate:.2f}/s, ~{(len(jobs) - done) / max(rate, 1e-9):.0f}s left)")
        self.log(scorer())
        return {"prompts": len(self.rows), "generated": len(jobs), "kept": self.kept}


def read_geneval_prompts(path) -> list[tuple[str, dict]]:
    """(raw line, parsed) per non-empty line of GenEval's evaluation_metadata(.jsonl / _long.jsonl)."""
    out = []
    for n, line, row in jsonl_lines(path, BenchmarkError):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise BenchmarkError(f'{path}:{n}: a GenEval line needs a "prompt" string')
        out.append((line.strip(), row))
    return out


def run_geneval(sampler: BenchmarkSampler, prompts, out, samples: int = 4, **options) -> dict:
    """`<out>/<index:05d>/metadata.jsonl` (the prompt's line) + `samples/<k:04d>.png`, k < samples;
    `options`: `_Run`'s limit, shard, overwrite, log."""
    out, run = Path(out), _Run(sampler, "geneval", read_geneval_prompts(prompts), prompts, **options)
    jobs = []
    for index, (line, row) in enumerate(run.rows):
        if not run.mine(index):
            continue
        folder = out / f"{index:05d}"
        meta = folder / "metadata.jsonl"
        if meta.is_file() and meta.read_text(encoding="utf-8").strip() != line and not run.overwrite:
            raise BenchmarkError(f"{meta} holds another prompt than line {index + 1} of {prompts}; "
                                 "the outputs come from another prompt file: use another --out")
        if run.overwrite or not meta.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            meta.write_text(line + "\n", encoding="utf-8")
        for k in range(samples):
            path, seed = folder / "samples" / f"{k:04d}.png", run.seed(index, k)
            if not run.done(path):
                jobs.append(Job(path, seed, row["prompt"], {"prompt": row["prompt"], "index": index, "sample": k,
                                                            "seed": seed}))
    run.log(f"GenEval: {len(run.rows)} prompts x {samples}; {run.kept} images already there, {len(jobs)} to make")
    return run.generate(jobs, lambda: scorer_command("geneval", out))


GRID_POSITIONS = ((0, 0), (1, 0), (0, 1), (1, 1))  # the scorer's crop order: TL, TR, BL, BR


def read_dpg_prompts(folder) -> list[tuple[str, str]]:
    """(id, prompt) for each `<id>.txt` in the folder, sorted by id."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BenchmarkError(f"DPG-Bench prompts must be a folder of <id>.txt files; {folder} is not a folder")
    out = []
    for path in sorted(folder.glob("*.txt")):
        prompt = path.read_text(encoding="utf-8").strip()
        if not prompt:
            raise BenchmarkError(f"{path} is empty")
        out.append((path.stem, prompt))
    if not out:
        raise BenchmarkError(f"no <id>.txt prompt file in {folder}")
    return out


def run_dpg(sampler: BenchmarkSampler, prompts, out, samples: int = 4, **options) -> dict:
    """`<out>/<id>.png`: the `samples` (<= 4) images as a 2x2 grid (tile = the decoded size). Nothing
    else is written into `out`: the scorer reads every file there as an image. `options`: as run_geneval's."""
    if not 1 <= samples <= 4:
        raise ValueError("DPG-Bench grids hold 1 to 4 samples")
    out, run = Path(out), _Run(sampler, "dpg", read_dpg_prompts(prompts), prompts, samples=samples, **options)
    jobs = []
    for index, (pid, prompt) in enumerate(run.rows):
        if run.mine(index) and not run.done(out / f"{pid}.png"):
            seeds = [run.seed(pid, k) for k in range(samples)]
            jobs += [Job(out / f"{pid}.png", seed, prompt, {"prompt": prompt, "id": pid, "seeds": seeds})
                     for seed in seeds]
    run.log(f"DPG-Bench: {len(run.rows)} prompts x {samples}; {run.kept} grids already there, "
            f"{len(jobs) // samples} to make")
    tiles: dict[Path, list[Image.Image]] = {}  # a grid's tiles so far (its jobs come in sample order)
    tile_px = [256]  # the scorer's --resolution: the decoded size once known

    def write(job: Job, image: Image.Image):
        parts = tiles.setdefault(job.path, [])
        parts.append(image)
        if len(parts) < samples:
            return
        side = tile_px[0] = image.width
        grid = Image.new("RGB", (side * 2, side * 2) if samples > 1 else (side, side))
        for (x, y), tile in zip(GRID_POSITIONS, tiles.pop(job.path)):
            grid.paste(tile, (x * side, y * side))
        run.save(job, grid)

    return run.generate(jobs, lambda: scorer_command("dpg", out, resolution=tile_px[0], samples=samples), write)


def read_gedit_items(path) -> list[dict]:
    """Lines `{"key", "source", "instruction", "task_type", "language"}` ("instruction_language" is
    accepted for "language"); source paths relative to the file."""
    path = Path(path)
    items = []
    for n, _line, row in jsonl_lines(path, BenchmarkError):
        row = dict(row)
        row.setdefault("language", row.get("instruction_language"))
        missing = [k for k in ("key", "source", "instruction", "task_type", "language") if not row.get(k)]
        if missing:
            raise BenchmarkError(f"{path}:{n}: missing {missing}")
        for k in ("key", "task_type", "language"):
            if "/" in str(row[k]) or str(row[k]) in (".", ".."):
                raise BenchmarkError(f"{path}:{n}: {k} {row[k]!r} cannot be a file name")
        row["source"] = resolve(path.parent, row["source"])
        if not row["source"].is_file():
            raise BenchmarkError(f"{path}:{n}: source image {row['source']} does not exist")
        items.append(row)
    return items


def run_gedit(sampler: BenchmarkSampler, prompts, out, samples: int = 1, **options) -> dict:
    """`<out>/<task_type>/<language>/<key>.png`, one edit per item (the source is centre-cropped to 256);
    `options`: as run_geneval's."""
    out, run = Path(out), _Run(sampler, "gedit", read_gedit_items(prompts), prompts, **options)
    jobs = []
    for index, row in enumerate(run.rows):
        path, seed = out / row["task_type"] / row["language"] / f"{row['key']}.png", run.seed(row["key"], 0)
        if run.mine(index) and not run.done(path):
            jobs.append(Job(path, seed, row["instruction"], {"instruction": row["instruction"], "key": row["key"],
                                                             "seed": seed}, source=row["source"]))
    if samples != 1:
        run.log("GEdit-Bench scores one edit per item; --samples is ignored")
    run.log(f"GEdit-Bench: {len(run.rows)} edits; {run.kept} already there, {len(jobs)} to make")
    return run.generate(jobs, lambda: scorer_command("gedit", out))


def scorer_command(benchmark: str, out, resolution: int = 256, samples: int = 4) -> str:
    """The scorer's command line as a template: <ANGLE> parts are the user's to fill."""
    out = Path(out).resolve()
    if benchmark == "geneval":
        return (
            "Score with GenEval (djghosh13/geneval; its own Python 3.9 env, mmdet 2.x + mmcv-full 1.7, a GPU):\n"
            "  cd <GENEVAL_REPO>\n"
            f"  python evaluation/evaluate_images.py {out} --outfile {out}/results.jsonl --model-path <DETECTOR_DIR>\n"
            f"  python evaluation/summary_scores.py {out}/results.jsonl\n"
            "  (<DETECTOR_DIR> holds mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth, "
            "from GenEval's evaluation/download_models.sh)")
    if benchmark == "dpg":
        return (
            "Score with DPG-Bench (TencentQQGYLab/ELLA dpg_bench/; its own env with modelscope mPLUG, a GPU):\n"
            "  cd <ELLA_REPO>\n"
            f"  accelerate launch dpg_bench/compute_dpg_bench.py --image-root-path {out} --resolution {resolution} "
            f"--pic-num {samples} --vqa-model mplug --res-path <RESULTS_DIR>/dpg_results.txt\n"
            "  (give --res-path outside the image folder: the scorer reads every file in it as an image)")
    if benchmark == "gedit":
        fullset = out.name == "fullset"
        method, results = (out.parent.name, str(out.parent.parent)) if fullset else ("<METHOD>", "<RESULTS>")
        note = "" if fullset else (
            f"\n  (the scorer reads <RESULTS>/<METHOD>/fullset/<task_type>/<language>/<key>.png: generate with "
            f"--out <RESULTS>/<METHOD>/fullset, or link {out} there)")
        return (
            "Score with GEdit-Bench VIEScore (stepfun-ai/Step1X-Edit GEdit-Bench/; GPT-4.1 or Qwen2.5-VL-72B judge):\n"
            "  cd <STEP1X_EDIT_REPO>/GEdit-Bench\n"
            f"  python test_gedit_score.py --model_name {method} --save_path {results} --backbone <gpt4o|qwen25vl>\n"
            f"  python calculate_statistics.py --model_name {method} --save_path {results} --backbone <gpt4o|qwen25vl> "
            "--language <en|cn>" + note + "\n"
            "  The paper scores edits with EditReward (TIGER-AI-Lab/EditReward) on (source, instruction, output) "
            "triplets: point it at the same files.")
    raise ValueError(f"unknown benchmark {benchmark!r}; known: {BENCHMARKS}")


RUNNERS = {"geneval": run_geneval, "dpg": run_dpg, "gedit": run_gedit}


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        rank, world = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes RANK/WORLD, e.g. 0/8; got {text!r}") from None
    return rank, world


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=BENCHMARKS)
    parser.add_argument("--vae", required=True, help="PS-VAE .safetensors file")
    parser.add_argument("--generator", required=True, help="generator .safetensors file (with its tokenizer)")
    parser.add_argument("--prompts", required=True, help="geneval: evaluation_metadata(.jsonl|_long.jsonl); "
                        "dpg: folder of <id>.txt; gedit: jsonl of {key, source, instruction, task_type, language}")
    parser.add_argument("--out", required=True, help="output folder (resumed if it exists)")
    parser.add_argument("--samples", type=int, default=None, help="images per prompt (default 4; gedit 1)")
    parser.add_argument("--steps", type=int, default=flow.DEFAULT_STEPS, help="Euler steps (paper: 50)")
    parser.add_argument("--cfg", type=float, default=flow.DEFAULT_GUIDANCE, help="text guidance (paper: 6.5)")
    parser.add_argument("--shift", type=float, default=flow.DEFAULT_SHIFT, help="sampling time shift (paper: 3)")
    parser.add_argument("--image-cfg", type=float, default=1.5, help="image guidance for gedit (dual guidance)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="generator precision")
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts (smoke tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard", type=_parse_shard, default=None,
                        help="RANK/WORLD: this process's share of the prompts (default: $RANK/$WORLD_SIZE, else all)")
    parser.add_argument("--overwrite", action="store_true", help="regenerate outputs that already exist")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    samples = args.samples if args.samples is not None else (1 if args.benchmark == "gedit" else 4)
    if samples < 1:
        raise SystemExit("--samples must be >= 1")
    settings = SamplingSettings(**{f.name: getattr(args, f.name) for f in fields(SamplingSettings)})
    sampler = BenchmarkSampler.from_files(args.vae, args.generator, settings, device=args.device,
                                          dtype=DTYPES[args.dtype])
    shard = args.shard or launcher_rank()  # one process per GPU under torchrun / accelerate, each its share
    try:
        return RUNNERS[args.benchmark](sampler, args.prompts, args.out, samples=samples, limit=args.limit,
                                       shard=shard, overwrite=args.overwrite)
    except BenchmarkError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
