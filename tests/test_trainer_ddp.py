"""Two processes (torchrun, gloo on CPU) with batch 2 each match one process with batch 4."""
from __future__ import annotations

import socket
import subprocess
import sys

from test_trainer_helpers import GAN_ON, ROOT, TINY_SVAE, cli, env, max_diff, metrics, photos, weights

STEPS = 4
# A larger Adam eps keeps float-rounding-level gradients (e.g. conv biases before a GroupNorm,
# ~1e-9) from being blown up to full-size updates, which would make any two runs differ.
# The discriminator trains from the first step; the adversarial term (with the adaptive weight,
# whose gradient norms are averaged over processes) joins at the last step. Over several GAN
# steps, rounding differences grow chaotically (hinge kinks, a grad-norm ratio), so a longer
# adversarial phase would test the GAN's sensitivity rather than the process layout.
COMMON = [f"train.max_steps={STEPS}", "checkpoint.every=0", "log.every=1", "optim.eps=1e-5", "gan.optim.eps=1e-5",
          *GAN_ON, f"gan.start_step={STEPS - 1}", "gan.disc_start_step=0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    data = photos(tmp_path / "photos", 128)
    base = ["svae", "--config", TINY_SVAE, f"data.source={data}", f"run.output_dir={tmp_path}", *COMMON]
    one = cli(*base, "run.name=one", "train.batch_size=4")
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", "--master_addr=127.0.0.1", "-m", "trainer",
                          *map(str, base), "run.name=two", "train.batch_size=2"],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
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
