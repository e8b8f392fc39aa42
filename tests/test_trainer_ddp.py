"""Two processes (torchrun, gloo on CPU) with batch 2 each match one process with batch 4."""
from __future__ import annotations

import torch

from psvae_core.autoencoder import PSVAE
from test_trainer_helpers import GAN_ON, TINY_SVAE, cli, max_diff, metrics, photos, torchrun, weights

STEPS = 4
# A larger Adam eps keeps float-rounding-level gradients (e.g. conv biases before a GroupNorm,
# ~1e-9) from being blown up to full-size updates, which would make any two runs differ.
# The discriminator trains from the first step; the adversarial term (with the adaptive weight,
# whose gradient norms are averaged over processes) joins at the last step. Over several GAN
# steps, rounding differences grow chaotically (hinge kinks, a grad-norm ratio), so a longer
# adversarial phase would test the GAN's sensitivity rather than the process layout.
COMMON = [f"train.max_steps={STEPS}", "checkpoint.every=0", "log.every=1", "optim.eps=1e-5", "gan.optim.eps=1e-5",
          *GAN_ON, f"gan.start_step={STEPS - 1}", "gan.disc_start_step=0"]


def test_two_processes_match_one(tmp_path):
    data = photos(tmp_path / "photos", 128)
    base = ["svae", "--config", TINY_SVAE, f"data.source={data}", f"run.output_dir={tmp_path}", *COMMON]
    one = cli(*base, "run.name=one", "train.batch_size=4")
    assert one.returncode == 0, one.stderr
    two = torchrun(*base, "run.name=two", "train.batch_size=2")
    assert two.returncode == 0, two.stderr[-4000:]
    assert "global batch 4 (2 process(es))" in two.stdout + two.stderr

    final = f"step_{STEPS:08d}"
    for name, tol in (("model.safetensors", 1e-5), ("model.ema.safetensors", 1e-5), ("disc.safetensors", 1e-5)):
        diff = max_diff(weights(tmp_path / "one" / "checkpoints" / final, name),
                        weights(tmp_path / "two" / "checkpoints" / final, name))
        assert diff < tol, f"{name}: max |one - two| = {diff:.2e}"
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two")):
        for key in ("model/semantic", "model/l1", "disc/hinge", "adaptive_weight"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (key, a[key], b[key])
    # The export measures the same image sample (latent stats, preview fit) whatever the process count.
    one_vae, two_vae = (PSVAE.from_file(tmp_path / name / "export" / "vae.safetensors") for name in ("one", "two"))
    assert one_vae.provenance["latent_stats_sample"] == two_vae.provenance["latent_stats_sample"]
    for buffer in ("latents_mean", "latents_std", "latent_rgb_weight", "latent_rgb_bias"):
        torch.testing.assert_close(getattr(two_vae, buffer), getattr(one_vae, buffer), atol=1e-3, rtol=1e-3)


def test_processes_end_with_no_process_group_threads_left(tmp_path):
    """Gloo's worker threads must be gone before the interpreter shuts down: left alive, one that is
    still freeing a collective's tensors needs the GIL during shutdown and aborts the process
    ("terminate called without an active exception") after a run that otherwise succeeded."""
    data = photos(tmp_path / "photos", 128)
    # Each rank writes its count to its own file: what torchrun's workers print to a shared stdout
    # pipe is not a reliable channel for a test (a run with rc 0 once showed no lines under load).
    script = tmp_path / "run_and_count_threads.py"
    script.write_text("import os, sys\nfrom pathlib import Path\nfrom trainer.__main__ import main\n"
                      "code = main(sys.argv[1:])\n"
                      f"Path({str(tmp_path)!r}, 'threads_rank' + os.environ['RANK']).write_text("
                      "str(len(os.listdir('/proc/self/task'))))\nsys.exit(code)\n")
    run = torchrun("svae", "--config", TINY_SVAE, f"data.source={data}", f"run.output_dir={tmp_path}",
                    "train.batch_size=2", "train.max_steps=1", "train.num_workers=0", entry=(str(script),))
    assert run.returncode == 0, run.stderr[-4000:]
    counts = {p.name: p.read_text() for p in sorted(tmp_path.glob("threads_rank*"))}
    assert counts == {"threads_rank0": "1", "threads_rank1": "1"}, \
        f"threads alive after main() returned: {counts}\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}"


def test_checkpoints_move_between_process_counts_at_the_same_global_batch(tmp_path):
    """Saved by 2 processes and resumed by 1, and the other way round, both end equal to one
    uninterrupted single-process run; another global batch is refused."""
    data = photos(tmp_path / "photos", 128)
    base = ["svae", "--config", TINY_SVAE, f"data.source={data}", f"run.output_dir={tmp_path}", "log.every=1",
            "optim.eps=1e-5", "checkpoint.every=2", "checkpoint.resume=latest"]
    ref = cli(*base, "run.name=ref", "train.batch_size=4", "train.max_steps=4")
    assert ref.returncode == 0, ref.stderr
    first = torchrun(*base, "run.name=two_then_one", "train.batch_size=2", "train.max_steps=2")
    assert first.returncode == 0, first.stderr[-4000:]
    then = cli(*base, "run.name=two_then_one", "train.batch_size=4", "train.max_steps=4")
    assert then.returncode == 0, then.stderr
    assert "resuming a 2-process checkpoint on 1 process(es)" in then.stdout + then.stderr
    first = cli(*base, "run.name=one_then_two", "train.batch_size=4", "train.max_steps=2")
    assert first.returncode == 0, first.stderr
    then = torchrun(*base, "run.name=one_then_two", "train.batch_size=2", "train.max_steps=4")
    assert then.returncode == 0, then.stderr[-4000:]
    final = "step_00000004"
    for run in ("two_then_one", "one_then_two"):
        for name in ("model.safetensors", "model.ema.safetensors"):
            diff = max_diff(weights(tmp_path / "ref" / "checkpoints" / final, name),
                            weights(tmp_path / run / "checkpoints" / final, name))
            assert diff < 1e-5, f"{run} {name}: max |ref - resumed| = {diff:.2e}"
    other = cli(*base, "run.name=one_then_two", "train.batch_size=2", "train.max_steps=6")
    assert other.returncode == 2 and "global batch 4, this run has 2" in other.stderr


def test_fsdp_is_refused_for_the_autoencoder_stages(tmp_path):
    data = photos(tmp_path / "photos", 128)
    run = torchrun("svae", "--config", TINY_SVAE, f"data.source={data}", f"run.output_dir={tmp_path}",
                    "train.max_steps=1", "train.fsdp=true")
    assert run.returncode != 0
    assert "the 'svae' stage does not support FSDP" in run.stderr and "--multi_gpu" in run.stderr
