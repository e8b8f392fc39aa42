"""Flow matching pieces against closed-form references (docs/PAPER.md §5.2, §9.3)."""
import math

import pytest
import torch

from psvae_core import flow


@pytest.mark.parametrize("channels, patch, expected", [
    (96, 1, 2.449), (16, 2, 2.0), (768, 1, 6.928), (16, 1, 1.0), (32, 1, 1.414), (256, 1, 4.0),
])
def test_shift_for_latent_matches_the_paper(channels, patch, expected):
    assert flow.shift_for_latent(channels, patch) == pytest.approx(expected, abs=1e-3)


def test_time_shift_keeps_endpoints_and_moves_towards_noise():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(flow.time_shift(t, 1.0), t)
    torch.testing.assert_close(flow.time_shift(t, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))


def test_train_times_are_logit_normal_then_shifted_and_seeded():
    draw = lambda shift, seed=0: flow.sample_train_times(20000, shift, torch.Generator().manual_seed(seed))  # noqa: E731
    plain, shifted = draw(1.0), draw(3.0)
    assert torch.equal(shifted, draw(3.0)) and not torch.equal(shifted, draw(3.0, seed=1))
    assert 0 < shifted.min() and shifted.max() < 1
    # A monotone map keeps the median: logit-normal(0,1) has median 1/2, shifted by s it is s/(s+1).
    assert plain.median().item() == pytest.approx(0.5, abs=0.02)
    assert shifted.median().item() == pytest.approx(0.75, abs=0.02)
    torch.testing.assert_close(shifted, flow.time_shift(plain, 3.0))
    # The times are a pure function of the normal draws, which a caller (the trainer) may bring.
    u = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(flow.train_times(u, 3.0), shifted)
    torch.testing.assert_close(flow.train_times(u, 1.0, loc=0.5, scale=2.0), torch.sigmoid(0.5 + 2.0 * u))


def test_path_endpoints_and_velocity_is_its_derivative():
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(flow.interpolate(x0, noise, 0.0), x0)
    torch.testing.assert_close(flow.interpolate(x0, noise, 1.0), noise)
    t, dt = torch.tensor([0.3, 0.6]), 1e-3
    derivative = (flow.interpolate(x0, noise, t + dt) - flow.interpolate(x0, noise, t)) / dt
    torch.testing.assert_close(derivative, flow.velocity_target(x0, noise), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(flow.x0_from_velocity(flow.interpolate(x0, noise, t), noise - x0, t), x0)


def test_flow_loss_is_velocity_mse_and_honours_the_mask():
    x0, noise = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    v = noise - x0
    assert flow.flow_loss(v, x0, noise).item() == 0
    pred = v + 1.0
    assert flow.flow_loss(pred, x0, noise).item() == pytest.approx(1.0)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0])
    pred[2:] += 5.0  # masked-out samples cannot change the loss
    assert flow.flow_loss(pred, x0, noise, mask).item() == pytest.approx(1.0)
    per = flow.flow_loss(pred, x0, noise, reduction="none")  # per sample: 1 + 0, then (1 + 5)^2
    torch.testing.assert_close(per, torch.tensor([1.0, 1.0, 36.0, 36.0]))


def test_schedule_runs_from_noise_to_data():
    ts = flow.sampling_schedule(4, 1.0)
    torch.testing.assert_close(ts, torch.linspace(1, 0, 5, dtype=torch.float64))
    ts = flow.sampling_schedule(50, 3.0)
    assert len(ts) == 51 and ts[0] == 1 and ts[-1] == 0 and bool((ts[1:] < ts[:-1]).all())
    assert flow.sampling_schedule(2, 3.0)[1].item() == pytest.approx(0.75)


def _plain(fn):
    return lambda x, t, branches: [fn(x, t)] * len(branches)


@pytest.mark.parametrize("steps, shift", [(1, 1.0), (7, 3.0), (50, 3.0)])
def test_euler_integrates_the_straight_path_exactly(steps, shift):
    # dx/dt = (x - x0)/t is the field of the straight paths to x0; Euler follows it exactly.
    x0, noise = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    field = lambda x, t: (x - x0) / t[:, None, None, None]  # noqa: E731
    out = flow.euler_sample(_plain(field), noise, steps=steps, shift=shift, guidance=1.0)
    torch.testing.assert_close(out, x0, atol=1e-10, rtol=0)
    const = torch.randn_like(noise)
    out = flow.euler_sample(_plain(lambda x, t: const), noise, steps=steps, shift=shift, guidance=1.0)
    torch.testing.assert_close(out, noise - const)


def test_denoise_starts_the_schedule_at_the_matching_shifted_time():
    assert torch.equal(flow.sampling_schedule(7, 3.0, denoise=1.0), flow.sampling_schedule(7, 3.0))
    ts = flow.sampling_schedule(4, 3.0, denoise=0.5)
    torch.testing.assert_close(ts, flow.time_shift(torch.linspace(0.5, 0, 5, dtype=torch.float64), 3.0))
    assert ts[0].item() == pytest.approx(0.75) and ts[-1] == 0  # the full 8-step grid's last 4 steps
    torch.testing.assert_close(ts, flow.sampling_schedule(8, 3.0)[4:])
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="denoise must be in"):
            flow.sampling_schedule(4, 3.0, denoise=bad)


@pytest.mark.parametrize("steps, shift, denoise", [(1, 1.0, 0.3), (7, 3.0, 0.6), (20, 3.0, 0.05)])
def test_img2img_starts_from_the_init_noised_to_that_time(steps, shift, denoise):
    init, noise = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    starts = []
    zero = lambda x, t, branches: starts.append((x, t)) or [torch.zeros_like(x)] * len(branches)  # noqa: E731
    out = flow.euler_sample(zero, noise, steps=steps, shift=shift, guidance=1.0, init=init, denoise=denoise)
    t0 = flow.time_shift(torch.tensor(denoise, dtype=torch.float64), shift)
    assert starts[0][1][0].item() == pytest.approx(t0.item())
    torch.testing.assert_close(out, flow.interpolate(init, noise, t0))  # no velocity: it stays there
    # The straight path's own velocity (noise - init) carries it back to the init exactly.
    back = flow.euler_sample(_plain(lambda x, t: noise - init), noise, steps=steps, shift=shift, guidance=1.0,
                             init=init, denoise=denoise)
    torch.testing.assert_close(back, init, atol=1e-12, rtol=0)
    # denoise 1 starts from the noise, whatever the init holds.
    full = flow.euler_sample(_plain(lambda x, t: x), noise, steps=steps, shift=shift, guidance=1.0)
    same = flow.euler_sample(_plain(lambda x, t: x), noise, steps=steps, shift=shift, guidance=1.0, init=init)
    assert torch.equal(full, same)
    with pytest.raises(ValueError, match="needs the init latents"):
        flow.euler_sample(zero, noise, steps=steps, denoise=denoise)


def test_guidance_formulas():
    cond, image, uncond = torch.tensor(3.0), torch.tensor(1.0), torch.tensor(0.0)
    assert flow.guide([cond, uncond], 1.0) == cond
    assert flow.guide([torch.tensor(2.0), torch.tensor(1.0)], 3.0) == 4.0
    assert flow.guide([cond, image, uncond], 3.0, image_guidance=2.0) == 0 + 2 * 1 + 3 * 2
    assert flow.guide([cond, image, uncond], 1.0, image_guidance=1.0) == cond
    assert flow.branches_for(1.0) == ("cond",)
    assert flow.branches_for(6.5) == ("cond", "uncond")
    assert flow.branches_for(5.0, 1.5) == ("cond", "image", "uncond")


def _branchy(log):
    # A velocity fn whose branches differ, recording what each step asked for.
    def fn(x, t, branches):
        log.append((float(t[0]), tuple(branches)))
        value = {"cond": 1.0, "image": 0.5, "uncond": 0.0}
        return [torch.full_like(x, value[b]) for b in branches]
    return fn


def test_cfg_scale_one_equals_the_conditional_prediction():
    noise, log = torch.randn(1, 2, 2, 2), []
    out = flow.euler_sample(_branchy(log), noise, steps=5, guidance=1.0)
    assert all(b == ("cond",) for _, b in log)  # no wasted unconditional pass
    torch.testing.assert_close(out, noise - 1.0)
    guided = flow.euler_sample(_branchy([]), noise, steps=5, guidance=2.0)
    torch.testing.assert_close(guided, noise - 2.0)


def test_cfg_interval_and_dual_guidance():
    noise, log = torch.zeros(1, 1, 1, 1), []
    out = flow.euler_sample(_branchy(log), noise, steps=10, shift=1.0, guidance=3.0, cfg_interval=(0.15, 0.65))
    guided = [t for t, b in log if b == ("cond", "uncond")]
    assert len(guided) == 5 and all(0.15 <= t <= 0.65 for t in guided)  # t = 0.6, 0.5, 0.4, 0.3, 0.2
    assert all(b == ("cond",) for t, b in log if not 0.15 <= t <= 0.65)
    # the 5 guided steps of 0.1 move at velocity 3, the 5 others at 1
    assert out.item() == pytest.approx(-(0.5 * 3 + 0.5 * 1))
    log = []
    out = flow.euler_sample(_branchy(log), noise, steps=4, guidance=2.0, image_guidance=3.0)
    assert all(b == ("cond", "image", "uncond") for _, b in log)
    assert out.item() == pytest.approx(-(3 * 0.5 + 2 * 0.5))


def test_callback_reports_every_step_and_can_interrupt():
    seen = []
    noise = torch.randn(1, 2, 2, 2)
    const = torch.ones_like(noise)
    out = flow.euler_sample(_plain(lambda x, t: const), noise, steps=6, guidance=1.0,
                            callback=lambda i, n, x, x0: seen.append((i, n, x.clone(), x0.clone())))
    assert [s[:2] for s in seen] == [(i, 6) for i in range(1, 7)]
    torch.testing.assert_close(seen[-1][2], out)
    torch.testing.assert_close(seen[0][3], noise - const)  # x0 = x_t - t v at t = 1

    class Interrupted(Exception):
        pass

    def stop(i, n, x, x0):
        if i == 2:
            raise Interrupted
    with pytest.raises(Interrupted):
        flow.euler_sample(_plain(lambda x, t: const), noise, steps=6, guidance=1.0, callback=stop)


def test_noise_is_deterministic_per_seed():
    a, b = flow.make_noise((2, 3, 4, 4), seed=7), flow.make_noise((2, 3, 4, 4), seed=7)
    assert torch.equal(a, b) and not torch.equal(a, flow.make_noise((2, 3, 4, 4), seed=8))
    assert math.isclose(a.std().item(), 1.0, abs_tol=0.3)
