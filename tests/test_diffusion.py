"""Noise schedules, forward noising and reverse-step maths against closed forms (docs/T2DIFF.md §6, §10)."""

import numpy as np
import pytest
import torch

from recbole_t2diff.errors import UsageError
from recbole_t2diff.model.diffusion import GaussianDiffusion, beta_schedule
from recbole_t2diff.model.unet import step_table


def test_exp_schedule_matches_the_spec_facts():
    betas = beta_schedule("exp", 50)
    s = np.arange(1, 51)
    np.testing.assert_allclose(betas, 0.01 * np.exp(4.5 * s / 50))
    alpha_bar = np.cumprod(1 - betas)
    assert betas[0] == pytest.approx(0.0109, abs=1e-4) and betas[-1] == pytest.approx(0.900, abs=1e-3)
    assert alpha_bar[9] == pytest.approx(0.843, abs=1e-3)
    assert alpha_bar[24] == pytest.approx(0.363, abs=1e-3)
    assert alpha_bar[49] == pytest.approx(1.8e-7, rel=0.05)


def test_linear_schedule_never_reaches_noise():
    betas = beta_schedule("linear", 50)
    assert betas[0] == pytest.approx(0.0104) and betas[-1] == pytest.approx(0.0202)
    assert np.prod(1 - betas) == pytest.approx(0.57, abs=0.01)


def test_log_schedule_hits_both_endpoints():
    betas = beta_schedule("log", 50)
    assert betas[0] == pytest.approx(0.002) and betas[-1] == pytest.approx(0.1)
    assert np.all(np.diff(betas) > 0)
    assert np.prod(1 - betas) == pytest.approx(0.019, abs=0.002)


def test_given_schedule_constants_replace_the_defaults():
    np.testing.assert_allclose(beta_schedule("exp", 4, 0.01, 1.0), 0.01 * np.exp(np.arange(1, 5) / 4), rtol=1e-12)
    log = beta_schedule("log", 5, 0.01, 0.3)
    assert log[0] == pytest.approx(0.01) and log[-1] == pytest.approx(0.3)
    np.testing.assert_allclose(beta_schedule("log", 2, 0.05, 0.2), [0.05, 0.2], rtol=1e-12)
    np.testing.assert_array_equal(beta_schedule("log", 1, 0.05, 0.2), [0.05])  # one step: β_1 = a


@pytest.mark.parametrize("name,a,b", [("linear", 0.0, 0.0), ("exp", 1.0, 0.0)])
def test_a_beta_of_exactly_0_or_1_is_rejected(name, a, b):
    """β = 0 adds no noise and β = 1 leaves nothing of the signal: both break the posterior's divisions."""
    with pytest.raises(UsageError, match="outside \\(0, 1\\)"):
        beta_schedule(name, 10, a, b)


@pytest.mark.parametrize("name,a,b", [("exp", 0.1, 4.5), ("linear", 2.0, 0.01), ("cosine", None, None)])
def test_bad_schedules_are_rejected_with_a_fix(name, a, b):
    with pytest.raises(UsageError, match="beta_schedule"):
        beta_schedule(name, 50, a, b)


def test_add_noise_uses_each_samples_own_step():
    diffusion = GaussianDiffusion(10)
    z0, noise = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    s = torch.tensor([1, 5, 10])
    z_s = diffusion.add_noise(z0, s, noise)
    alpha_bar = np.cumprod(1 - beta_schedule("exp", 10))
    for row, step in enumerate(s.tolist()):
        expected = np.sqrt(alpha_bar[step - 1]) * z0[row] + np.sqrt(1 - alpha_bar[step - 1]) * noise[row]
        torch.testing.assert_close(z_s[row], expected.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", ["exp", "linear", "log"])
def test_ddpm_step_is_the_gaussian_posterior(schedule):
    """c1·z0 + c2·z_s and σ² must equal the mean and variance of q(z_{s-1} | z_s, z0), derived here
    independently by conditioning the joint Gaussian of (z_{s-1}, z_s) given z0."""
    T = 20
    diffusion = GaussianDiffusion(T, schedule)
    betas = beta_schedule(schedule, T)
    alpha_bar = np.concatenate([[1.0], np.cumprod(1 - betas)])
    z0, z_s = np.array([0.7, -1.3]), np.array([0.2, 0.4])
    for s in range(2, T + 1):
        cov = np.sqrt(1 - betas[s - 1]) * (1 - alpha_bar[s - 1])
        var_prev, var_s = 1 - alpha_bar[s - 1], 1 - alpha_bar[s]
        mean = np.sqrt(alpha_bar[s - 1]) * z0 + cov / var_s * (z_s - np.sqrt(alpha_bar[s]) * z0)
        variance = var_prev - cov**2 / var_s
        got = diffusion.step(torch.tensor(z0).float(), torch.tensor(z_s).float(), s, torch.zeros(2))
        np.testing.assert_allclose(got.numpy(), mean, rtol=1e-4, atol=1e-6)
        assert diffusion.sigma[s].item() ** 2 == pytest.approx(variance, rel=1e-4)


def test_last_reverse_step_returns_the_estimate():
    diffusion = GaussianDiffusion(50)
    assert diffusion.coef_x0[1].item() == pytest.approx(1.0)
    assert diffusion.coef_zs[1].item() == 0.0 and diffusion.sigma[1].item() == 0.0


def test_official_coefficients_shrink_state_and_noise():
    ddpm, official = GaussianDiffusion(50, reverse_coef="ddpm"), GaussianDiffusion(50, reverse_coef="official")
    torch.testing.assert_close(official.coef_x0, ddpm.coef_x0)
    s = torch.arange(2, 51)
    torch.testing.assert_close(official.coef_zs[s], ddpm.coef_zs[s] * official.alphas_cumprod[s].sqrt() / (1 - official.betas[s]).sqrt())
    torch.testing.assert_close(official.sigma[s], ddpm.sigma[s] ** 2)
    assert torch.all(official.coef_zs[s] <= ddpm.coef_zs[s]) and torch.all(official.sigma[s] <= ddpm.sigma[s])
    with pytest.raises(UsageError, match="reverse_coef"):
        GaussianDiffusion(50, reverse_coef="ddim")


def test_reverse_chain_visits_every_step_downwards_and_ends_on_the_estimate():
    diffusion = GaussianDiffusion(7)
    seen, target = [], torch.full((2, 3, 4), 0.5)

    def denoise(z, s, final):
        seen.append((s, final))
        return target

    draws = []
    out = diffusion.reverse_chain(denoise, torch.randn(2, 3, 4), lambda shape: draws.append(shape) or torch.randn(shape))
    assert seen == [(7, False), (6, False), (5, False), (4, False), (3, False), (2, False), (1, True)]
    torch.testing.assert_close(out, target)
    assert draws == [(2, 3, 4)] * 6  # the last step returns the estimate and draws no noise (the RNG stream stays put)


def test_official_step_embedding_is_sin_of_s_over_powers_of_two():
    table = step_table("official", 50, 6)
    for s in (1, 17, 50):
        expected = [np.sin(s / 2.0**f) for f in range(6)]
        np.testing.assert_allclose(table[s].numpy(), expected, rtol=1e-6, atol=1e-7)
    sinusoidal = step_table("sinusoidal_mlp", 50, 6)
    assert sinusoidal.shape == (51, 6) and not torch.equal(sinusoidal, table)


def test_ddim_step_lists_spread_over_the_schedule():
    diffusion = GaussianDiffusion(50)
    assert diffusion.ddim_steps(1) == [50]
    assert diffusion.ddim_steps(2) == [50, 1]
    assert diffusion.ddim_steps(50) == list(range(50, 0, -1))
    for n in (3, 5, 10, 25):
        steps = diffusion.ddim_steps(n)
        assert len(set(steps)) == n and steps[0] == 50 and steps[-1] == 1 and steps == sorted(steps, reverse=True)
    with pytest.raises(UsageError, match="infer_steps=51"):
        diffusion.ddim_steps(51)


@pytest.mark.parametrize("schedule", ["exp", "linear", "log"])
def test_ddim_with_eta_1_and_every_step_is_the_ddpm_step(schedule):
    diffusion = GaussianDiffusion(30, schedule)
    torch.manual_seed(0)
    z0_hat, z_s, noise = torch.randn(2, 4, 3), torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    for s in range(2, 31):
        torch.testing.assert_close(diffusion.ddim_step(z0_hat, z_s, s, s - 1, 1.0, noise), diffusion.step(z0_hat, z_s, s, noise), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(diffusion.ddim_step(z0_hat, z_s, 1, 0, 1.0, noise), z0_hat)


def test_ddim_chain_with_every_step_and_eta_1_reproduces_the_ddpm_chain():
    diffusion = GaussianDiffusion(12)
    condition = torch.randn(2, 3, 4)

    def denoise(z, s, final):  # any deterministic function of (z, s)
        return torch.tanh(z * 0.5 + condition) / s

    def chain(sampler):
        generator = torch.Generator().manual_seed(5)
        draw = lambda shape: torch.randn(shape, generator=generator)  # noqa: E731
        z_T = draw(condition.shape)
        if sampler == "ddpm":
            return diffusion.reverse_chain(denoise, z_T, draw)
        return diffusion.ddim_chain(denoise, z_T, draw, 12, eta=1.0)

    torch.testing.assert_close(chain("ddim"), chain("ddpm"), rtol=1e-4, atol=1e-5)


def test_deterministic_ddim_calls_the_denoiser_once_per_step():
    diffusion = GaussianDiffusion(50)
    seen = []

    def denoise(z, s, final):
        seen.append((s, final))
        return torch.zeros_like(z)

    def no_noise(shape):
        raise AssertionError("eta = 0 must not draw noise")

    diffusion.ddim_chain(denoise, torch.randn(1, 2, 2), no_noise, 5, eta=0.0)
    assert seen == [(50, False), (38, False), (26, False), (13, False), (1, True)]  # the last call is told it is


def test_ddim_is_deterministic_unless_asked_for_noise():
    diffusion = GaussianDiffusion(10)
    draws = []
    z_T = torch.randn(2, 3, 4)

    def draw(shape):
        draws.append(shape)
        return torch.randn(shape)

    diffusion.ddim_chain(lambda z, s, final: torch.zeros_like(z), z_T, draw, 4)
    assert draws == [], "eta defaults to 0: no noise is drawn"


def test_the_schedule_constants_reach_the_schedule_and_no_table_is_saved():
    from recbole_t2diff.model.diffusion import beta_schedule

    diffusion = GaussianDiffusion(10, "linear", 0.001, 0.05)
    torch.testing.assert_close(diffusion.betas[1:].double(), torch.tensor(beta_schedule("linear", 10, 0.001, 0.05)), rtol=1e-6, atol=0)
    assert diffusion.betas[0] == 0 and len(diffusion.state_dict()) == 0  # derived from the knobs, not learned
