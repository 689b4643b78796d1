"""The denoiser: a 1-D U-Net over the sequence axis that predicts the clean drift ẑ_0 (spec §7-8).

Input rows are ``[z_s ; X]`` (noised drift joined channel-wise with the history it is conditioned
on) plus a step embedding; output rows are the estimated clean drift, one per sequence position.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recbole_t2diff.errors import UsageError

PADDINGS = ("valid", "same")
STEP_EMBEDDINGS = ("official", "sinusoidal_mlp")


@dataclass(frozen=True)
class UNetGeometry:
    """How a length-``length`` sequence is laid out for the U-Net.

    ``padded_length`` (L*) ≥ length: zero rows are prepended up to it (they are padding anyway in
    the right-aligned layout); ``mirror`` rows are then mirrored onto each side (``valid`` convs
    only), and ``crops[i]`` rows are cut from each side of skip connection i.
    """

    padded_length: int
    mirror: int
    crops: tuple


def unet_geometry(length, levels, padding="valid"):
    """Closed forms of spec §8 that make the U-Net's output exactly ``padded_length`` long.

    ``valid``: each k=3 conv drops 2 rows, so the input is mirror-padded by 3·2^(n-1) - 2 per side and
    skip i is cropped by 3·2^(n-1-i) - 4; the lengths only work out when (L* - 2) is a multiple of
    2^(n-1), and the mirror needs L* ≥ its own width. ``same``: L* is a multiple of 2^(n-1).
    """
    if padding not in PADDINGS:
        raise UsageError(f"unknown unet_padding '{padding}': use one of {', '.join(PADDINGS)}")
    stride = 2 ** (levels - 1)
    if padding == "same":
        return UNetGeometry(stride * math.ceil(length / stride), 0, (0,) * levels)
    mirror = 3 * stride - 2
    padded = 2 + stride * math.ceil((max(length, mirror) - 2) / stride)
    crops = tuple(3 * 2 ** (levels - 1 - i) - 4 for i in range(levels - 1)) + (0,)
    return UNetGeometry(padded, mirror, crops)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of a [B, C, L] tensor."""

    def forward(self, x):
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def _crop(x, rows):
    return x if rows == 0 else x[..., rows:-rows]


class UNet1d(nn.Module):
    """Conv1d U-Net on [B, L, in_channels] -> [B, L, channels[0]] (or ``out_channels`` with a projection)."""

    def __init__(self, in_channels, channels, padding="valid", out_channels=None, eps=1e-8):
        super().__init__()
        self.levels = len(channels)
        self.padding = padding
        conv_pad = 1 if padding == "same" else 0
        widths = [in_channels] + list(channels)
        self.down = nn.ModuleList(
            nn.Sequential(nn.Conv1d(widths[i], widths[i + 1], 3, padding=conv_pad), nn.SiLU(), ChannelLayerNorm(widths[i + 1], eps))
            for i in range(self.levels)
        )
        self.up = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv1d(channels[i + 1], channels[i], 1), nn.SiLU())
            for i in range(self.levels - 1)
        )
        self.merge = nn.ModuleList(
            nn.Sequential(nn.Conv1d(2 * channels[i], channels[i], 3, padding=conv_pad), nn.SiLU(), ChannelLayerNorm(channels[i], eps))
            for i in range(self.levels - 1)
        )
        self.out_proj = nn.Conv1d(channels[0], out_channels, 1) if out_channels is not None else None

    def forward(self, u):
        length = u.size(1)
        geometry = unet_geometry(length, self.levels, self.padding)
        x = F.pad(u.transpose(1, 2), (geometry.padded_length - length, 0))
        if geometry.mirror:  # NumPy "symmetric": the edge row is repeated, as in the official code
            m = geometry.mirror
            x = torch.cat([x[..., :m].flip(-1), x, x[..., -m:].flip(-1)], dim=-1)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool1d(x, 2))
            skips.append(x)
        for i in reversed(range(self.levels - 1)):
            x = self.merge[i](torch.cat([self.up[i](x), _crop(skips[i], geometry.crops[i])], dim=1))
        if self.out_proj is not None:
            x = self.out_proj(x)
        return x[..., -length:].transpose(1, 2)


def step_table(kind, n_steps, width):
    """[T+1, width] step features, row s for step s (row 0 unused).

    ``official``: sin(s / 2^f), f = 0..width-1 (no cosine); ``sinusoidal_mlp``: the usual sin/cos
    embedding with base 10000, fed to an MLP by :class:`Denoiser`.
    """
    s = np.arange(n_steps + 1, dtype=np.float64)[:, None]
    if kind == "official":
        table = np.sin(s / 2.0 ** np.arange(width, dtype=np.float64))
    else:
        half = width // 2
        freqs = np.exp(-np.log(10000.0) * np.arange(half, dtype=np.float64) / half)
        table = np.concatenate([np.sin(s * freqs), np.cos(s * freqs)], axis=1)
        table = np.pad(table, ((0, 0), (0, width - 2 * half)))
    return torch.tensor(table, dtype=torch.float32)


class Denoiser(nn.Module):
    """ẑ_0 = UNet([z_s ; X] + step embedding(s)): the x_0-predicting approximator of Fig. 2b."""

    def __init__(self, d, n_steps, levels=4, mult=(1, 2, 4, 8), padding="valid", out_proj=False,
                 step_emb="official", step_emb_scale=0.01, eps=1e-8):
        super().__init__()
        if step_emb not in STEP_EMBEDDINGS:
            raise UsageError(f"unknown step_emb '{step_emb}': use one of {', '.join(STEP_EMBEDDINGS)}")
        self.register_buffer("steps", step_table(step_emb, n_steps, 2 * d), persistent=False)
        if step_emb == "official":  # fixed, scaled and added: the U-Net's only step conditioning
            self.step_mlp, self.step_scale = None, step_emb_scale
        else:
            self.step_mlp = nn.Sequential(nn.Linear(2 * d, 2 * d), nn.SiLU(), nn.Linear(2 * d, 2 * d))
            self.step_scale = 1.0
        self.unet = UNet1d(2 * d, [d * m for m in mult[:levels]], padding, d if out_proj else None, eps)

    def forward(self, z_s, condition, s):
        """``z_s``, ``condition``: [B, L, d]; ``s``: [B] steps (1-based). Returns ẑ_0 [B, L, d]."""
        step = self.steps[s]
        if self.step_mlp is not None:
            step = self.step_mlp(step)
        return self.unet(torch.cat([z_s, condition], dim=-1) + self.step_scale * step[:, None, :])
