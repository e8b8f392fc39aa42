"""Load time of the paper-size files: the current `from_file` (parameters built on the meta device,
the memory-mapped tensors assigned) against the loading it replaced (a real build with random init,
then the weights copied in). Random weights; the files are written with the models' own `save`
into a temporary folder that is deleted afterwards (3.4 GB in float32).

    python -m bench.loading --out bench/results/loading_cpu.json [--repeats 3] [--device cpu]

Each load runs in a fresh process (its imports not timed), so neither path finds the other's
allocations; both read the file from the page cache (it was just written). "seconds" is until
`from_file` returns a model on `--device` ready to run (wall clock); "cpu_seconds" the process' CPU
time over the same span (all threads: the steadier figure on a shared machine); "max_rss_gib" the
process' peak resident memory (the file pages it mapped included, and the imports)."""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _old_from_file(kind: str, path: Path, device: str):
    """The loading code before the meta-device build: a real build, the file read, the weights copied."""
    from safetensors.torch import load_file

    from psvae_core import checkpoint
    from psvae_core.autoencoder import PSVAE
    from psvae_core.config import PSVAEConfig
    from psvae_core.encoders import file_names
    from psvae_core.fusion import FusionConfig, FusionDiffuser

    component = checkpoint.load_component(path, expected_kind=kind, read_tensors=False)
    if kind == "vae":
        config, cls, names = PSVAEConfig.from_dict(component.config), PSVAE, file_names
    else:
        config, cls, names = FusionConfig.from_dict(component.config), FusionDiffuser, (lambda m: (lambda k: k))
    with torch.device("meta"):
        skeleton = cls(config)
    assert {names(skeleton)(k) for k in skeleton.state_dict()} == set(component.shapes)
    tensors = load_file(path)
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    model = cls(config)
    checkpoint.load_state_dict_checked(model, tensors, source=str(path), names=names(model))
    return model.to(device)


def _new_from_file(kind: str, path: Path, device: str):
    from psvae_core.autoencoder import PSVAE
    from psvae_core.fusion import FusionDiffuser

    return (PSVAE if kind == "vae" else FusionDiffuser).from_file(path, device=device)


def _measure(way: str, kind: str, path: Path, device: str) -> dict:
    load = _old_from_file if way == "old" else _new_from_file
    start, cpu = time.perf_counter(), time.process_time()
    model = load(kind, path, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert not any(t.is_meta for t in model.state_dict().values())
    return {"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3), "max_rss_gib": round(_peak_rss() / 2**30, 2)}


def _peak_rss() -> int:
    """This process' peak resident bytes: VmHWM (Linux), which starts afresh at exec, unlike
    ru_maxrss, which keeps the parent's peak; elsewhere ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _write_files(folder: Path) -> dict[str, Path]:
    from psvae_core.autoencoder import PSVAE
    from psvae_core.config import PRESETS as VAE_PRESETS
    from psvae_core.fusion import PRESETS, FusionDiffuser

    torch.manual_seed(0)
    files = {"generator": folder / "generator_653m.safetensors", "vae": folder / "vae_paper.safetensors"}
    FusionDiffuser(PRESETS["paper-653m"]).save(files["generator"])
    PSVAE(VAE_PRESETS["paper-dinov2-b-96c"]).save(files["vae"])
    return files


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--measure", nargs=3, metavar=("WAY", "KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:  # one load in this (fresh) process
        way, kind, path = args.measure
        print(json.dumps(_measure(way, kind, Path(path), args.device)))
        return
    from bench.common import environment

    result = {"environment": {**environment(), "threads": torch.get_num_threads()}, "device": args.device, "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        files = _write_files(Path(tmp))
        for kind, path in files.items():
            result["rows"][kind] = row = {"file_gib": round(path.stat().st_size / 2**30, 2)}
            for way in ("old", "new"):
                runs = []
                for _ in range(args.repeats):
                    cmd = [sys.executable, "-m", "bench.loading", "--out", str(args.out), "--device", args.device,
                           "--measure", way, kind, str(path)]
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                    runs.append(json.loads(out.strip().splitlines()[-1]))
                row[way] = {key: [r[key] for r in runs] for key in runs[0]}
                print(kind, way, row[way], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
