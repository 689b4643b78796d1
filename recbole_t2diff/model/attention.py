"""Mixed attention of the user tower (docs/T2DIFF.md §11): session self-attention and target attention.

Masks are boolean, True for a real item. Blocked logits get a large finite negative value rather
than -inf, so a row with nothing admissible stays finite.
"""

import torch
import torch.nn.functional as F
from torch import nn

NEG = -1e9


def masked_mean(x, mask):
    """Mean of ``x`` [..., M, d] over rows where ``mask`` [..., M] is True; 0 where no row is."""
    weights = mask.unsqueeze(-1).to(x.dtype)
    return (x * weights).sum(-2) / weights.sum(-2).clamp(min=1.0)


class SessionEncoder(nn.Module):
    """One post-LN Transformer layer over the session tokens, mean-pooled into h_s (Eq. 19).

    ``mask_diag``: a token does not attend to itself (official code), unless it has no other
    admissible key (a one-item session without x̂). ``mask_pads``: padded keys are blocked and the
    pooling skips padded tokens; off reproduces the official code, which masks neither.
    """

    def __init__(self, d, n_heads=2, ffn_hidden=(64,), mask_diag=True, mask_pads=True, eps=1e-8):
        super().__init__()
        self.n_heads, self.mask_diag, self.mask_pads = n_heads, mask_diag, mask_pads
        self.query, self.key, self.value, self.out = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.attention_norm = nn.LayerNorm(d, eps=eps)
        widths = [d] + list(ffn_hidden) + [d]
        self.ffn = nn.Sequential(
            *[nn.Sequential(nn.Linear(widths[i], widths[i + 1], bias=False), nn.ELU(), nn.LayerNorm(widths[i + 1], eps=eps)) for i in range(len(widths) - 1)]
        )
        self.ffn_norm = nn.LayerNorm(d, eps=eps)

    def forward(self, tokens, mask):
        """``tokens`` [B, K, d], ``mask`` [B, K] -> h_s [B, d]."""
        batch, length, d = tokens.shape

        def heads(x):
            return x.view(batch, length, self.n_heads, d // self.n_heads).transpose(1, 2)

        q, k, v = heads(self.query(tokens)), heads(self.key(tokens)), heads(self.value(tokens))
        logits = q @ k.transpose(-1, -2) / (d // self.n_heads) ** 0.5
        blocked = torch.zeros(batch, length, length, dtype=torch.bool, device=tokens.device)
        if self.mask_pads:
            blocked = blocked | ~mask[:, None, :]
        if self.mask_diag:
            diagonal = torch.eye(length, dtype=torch.bool, device=tokens.device)
            lonely = (blocked | diagonal).all(-1, keepdim=True)
            blocked = blocked | (diagonal & ~lonely)
        attention = logits.masked_fill(blocked[:, None], NEG).softmax(-1)
        mixed = (attention @ v).transpose(1, 2).reshape(batch, length, d)
        hidden = self.attention_norm(tokens + self.out(mixed))
        hidden = self.ffn_norm(hidden + self.ffn(hidden))
        return masked_mean(hidden, mask) if self.mask_pads else hidden.mean(1)


class TargetAttention(nn.Module):
    """DIN-style attention of h_s over the older history, giving h_l (Eq. 20-21).

    Scores come from [h_s, x_j, h_s - x_j, h_s ⊙ x_j]; the softmax runs over real items only
    (``mask_pads``), and a row with no older history gets h_l = 0.
    """

    def __init__(self, d, hidden=None, mask_pads=True, eps=1e-8):
        super().__init__()
        hidden = hidden or d
        self.mask_pads = mask_pads
        self.score = nn.Sequential(nn.Linear(4 * d, hidden, bias=False), nn.ELU(), nn.LayerNorm(hidden, eps=eps), nn.Linear(hidden, 1, bias=False))

    def forward(self, query, history, mask):
        """``query`` [B, d], ``history`` [B, M, d], ``mask`` [B, M] -> h_l [B, d]."""
        # The first layer on [q, x, q - x, q ⊙ x] equals (W_q + W_diff)·q + (W_x - W_diff)·x + W_prod·(q ⊙ x):
        # the query part is computed once per user, not once per history position (1.5x faster here).
        w_q, w_x, w_diff, w_prod = self.score[0].weight.split(query.size(-1), dim=1)
        hidden = F.linear(query, w_q + w_diff).unsqueeze(1) + F.linear(history, w_x - w_diff) + F.linear(query.unsqueeze(1) * history, w_prod)
        logits = self.score[1:](hidden).squeeze(-1)
        if not self.mask_pads:
            return (logits.softmax(-1).unsqueeze(-1) * history).sum(1)
        weights = logits.masked_fill(~mask, NEG).softmax(-1)
        has_history = mask.any(1, keepdim=True).to(history.dtype)
        return (weights.unsqueeze(-1) * history).sum(1) * has_history
