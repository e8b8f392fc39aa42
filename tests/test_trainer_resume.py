"""Exact resume: SIGKILL right after a checkpoint at a random step, resume, and end with the same
weights (model, EMA, discriminator) as an uninterrupted run; plus keep-last-N and SIGTERM saves."""
from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from test_trainer_helpers import GAN_ON, ROOT, TINY_SVAE, cli, env, max_diff, metrics, photos, weights
from trainer.__main__ import main
from trainer.checkpointing import MARKER, complete_checkpoints

STEPS = 9


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return photos(tmp_path_factory.mktemp("photos"), 128)


def _args(data, out, name, *extra):
    return ["svae", "--config", TINY_SVAE, f"data.source={data}", f"run.output_dir={out}", f"run.name={name}",
            f"train.max_steps={STEPS}", "checkpoint.every=3", "checkpoint.keep_last=0", *GAN_ON, *extra]


def _popen(args):
    return subprocess.Popen([sys.executable, "-m", "trainer", *map(str, args)], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path, proc, timeout=300):
    end = time.time() + timeout
    while not path.is_file():
        assert proc.poll() is None, f"the run ended before {path} appeared:\n{proc.stdout.read()}"
        assert time.time() < end, f"{path} did not appear"
        time.sleep(0.02)


def test_sigkill_at_random_checkpoint_then_resume_is_exact(data, tmp_path):
    kill_step = random.Random().choice([3, 6])
    ref = cli(*_args(data, tmp_path, "ref"))
    assert ref.returncode == 0, ref.stderr

    proc = _popen(_args(data, tmp_path, "killed"))
    marker = tmp_path / "killed" / "checkpoints" / f"step_{kill_step:08d}" / MARKER
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed = cli(*_args(data, tmp_path, "killed", "checkpoint.resume=latest"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout + resumed.stderr

    final = f"step_{STEPS:08d}"
    for name in ("model.safetensors", "model.ema.safetensors", "disc.safetensors"):
        a = weights(tmp_path / "ref" / "checkpoints" / final, name)
        b = weights(tmp_path / "killed" / "checkpoints" / final, name)
        assert max_diff(a, b) <= 1e-6, f"{name} differs after a kill at step {kill_step}"


def test_sigterm_saves_cleanly_and_keep_last(data, tmp_path):
    proc = _popen(_args(data, tmp_path, "term", "train.max_steps=400", "checkpoint.every=2", "checkpoint.keep_last=2"))
    _wait_for(tmp_path / "term" / "checkpoints" / "step_00000004" / MARKER, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "stopped by signal" in out
    done = complete_checkpoints(tmp_path / "term" / "checkpoints")
    assert len(done) == 2 and done[-1][0] >= 4
    assert not list((tmp_path / "term" / "checkpoints").glob(".*tmp"))
    # Re-running without resume refuses to overwrite the run.
    again = cli(*_args(data, tmp_path, "term"))
    assert again.returncode == 2 and "checkpoint.resume=latest" in again.stderr


@pytest.fixture(scope="module")
def two_checkpoints(data, tmp_path_factory):
    """A finished 6-step run with complete checkpoints at steps 3 and 6 (copied by each test)."""
    out = tmp_path_factory.mktemp("runs")
    assert _main(_args(data, out, "base", "train.max_steps=6", "gan.weight=0")) == 0
    return out / "base"


def _main(args):
    return main([str(a) for a in args])


def _copy_run(two_checkpoints, tmp_path):
    shutil.copytree(two_checkpoints, tmp_path / "run")
    return tmp_path / "run" / "checkpoints"


def _truncate(file):
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["model.safetensors", "model.optim.pt"])
def test_a_damaged_latest_checkpoint_is_named_and_the_previous_one_resumed(data, two_checkpoints, tmp_path, capsys,
                                                                          damage):
    root = _copy_run(two_checkpoints, tmp_path)
    _truncate(root / "step_00000006" / damage)
    code = _main(_args(data, tmp_path, "run", "train.max_steps=7", "gan.weight=0", "checkpoint.resume=latest"))
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if "is damaged" in line]
    assert code == 0, out.err
    assert len(lines) == 1 and f"checkpoint step_00000006 is damaged: {damage} cannot be read" in lines[0], lines
    assert "resuming from the previous complete checkpoint, step_00000003" in lines[0]
    assert "at step 3" in out.out + out.err
    # The rows of the steps re-run after the resume (log.every=5: step 5 logged before the damaged
    # save at 6) appear once, so that a plot of the log is right.
    assert [r["step"] for r in metrics(tmp_path / "run")] == [5, 7]


def test_an_explicit_damaged_checkpoint_or_an_absurd_step_is_refused(data, two_checkpoints, tmp_path, capsys):
    root = _copy_run(two_checkpoints, tmp_path)
    _truncate(root / "step_00000006" / "model.ema.safetensors")
    code = _main(_args(data, tmp_path, "run", "gan.weight=0", f"checkpoint.resume={root / 'step_00000006'}"))
    assert code == 2
    assert "checkpoint step_00000006 is damaged: model.ema.safetensors cannot be read" in capsys.readouterr().err
    state = root / "step_00000003" / "trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "step": 10**9}))
    code = _main(_args(data, tmp_path, "run", "gan.weight=0", f"checkpoint.resume={root / 'step_00000003'}"))
    assert code == 2
    assert "trainer_state.json says step 1000000000, its COMPLETE marker step 3" in capsys.readouterr().err


def test_metrics_of_steps_after_the_resumed_checkpoint_are_dropped(tmp_path):
    from trainer.tracking import Tracker

    rows = [{"kind": kind, "step": s} for s in range(1, 7) for kind in ("train", "val")]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "tr')
    tracker = Tracker(tmp_path, True, tensorboard=False, progress=False, total_steps=9, start_step=3)
    tracker.log("train", 4, {"loss": 1.0})
    tracker.close()
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in logged] == [(k, s) for s in (1, 2, 3) for k in ("train", "val")] + [
        ("train", 4)]
