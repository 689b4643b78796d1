"""SparCode's product quantizer: M codebooks of N codewords, shared by every query token (docs/SPARCODE.md §5).

A token z_e [d_t] is split into M sub-vectors; each takes its nearest codeword (L2, ties to the
lowest index) and the code tuple x = (x_1..x_M) names the token's codeword, with the integer key
Σ_m x_m·N^{M-1-m}. Codewords follow an exponential moving average of the sub-vectors assigned to
them (γ, Laplace smoothing ε), and dead codes are restarted on random sub-vectors of the current
batch. A code is dead when it is used less than ``dead_code_threshold`` × the mean: its EMA count fell
below that share of the mean count, or it went unassigned for as many steps as a code used at that
rate needs to be assigned once in expectation. The second test fires from the first steps: the EMA
count of an unused code only reaches 1 % of its start after log(0.01)/log(γ) ≈ 458 steps at γ = 0.99,
more than an ml-100k epoch, while a collapsing codebook loses most of its codes within 40 steps.

Why not vector-quantize-pytorch: its ``VectorQuantize`` updates the EMA whenever the module is in
training mode, while here the update belongs to ``calculate_loss`` only (a ``predict`` call in
training mode must not move a codeword); its dead-code threshold is an absolute count, and a
restarted code gets that count rather than the mean count; and the index needs the raw codes, the
key arithmetic and the codewords as plain buffers (docs/SPARCODE.md §10). What is left is ~100 lines.
"""

import math

import torch
from torch import nn


class ProductQuantizer(nn.Module):
    """EMA product quantizer; codewords, counts, sums and the ``initialised`` flag are buffers.

    Buffers, not parameters: no optimiser or weight decay touches them, and checkpoints save them.
    """

    def __init__(self, dim, n_codebooks, codebook_size, decay=0.99, eps=1e-5, dead_code_threshold=0.01):
        super().__init__()
        self.dim, self.n_codebooks, self.codebook_size = dim, n_codebooks, codebook_size
        self.sub_dim = dim // n_codebooks
        self.decay, self.eps, self.dead_code_threshold = decay, eps, dead_code_threshold
        self.register_buffer("codewords", torch.zeros(n_codebooks, codebook_size, self.sub_dim))
        self.register_buffer("counts", torch.zeros(n_codebooks, codebook_size))
        self.register_buffer("sums", torch.zeros(n_codebooks, codebook_size, self.sub_dim))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))  # codes restarted so far (diagnostic)
        # Steps since each code was last assigned. Not saved: checkpoints written before it still load,
        # and a reloaded model merely waits one patience longer before its first restart.
        self.register_buffer("idle", torch.zeros(n_codebooks, codebook_size, dtype=torch.long), persistent=False)
        radix = codebook_size ** torch.arange(n_codebooks - 1, -1, -1, dtype=torch.long)
        self.register_buffer("radix", radix, persistent=False)

    @property
    def n_keys(self):
        return self.codebook_size**self.n_codebooks

    def split(self, z):
        """[..., d_t] -> [M, R, d_t/M], the sub-vectors of all R tokens per codebook."""
        return z.reshape(-1, self.n_codebooks, self.sub_dim).transpose(0, 1)

    @torch.no_grad()
    def assign(self, z):
        """Codes [..., M] of tokens z [..., d_t]: per codebook argmin of ‖z‖² − 2z·c + ‖c‖² (first index on ties),
        in float32 even under autocast: bfloat16 distances would tie or misorder nearby codewords."""
        parts = self.split(z.to(self.codewords.dtype))
        with torch.autocast(z.device.type, enabled=False):
            distances = torch.baddbmm(self.codewords.pow(2).sum(-1).unsqueeze(1), parts, self.codewords.transpose(1, 2), alpha=-2.0) + parts.pow(2).sum(
                -1, keepdim=True
            )
        return distances.argmin(-1).t().reshape(*z.shape[:-1], self.n_codebooks)

    def lookup(self, codes):
        """Codewords [..., d_t] of codes [..., M]; ``index_select`` copies, so a later in-place update
        of the buffers cannot invalidate what autograd saved."""
        flat = codes.reshape(-1, self.n_codebooks)
        parts = [self.codewords[m].index_select(0, flat[:, m]) for m in range(self.n_codebooks)]
        return torch.cat(parts, dim=-1).reshape(*codes.shape[:-1], self.dim)

    def keys(self, codes):
        """Integer keys [...] of code tuples [..., M]: x_1·N^{M-1} + ... + x_M."""
        return (codes * self.radix).sum(-1)

    def codes(self, keys):
        """The inverse of :meth:`keys`."""
        return (keys.unsqueeze(-1) // self.radix) % self.codebook_size

    @torch.no_grad()
    def seed(self, z):
        """Data initialisation before the first assignment: every code starts on a batch sub-vector.
        Cast to the codewords' dtype: under autocast the tokens may be bfloat16, the buffers stay float32."""
        parts = self.split(z.detach().to(self.codewords.dtype))
        mean_count = parts.size(1) / self.codebook_size
        for m in range(self.n_codebooks):
            self._restart(m, torch.ones(self.codebook_size, dtype=torch.bool, device=z.device), parts[m], mean_count)
        self.initialised.fill_(True)

    @torch.no_grad()
    def update(self, z, codes):
        """One EMA step on the detached tokens z [..., d_t] and their codes, then dead-code restarts."""
        parts = self.split(z.detach().to(self.codewords.dtype))
        flat_codes = codes.reshape(-1, self.n_codebooks).t()  # [M, R]
        assigned = torch.zeros(self.n_codebooks, self.codebook_size, device=z.device).scatter_add_(
            1, flat_codes, torch.ones_like(flat_codes, dtype=torch.float)
        )
        summed = torch.zeros_like(self.sums).scatter_add_(1, flat_codes.unsqueeze(-1).expand(-1, -1, self.sub_dim), parts)
        self.idle.add_(1).masked_fill_(assigned > 0, 0)
        self.counts.mul_(self.decay).add_(assigned, alpha=1 - self.decay)
        self.sums.mul_(self.decay).add_(summed, alpha=1 - self.decay)
        total = self.counts.sum(-1, keepdim=True)
        smoothed = (self.counts + self.eps) / (total + self.codebook_size * self.eps) * total
        self.codewords.copy_(self.sums / smoothed.unsqueeze(-1))
        if self.dead_code_threshold > 0:
            mean_count = parts.size(1) / self.codebook_size  # the steady-state EMA count of a code
            patience = self.patience(parts.size(1))
            dead = (self.counts < self.dead_code_threshold * mean_count) | (self.idle >= patience)
            for m in range(self.n_codebooks):
                if dead[m].any():
                    self._restart(m, dead[m], parts[m], mean_count)
                    self.restarts.add_(int(dead[m].sum()))
            self.idle.masked_fill_(dead, 0)

    def patience(self, n_vectors):
        """Unassigned steps after which a code is dead: a code used at ``dead_code_threshold`` × the mean
        rate (n_vectors / N per step) is assigned once in this many steps in expectation; at least 1."""
        return max(1, math.ceil(self.codebook_size / (self.dead_code_threshold * n_vectors)))

    def _restart(self, m, dead, vectors, mean_count):
        """Codes ``dead`` of codebook m take random rows of ``vectors`` (tiled with small noise when
        there are fewer rows than codes), with the mean count, so codeword = that row."""
        n_dead = int(dead.sum())
        if len(vectors) < n_dead:
            repeats = math.ceil(n_dead / len(vectors))
            noise = torch.rand(len(vectors) * repeats, self.sub_dim, device=vectors.device) * (0.01 / math.sqrt(self.sub_dim))
            vectors = vectors.repeat(repeats, 1) + noise
        chosen = vectors[torch.randperm(len(vectors), device=vectors.device)[:n_dead]]
        self.codewords[m, dead] = chosen
        self.counts[m, dead] = mean_count
        self.sums[m, dead] = chosen * mean_count


class CodeTally:
    """Code usage over many batches (docs/SPARCODE.md §5 diagnostics): per-codebook assignment counts, distinct
    keys and the relative quantization error Σ‖z_e − z_q‖² / Σ‖z_e‖². Plain tensors, never saved."""

    def __init__(self, quantizer):
        self.quantizer = quantizer
        self.counts = None  # [M, N], allocated on the first batch's device
        self.keys = []  # distinct keys per batch, merged now and then to bound the memory
        self.squared_error = self.squared_norm = 0.0  # tensors once added to: no device sync per batch
        self.tokens = 0
        # The quantizer's restart count when the first batch came: the epoch's restarts are the count's growth since,
        # also in the first epoch of a resumed run, whose loaded count holds every restart before it.
        self.restarts_before = None

    @torch.no_grad()
    def add(self, tokens, codes, quantized):
        """Tokens z_e [..., d_t], their codes [..., M] and codewords z_q [..., d_t]."""
        flat = codes.reshape(-1, self.quantizer.n_codebooks).t()
        if self.counts is None:
            self.counts = torch.zeros(self.quantizer.n_codebooks, self.quantizer.codebook_size, dtype=torch.long, device=flat.device)
            self.restarts_before = self.quantizer.restarts.clone()
        self.counts.scatter_add_(1, flat, torch.ones_like(flat))
        self.keys.append(torch.unique(self.quantizer.keys(flat.t())))
        if len(self.keys) >= 64:
            self.keys = [torch.unique(torch.cat(self.keys))]
        tokens = tokens.detach().float()
        self.squared_error = self.squared_error + (tokens - quantized.detach().float()).pow(2).sum()
        self.squared_norm = self.squared_norm + tokens.pow(2).sum()
        self.tokens += flat.size(1)

    def stats(self):
        """{usage, perplexity: one value per codebook, distinct_keys, relative_error, tokens}: usage is the
        share of the N codes assigned at least once, perplexity exp(entropy) of their assignment shares
        (N when uniform, 1 when one code takes all)."""
        counts = self.counts if self.counts is not None else torch.zeros(self.quantizer.n_codebooks, self.quantizer.codebook_size)
        shares = counts.double() / counts.sum(-1, keepdim=True).clamp(min=1)
        entropy = -(shares * shares.clamp(min=1e-300).log()).sum(-1)
        return {
            "usage": (counts > 0).double().mean(-1).tolist(),
            "perplexity": entropy.exp().tolist(),
            "distinct_keys": int(torch.unique(torch.cat(self.keys)).numel()) if self.keys else 0,
            "relative_error": float(self.squared_error / self.squared_norm) if self.tokens else 0.0,
            "tokens": self.tokens,
        }


def describe_codes(stats, quantizer):
    """One log line's worth of :meth:`SparCode.code_stats`."""
    usage = "/".join(f"{share:.0%}" for share in stats["usage"])
    perplexity = "/".join(f"{value:.1f}" for value in stats["perplexity"])
    return (
        f"usage {usage} of {quantizer.codebook_size} codes per codebook, perplexity {perplexity}, "
        f"{stats['distinct_keys']} distinct keys, relative quantization error {stats['relative_error']:.3f}"
    )
