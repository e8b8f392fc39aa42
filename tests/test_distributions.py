import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from psvae_core.distributions import DiagonalGaussian


def _params(seed, shape=(3, 4, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def test_kl_to_standard_normal_matches_closed_form_in_float64():
    mean, logvar = _params(0)
    post = DiagonalGaussian(mean, logvar)
    ref = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(torch.zeros_like(mean), torch.ones_like(mean)))
    torch.testing.assert_close(post.kl(), ref.sum(dim=(1, 2, 3)), rtol=1e-12, atol=1e-12)
    # By hand for one scalar: KL(N(m, s^2) || N(0,1)) = (m^2 + s^2 - 1 - log s^2) / 2
    m, lv = 0.7, -0.4
    one = DiagonalGaussian(torch.tensor([[m]], dtype=torch.float64), torch.tensor([[lv]], dtype=torch.float64))
    assert one.kl().item() == pytest.approx(0.5 * (m * m + math.exp(lv) - 1 - lv), abs=1e-15)


def test_kl_between_posteriors_and_nll_match_torch_distributions():
    m1, lv1 = _params(1)
    m2, lv2 = _params(2)
    p, q = DiagonalGaussian(m1, lv1), DiagonalGaussian(m2, lv2)
    ref = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp())).sum(dim=(1, 2, 3))
    torch.testing.assert_close(p.kl(q), ref, rtol=1e-12, atol=1e-12)
    x = torch.randn_like(m1)
    nll_ref = -Normal(m1, (0.5 * lv1).exp()).log_prob(x).sum(dim=(1, 2, 3))
    torch.testing.assert_close(p.nll(x), nll_ref, rtol=1e-12, atol=1e-12)
    assert torch.all(p.kl(p).abs() < 1e-12)


def test_sampling_is_reparameterised_and_seeded():
    mean, logvar = _params(3)
    post = DiagonalGaussian(mean, logvar)
    a = post.sample(torch.Generator().manual_seed(7))
    b = post.sample(torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7), dtype=mean.dtype)
    torch.testing.assert_close(a, mean + (0.5 * logvar).exp() * noise)
    assert torch.equal(post.mode(), mean)
    # Many samples recover the mean and variance.
    big = DiagonalGaussian(torch.full((20000, 1), 2.0, dtype=torch.float64), torch.full((20000, 1), math.log(0.25), dtype=torch.float64))
    s = big.sample(torch.Generator().manual_seed(0))
    assert s.mean().item() == pytest.approx(2.0, abs=0.02)
    assert s.var().item() == pytest.approx(0.25, abs=0.01)


def test_from_parameters_splits_channels_and_clamps_logvar():
    params = torch.cat([torch.ones(2, 3, 4, 4), torch.full((2, 3, 4, 4), 100.0)], dim=1)
    post = DiagonalGaussian.from_parameters(params)
    assert post.mean.shape == (2, 3, 4, 4)
    assert torch.all(post.logvar == 20.0) and torch.isfinite(post.var).all()


def test_deterministic_posterior_has_zero_kl_and_returns_mean():
    mean = torch.randn(2, 8, 4, 4)
    post = DiagonalGaussian(mean)
    assert torch.equal(post.sample(), mean) and torch.equal(post.mode(), mean)
    assert torch.equal(post.kl(), torch.zeros(2))
    with pytest.raises(ValueError):
        post.nll(mean)
