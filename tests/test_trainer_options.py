"""RAE stage, feature cache, gradient accumulation, NaN guard, bf16 and gradient checkpointing, the
data-wait share."""
from __future__ import annotations

import re

import pytest

from psvae_core.autoencoder import PSVAE
from test_trainer_helpers import TINY_SVAE, max_diff, metrics, photos, weights
from trainer.__main__ import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return photos(tmp_path_factory.mktemp("photos"), 128)


def _run(stage, data, out, name, *extra):
    """The tiny svae settings for any stage (the file says `stage: svae`, so other stages get a copy)."""
    config = TINY_SVAE
    if stage != "svae":
        out.mkdir(parents=True, exist_ok=True)
        config = out / f"{stage}_tiny.yaml"
        config.write_text(TINY_SVAE.read_text().replace("stage: svae", f"stage: {stage}"))
    return main([stage, "--config", str(config), f"data.source={data}", f"run.output_dir={out}",
                 f"run.name={name}", *map(str, extra)])


def test_rae_stage_trains_a_decoder_on_noisy_features_and_exports(data, tmp_path):
    assert _run("rae", data, tmp_path, "rae", "train.max_steps=6", "loss.noise_tau=0.8",
                "data.cache_features=true") == 0
    vae = PSVAE.from_file(tmp_path / "rae" / "export" / "vae.safetensors")
    assert vae.config.mode == "rae" and vae.latent_channels == 64
    rows = metrics(tmp_path / "rae")
    assert "model/l1" in rows[-1] and "model/semantic" not in rows[-1]


def test_feature_cache_is_built_once_and_shared_by_svae_and_rae(data, tmp_path, capsys):
    cache = tmp_path / "cache"
    common = ["train.max_steps=4", "data.cache_features=true", f"data.cache_dir={cache}", "checkpoint.every=0"]

    def counts():  # (encoded, already cached) of the run's feature cache
        found = re.findall(r"cache \S+: (\d+) encoded, (\d+) already cached", capsys.readouterr().out)
        assert len(found) == 1
        return tuple(map(int, found[0]))

    assert _run("svae", data, tmp_path, "c1", *common) == 0
    images = counts()[0]
    assert images > 0
    assert _run("rae", data, tmp_path, "r", *common) == 0  # the same frozen encoder and images: the same cache
    assert counts() == (0, images)
    assert len(list(cache.glob("*/cache.json"))) == 1
    assert _run("svae", data, tmp_path, "plain", "train.max_steps=4", "checkpoint.every=0") == 0
    cached, plain = metrics(tmp_path / "c1"), metrics(tmp_path / "plain")
    assert abs(cached[-1]["model/semantic"] - plain[-1]["model/semantic"]) < 1e-2  # float16 cache


def test_gradient_accumulation_is_really_applied(data, tmp_path):
    common = ["train.max_steps=3", "checkpoint.every=0", "optim.eps=1e-5", "ema.enabled=false"]
    assert _run("svae", data, tmp_path, "b4", *common, "train.batch_size=4") == 0
    assert _run("svae", data, tmp_path, "b2x2", *common, "train.batch_size=2", "train.grad_accum=2") == 0
    assert _run("svae", data, tmp_path, "b2", *common, "train.batch_size=2") == 0
    final = "checkpoints/step_00000003/model.safetensors"
    same = max_diff(weights(tmp_path / "b4", final), weights(tmp_path / "b2x2", final))
    other = max_diff(weights(tmp_path / "b4", final), weights(tmp_path / "b2", final))
    # Another summation order only: rounding, amplified a little by Adam (measured 1.7e-5).
    assert same < 5e-5 < 1e-3 < other


def test_nan_guard_skips_counts_names_the_term_and_halts(data, tmp_path, capsys):
    code = _run("svae", data, tmp_path, "nan", "train.max_steps=20", "loss.kl_weight=.nan", "nan.max_consecutive=3",
                "log.every=1")
    captured = capsys.readouterr()
    assert code == 3
    text = captured.out + captured.err
    assert "non-finite model/kl; step skipped" in text and "3 non-finite steps in a row" in captured.err


def test_bf16_autocast_and_gradient_checkpointing_run(data, tmp_path):
    assert _run("svae", data, tmp_path, "bf16", "train.max_steps=3", "precision.mixed=bf16",
                "train.grad_checkpointing=true", "checkpoint.every=0") == 0
    assert metrics(tmp_path / "bf16")[-1]["nan_steps"] == 0


def test_the_data_wait_share_is_logged_on_log_steps(data, tmp_path):
    assert _run("svae", data, tmp_path, "wait", "train.max_steps=4", "log.every=2", "checkpoint.every=0") == 0
    rows = metrics(tmp_path / "wait")
    assert [r["step"] for r in rows] == [2, 4]
    assert all(0 < r["data_wait_share"] < 1 for r in rows)  # loading is part of every step, never all of it
