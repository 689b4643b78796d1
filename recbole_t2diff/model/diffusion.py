"""Gaussian diffusion over drift sequences: noise schedules, forward noising and reverse samplers.

Like a diffusers scheduler this object holds the maths and no network (docs/T2DIFF.md §6, §10): ``add_noise``
draws z_s ~ q(z_s | z_0); ``step`` takes one ancestral DDPM step of p(z_{s-1} | z_s, ẑ_0) for an
x_0-predicting denoiser and ``reverse_chain`` runs all T of them; ``ddim_step`` / ``ddim_chain``
jump between any two steps (DDIM), so inference can use far fewer denoiser calls than training.
Steps are 1-based, s ∈ {1..T}; index 0 of every table is the clean state (ᾱ_0 = 1).
"""

import numpy as np
import torch
from torch import nn

from recbole_t2diff.errors import UsageError

# (beta_a, beta_b) per schedule when the config leaves them at ~ (docs/T2DIFF.md §6).
SCHEDULE_DEFAULTS = {"exp": (0.01, 4.5), "linear": (0.02, 0.01), "log": (0.002, 0.1)}
REVERSE_COEFS = ("ddpm", "official")
SAMPLERS = ("ddpm", "ddim")


def beta_schedule(name, n_steps, beta_a=None, beta_b=None):
    """β_1..β_T in float64.

    - ``exp``: a·exp(b·s/T) (the paper's schedule, official constants);
    - ``linear``: a·s/T + b/s ("truncated linear");
    - ``log``: A·ln(B·s) rising from β_1 = a to β_T = b.
    """
    if name not in SCHEDULE_DEFAULTS:
        raise UsageError(f"unknown beta_schedule '{name}': use one of {', '.join(SCHEDULE_DEFAULTS)}")
    default_a, default_b = SCHEDULE_DEFAULTS[name]
    a = default_a if beta_a is None else float(beta_a)
    b = default_b if beta_b is None else float(beta_b)
    s = np.arange(1, n_steps + 1, dtype=np.float64)
    if name == "exp":
        betas = a * np.exp(b * s / n_steps)
    elif name == "linear":
        betas = a * s / n_steps + b / s
    elif n_steps == 1:
        betas = np.array([a])
    else:
        scale = (b - a) / np.log(n_steps)
        betas = scale * np.log(np.exp(a / scale) * s)
    if not np.all((betas > 0) & (betas < 1)):
        raise UsageError(
            f"beta_schedule '{name}' with beta_a={a}, beta_b={b}, n_steps={n_steps} gives betas in "
            f"[{betas.min():.4g}, {betas.max():.4g}], outside (0, 1): choose other beta_a/beta_b"
        )
    return betas


class GaussianDiffusion(nn.Module):
    """Noise schedule and sampler for an x_0-predicting denoiser (no learnable parameters)."""

    def __init__(self, n_steps, schedule="exp", beta_a=None, beta_b=None, reverse_coef="ddpm"):
        super().__init__()
        if reverse_coef not in REVERSE_COEFS:
            raise UsageError(f"unknown reverse_coef '{reverse_coef}': use one of {', '.join(REVERSE_COEFS)}")
        self.n_steps = n_steps
        betas = np.concatenate([[0.0], beta_schedule(schedule, n_steps, beta_a, beta_b)])
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
        # Index 0 is never a reverse step; 1 there keeps the divisions finite.
        one_minus = np.where(np.arange(n_steps + 1) == 0, 1.0, 1.0 - alphas_cumprod)
        posterior_variance = betas * (1.0 - prev) / one_minus  # β̃_s
        coef_x0 = np.sqrt(prev) * betas / one_minus
        if reverse_coef == "ddpm":  # DDPM posterior mean and std (paper Eq. 5-6)
            coef_zs = np.sqrt(alphas) * (1.0 - prev) / one_minus
            sigma = np.sqrt(posterior_variance)
        else:  # the official code: sqrt(ᾱ_s) for sqrt(α_s), β̃_s for its square root (docs/T2DIFF.md §16.5)
            coef_zs = np.sqrt(alphas_cumprod) * (1.0 - prev) / one_minus
            sigma = posterior_variance
        tables = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "coef_x0": coef_x0,
            "coef_zs": coef_zs,
            "sigma": sigma,
        }
        for name, table in tables.items():
            self.register_buffer(name, torch.tensor(table, dtype=torch.float32), persistent=False)

    def add_noise(self, z0, s, noise):
        """z_s = sqrt(ᾱ_s)·z_0 + sqrt(1-ᾱ_s)·ε for per-sample steps ``s`` [B] (1-based)."""
        alpha_bar = self.alphas_cumprod[s].view(-1, *([1] * (z0.dim() - 1)))
        return alpha_bar.sqrt() * z0 + (1.0 - alpha_bar).sqrt() * noise

    def step(self, z0_hat, z_s, s, noise):
        """z_{s-1} from z_s and the denoiser's ẑ_0 at step ``s`` (an int); at s = 1 it returns ẑ_0."""
        return self.coef_x0[s] * z0_hat + self.coef_zs[s] * z_s + self.sigma[s] * noise

    def reverse_chain(self, denoise, z_T, draw_noise):
        """Ancestral sampling from z_T down to z_0.

        ``denoise(z_s, s, final)`` returns ẑ_0; ``final`` is True on the last call, whose ẑ_0 the chain
        returns as it is (so a caller that reads only some of its rows may compute only those).
        ``draw_noise(shape)`` returns standard normal noise, so the caller decides which random generator
        the chain uses.
        """
        z = z_T
        for s in range(self.n_steps, 0, -1):
            z0_hat = denoise(z, s, s == 1)
            z = z0_hat if s == 1 else self.step(z0_hat, z, s, draw_noise(z.shape))
        return z

    def ddim_steps(self, n):
        """``n`` steps spread evenly over 1..T, in descending order (T always included)."""
        if not 1 <= n <= self.n_steps:
            raise UsageError(f"invalid infer_steps={n}: it must lie between 1 and n_steps={self.n_steps}")
        if n == 1:
            return [self.n_steps]
        return [round(1 + (self.n_steps - 1) * i / (n - 1)) for i in reversed(range(n))]

    def ddim_step(self, z0_hat, z_s, s, s_prev, eta, noise):
        """Jump from step ``s`` to ``s_prev`` < s (0 = clean) given ẑ_0 (Song et al., DDIM Eq. 12).

        The noise direction is the ε implied by z_s and ẑ_0; ``eta`` scales the fresh noise
        (0: deterministic; 1 with s_prev = s - 1: exactly the DDPM ancestral step).
        """
        if s_prev == 0:
            return z0_hat
        alpha_bar, alpha_bar_prev = self.alphas_cumprod[s], self.alphas_cumprod[s_prev]
        eps = (z_s - alpha_bar.sqrt() * z0_hat) / (1.0 - alpha_bar).sqrt()
        sigma = eta * ((1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev)).sqrt()
        out = alpha_bar_prev.sqrt() * z0_hat + (1.0 - alpha_bar_prev - sigma**2).clamp(min=0.0).sqrt() * eps
        return out + sigma * noise if eta else out

    def ddim_chain(self, denoise, z_T, draw_noise, n_steps, eta=0.0):
        """DDIM sampling with ``n_steps`` denoiser calls; ``denoise`` and ``draw_noise`` as in ``reverse_chain``."""
        steps = self.ddim_steps(n_steps)
        z = z_T
        for s, s_prev in zip(steps, steps[1:] + [0]):
            z0_hat = denoise(z, s, s_prev == 0)
            z = self.ddim_step(z0_hat, z, s, s_prev, eta, draw_noise(z.shape) if eta and s_prev else None)
        return z
