"""The denoiser: a 1-D U-Net over the sequence axis that predicts the clean drift ẑ_0 (docs/T2DIFF.md §7-8).

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
STEP_CONDITIONINGS = ("input", "film")


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
    """Closed forms of docs/T2DIFF.md §8 that make the U-Net's output exactly ``padded_length`` long.

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


class RowConv(nn.Conv1d):
    """A Conv1d along the sequence of [B, L, C] rows, giving [B, L - k + 1, C_out] rows; it never pads (the U-Net pads
    the rows it hands it). The parameters, and so checkpoints, are a Conv1d's.

    A batch runs as the equal 1 x k Conv2d on the rows' channels-last view ([B, C, 1, L], the same memory), so no
    transpose copies anything and the norms read each row's channels in place: a training step's blocks ran 29%
    faster than a Conv1d U-Net's, which transposes around every norm (docs/T2DIFF.md §8). One sequence alone
    (serving one user) is a matmul over its rows' windows instead: there torch's convolution copies the whole
    weight on every call, and the matmul took a third of its time."""

    def forward(self, rows):
        if len(rows) == 1:
            windows = rows.unfold(1, self.kernel_size[0], 1).flatten(2)  # [1, L - k + 1, C * k], the weight's order
            return F.linear(windows, self.weight.flatten(1), self.bias)
        out = F.conv2d(rows.transpose(1, 2).unsqueeze(2), self.weight.unsqueeze(2), self.bias)
        return out.squeeze(2).transpose(1, 2)


class RowUpsample(nn.Module):
    """Nearest-neighbour x2 upsampling of [B, L, C] rows: row j becomes rows 2j and 2j + 1."""

    def forward(self, rows):
        return rows.repeat_interleave(2, dim=1)


def pool_rows(rows):
    """Pairwise max-pooling of [B, L, C] rows (an odd last row is dropped), on their channels-last view."""
    return F.max_pool2d(rows.transpose(1, 2).unsqueeze(2), (1, 2)).squeeze(2).transpose(1, 2)


class UNet1d(nn.Module):
    """Conv1d U-Net on [B, L, in_channels] -> [B, L, channels[0]] (or ``out_channels`` with a projection).

    Every layer reads and writes rows, [B, L, C] (:class:`RowConv`): the norms are plain LayerNorms over each
    row's channels, and nothing is transposed on the way in or out.

    With ``film_dim``, every block's output is modulated as x·(1 + γ) + β, with (γ, β) a linear map of
    a per-sample conditioning vector (the step embedding): conditioning that every level sees, rather
    than a small offset added once to the input (FiLM, Perez et al. 2018). The maps start at zero, so an
    untrained FiLM U-Net computes what the plain one does; an owner that re-initialises every Linear
    calls ``zero_film`` after it.

    Every layer is local along the sequence (k=3 convolutions, pairwise max-pooling, nearest upsampling,
    1x1 convolutions, per-row norms), so ``forward(..., rows=r)`` computes the last r output rows from the
    rows they depend on alone (docs/T2DIFF.md §8): serving reads one row, x̂'s, and at 4 levels over 50 rows
    that cone is about a quarter of the U-Net's work.
    """

    def __init__(self, in_channels, channels, padding="valid", out_channels=None, eps=1e-8, film_dim=None):
        super().__init__()
        self.levels = len(channels)
        self.padding = padding
        # The convolutions themselves never pad: forward pads the rows it hands them (zeros at the
        # sequence's edges for "same"), so a slice of the sequence is convolved as the whole one is.
        self.conv_pad = 1 if padding == "same" else 0
        widths = [in_channels] + list(channels)
        self.down = nn.ModuleList(nn.Sequential(RowConv(widths[i], widths[i + 1], 3), nn.SiLU(), nn.LayerNorm(widths[i + 1], eps)) for i in range(self.levels))
        self.up = nn.ModuleList(nn.Sequential(RowUpsample(), RowConv(channels[i + 1], channels[i], 1), nn.SiLU()) for i in range(self.levels - 1))
        self.merge = nn.ModuleList(
            nn.Sequential(RowConv(2 * channels[i], channels[i], 3), nn.SiLU(), nn.LayerNorm(channels[i], eps)) for i in range(self.levels - 1)
        )
        self.out_proj = RowConv(channels[0], out_channels, 1) if out_channels is not None else None
        self.film_down = self.film_merge = None
        if film_dim is not None:
            self.film_down = nn.ModuleList(nn.Linear(film_dim, 2 * c) for c in channels)
            self.film_merge = nn.ModuleList(nn.Linear(film_dim, 2 * c) for c in channels[:-1])
            self.zero_film()

    def zero_film(self):
        """Sets every FiLM map to zero: γ = β = 0, each level passes its input unmodulated."""
        for layer in [*(self.film_down or []), *(self.film_merge or [])]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @staticmethod
    def _modulate(x, film, condition):
        if film is None:
            return x
        gamma, beta = film(condition).unsqueeze(1).chunk(2, dim=-1)
        return x * (1.0 + gamma) + beta

    def _first_input_row(self, first):
        """The first input row a k=3 block reads for its output rows from ``first`` on (the "same" padding's
        zero row before the input when that is -1: it is not one of the input's rows)."""
        return max(first - self.conv_pad, 0)

    def _block(self, block, x, start, first):
        """``block``'s output rows from ``first`` to the end, from ``x``: its input's rows from ``start`` to the
        end, zero-padded past the input's edges for "same"."""
        x = x[:, self._first_input_row(first) - start :]
        if self.conv_pad:
            x = F.pad(x, (0, 0, max(self.conv_pad - first, 0), self.conv_pad))
        return block(x)

    def _first_rows(self, length, crops, rows):
        """The first output row each block computes, every one up to its end, so that the last ``rows`` output
        rows come out: (down blocks' input lengths, their first rows, merge blocks' input lengths, their first
        rows). Only the last rows are ever asked for, so each block's rows run to its end."""
        down_in, n = [], length
        for i in range(self.levels):
            n = n if i == 0 else n // 2
            down_in.append(n)
            n = n + 2 * self.conv_pad - 2
        merge_in = [0] * (self.levels - 1)
        for i in reversed(range(self.levels - 1)):
            merge_in[i] = 2 * n
            n = 2 * n + 2 * self.conv_pad - 2
        down_first, merge_first, skip_first = [0] * self.levels, [0] * (self.levels - 1), [None] * self.levels
        wanted = n - rows
        for i in range(self.levels - 1):  # from the output down the merge path
            merge_first[i] = wanted
            first = self._first_input_row(wanted)
            skip_first[i] = first + crops[i]
            wanted = first // 2  # nearest upsampling: up row j is row j // 2 below
        for i in reversed(range(self.levels)):  # from the deepest level up: what the level below and the skip need
            down_first[i] = wanted if skip_first[i] is None else min(wanted, skip_first[i])
            wanted = 2 * self._first_input_row(down_first[i])  # pooling: row j is the max of rows 2j, 2j + 1
        return down_in, down_first, merge_in, merge_first

    def forward(self, u, condition=None, rows=None):
        """``u`` [B, L, in_channels]; ``condition`` [B, film_dim] when the U-Net was built with FiLM.

        Returns the output rows [B, L, C], or with ``rows`` the last ``rows`` of them [B, rows, C], computed
        from the rows they depend on alone.
        """
        length = u.size(1)
        geometry = unet_geometry(length, self.levels, self.padding)
        x = F.pad(u, (0, 0, geometry.padded_length - length, 0))
        if geometry.mirror:  # NumPy "symmetric": the edge row is repeated, as in the official code
            m = geometry.mirror
            x = torch.cat([x[:, :m].flip(1), x, x[:, -m:].flip(1)], dim=1)
        # Without ``rows`` every row is computed (the zero rows prepended up to padded_length too), so
        # training runs the very operations the whole sequence always ran.
        down_in, down_first, merge_in, merge_first = self._first_rows(x.size(1), geometry.crops, rows or geometry.padded_length)
        skips, start = [], 0  # skips[i]: (level i's rows from its first computed one to the end, that row's number)
        for i, block in enumerate(self.down):
            if i:
                below, below_start = skips[i - 1]
                start = self._first_input_row(down_first[i])
                x = pool_rows(below[:, 2 * start - below_start :])  # an odd last row is dropped, as in the whole sequence
            x = self._modulate(self._block(block, x, start, down_first[i]), self.film_down and self.film_down[i], condition)
            skips.append((x, down_first[i]))
        x, start = skips[-1]
        for i in reversed(range(self.levels - 1)):
            first = self._first_input_row(merge_first[i])
            up = self.up[i](x[:, first // 2 - start :])[:, first % 2 :]
            skip, skip_start = skips[i]
            skip = skip[:, first + geometry.crops[i] - skip_start : skip.size(1) - geometry.crops[i]]
            x = self._block(self.merge[i], torch.cat([up, skip], dim=-1), first, merge_first[i])
            x = self._modulate(x, self.film_merge and self.film_merge[i], condition)
            start = merge_first[i]
        if self.out_proj is not None:
            x = self.out_proj(x)
        return x[:, -(rows or length) :]


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
    """ẑ_0 = UNet([z_s ; X], step s): the x_0-predicting approximator of Fig. 2b.

    ``step_conditioning``: ``input`` adds the scaled step embedding to every input row [C];
    ``film`` feeds it to a scale and shift at every U-Net level instead.

    ``next_slot``: the official layout puts the drift into the next item (the row behind x̂) at the
    last history row, whose mirror-padded right edge repeats x_L; a U-Net that learned the
    neighbour difference X_{j+1} - X_j of the other rows then outputs x_L - x_L = 0 there, so x̂ ≈ x_L.
    With ``next_slot`` the condition gets one more row, a learned query standing where the next item
    will be, and drift j is laid out on the row of the item it leads to: the next item's drift sits
    on the query row and cannot be read off a padded edge.
    """

    def __init__(
        self,
        d,
        n_steps,
        *,
        levels=4,
        mult=(1, 2, 4, 8),
        padding="valid",
        out_proj=False,
        step_emb="official",
        step_emb_scale=0.01,
        eps=1e-8,
        step_conditioning="input",
        next_slot=False,
    ):
        super().__init__()
        if step_emb not in STEP_EMBEDDINGS:
            raise UsageError(f"unknown step_emb '{step_emb}': use one of {', '.join(STEP_EMBEDDINGS)}")
        if step_conditioning not in STEP_CONDITIONINGS:
            raise UsageError(f"unknown step_conditioning '{step_conditioning}': use one of {', '.join(STEP_CONDITIONINGS)}")
        self.register_buffer("steps", step_table(step_emb, n_steps, 2 * d), persistent=False)
        if step_emb == "official":  # fixed sin(s / 2^f) [C]
            self.step_mlp, self.step_scale = None, step_emb_scale
        else:
            self.step_mlp = nn.Sequential(nn.Linear(2 * d, 2 * d), nn.SiLU(), nn.Linear(2 * d, 2 * d))
            self.step_scale = 1.0
        self.film = step_conditioning == "film"
        self.slot = nn.Parameter(torch.zeros(d)) if next_slot else None
        self.unet = UNet1d(2 * d, [d * m for m in mult[:levels]], padding, d if out_proj else None, eps, film_dim=2 * d if self.film else None)

    def forward(self, z_s, condition, s, rows=None):
        """``z_s``, ``condition``: [B, L, d]; ``s``: [B] steps (1-based). Returns ẑ_0 [B, L, d], or its last
        ``rows`` rows [B, rows, d] computed alone (:class:`UNet1d`)."""
        length = z_s.size(1)
        step = self.steps[s]
        if self.step_mlp is not None:
            step = self.step_mlp(step)
        if self.slot is not None:  # row j + 1 holds the drift into item j + 1; the last row is the query slot
            condition = torch.cat([condition, self.slot.expand(len(condition), 1, -1)], dim=1)
            z_s = torch.cat([z_s.new_zeros(len(z_s), 1, z_s.size(-1)), z_s], dim=1)
        u = torch.cat([z_s, condition], dim=-1)
        if self.film:  # FiLM reads the step features unscaled: its own zero-initialised maps set the scale
            z0_hat = self.unet(u, step, rows=rows)
        else:
            z0_hat = self.unet(u + self.step_scale * step[:, None, :], rows=rows)
        return z0_hat[:, -(rows or length) :]  # with the slot, its extra first row goes


class NextItemDenoiser(nn.Module):
    """x̂_0 = MLP([x_s ; c ; step(s)]) for the next item's token alone (DreamRec, Yang et al., NeurIPS 2023).

    ``c`` [B, d] is the condition (the tower's encoding of the history); where ``dropped`` it is replaced by a
    learned null vector, so one network learns the conditional and the unconditional estimate that
    classifier-free guidance combines at inference.
    """

    def __init__(self, d, n_steps, eps=1e-8):
        super().__init__()
        self.register_buffer("steps", step_table("sinusoidal_mlp", n_steps, d), persistent=False)
        self.null_condition = nn.Parameter(torch.zeros(d))
        self.mlp = nn.Sequential(nn.Linear(3 * d, 2 * d), nn.SiLU(), nn.LayerNorm(2 * d, eps=eps), nn.Linear(2 * d, d))

    def forward(self, x_s, condition, s, dropped=None):
        """``x_s``, ``condition``: [B, d]; ``s``: [B] steps (1-based); ``dropped``: [B] bool or None. Returns x̂_0 [B, d]."""
        if dropped is not None:
            condition = torch.where(dropped[:, None], self.null_condition.expand_as(condition), condition)
        return self.mlp(torch.cat([x_s, condition, self.steps[s]], dim=-1))
