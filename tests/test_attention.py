"""The user tower's mixed attention (attention.py, docs/T2DIFF.md §11): session self-attention against a per-head
reference under the diagonal and padding masks, and target attention as the DIN scorer over the real older rows only.
"""

import pytest
import torch

from recbole_t2diff.model.attention import SessionEncoder, TargetAttention, masked_mean


def test_session_encoder_ignores_padded_tokens():
    torch.manual_seed(0)
    encoder = SessionEncoder(8, n_heads=2, ffn_hidden=[8])
    tokens = torch.randn(3, 5, 8)
    mask = torch.tensor([[False, False, True, True, True], [False] * 4 + [True], [True] * 5])
    changed = tokens.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 8)
    torch.testing.assert_close(encoder(tokens, mask), encoder(changed, mask))


def reference_session_encoder(encoder, tokens, pooled, admissible, heads=2):
    """A post-LN Transformer layer written out per head, with an explicit [B, K, K] admissible-key
    pattern, mean-pooled over the ``pooled`` [B, K] rows."""
    outputs = []
    for head in torch.eye(heads).repeat_interleave(tokens.size(-1) // heads, dim=1):  # one head's coordinates
        q, k, v = (layer(tokens)[..., head.bool()] for layer in (encoder.query, encoder.key, encoder.value))
        logits = q @ k.transpose(-1, -2) / q.size(-1) ** 0.5
        outputs.append(logits.masked_fill(~admissible, -1e9).softmax(-1) @ v)
    hidden = encoder.attention_norm(tokens + encoder.out(torch.cat(outputs, dim=-1)))
    hidden = encoder.ffn_norm(hidden + encoder.ffn(hidden))
    return masked_mean(hidden, pooled)


@pytest.mark.parametrize("mask_pads", [True, False])
@pytest.mark.parametrize("mask_diag", [True, False])
def test_session_attention_pattern_with_the_diagonal_mask_on_and_off(mask_diag, mask_pads):
    torch.manual_seed(0)
    encoder = SessionEncoder(8, n_heads=2, ffn_hidden=[8], mask_diag=mask_diag, mask_pads=mask_pads)
    tokens = torch.randn(2, 4, 8)
    mask = torch.tensor([[True] * 4, [False, False, True, True]])
    keys = mask[:, None, :].expand(2, 4, 4) if mask_pads else torch.ones(2, 4, 4, dtype=torch.bool)
    pooled = mask if mask_pads else torch.ones_like(mask)  # off: the official code pools the pads too
    off_diagonal = ~torch.eye(4, dtype=torch.bool)
    expected = reference_session_encoder(encoder, tokens, pooled, keys & off_diagonal if mask_diag else keys)
    torch.testing.assert_close(encoder(tokens, mask), expected)
    other = reference_session_encoder(encoder, tokens, pooled, keys if mask_diag else keys & off_diagonal)
    assert not torch.allclose(expected, other), "the two patterns must give different vectors here"


def test_a_lonely_token_attends_to_itself_under_the_diagonal_mask():
    torch.manual_seed(0)
    encoder = SessionEncoder(8, n_heads=2, ffn_hidden=[8], mask_diag=True)
    tokens = torch.randn(1, 3, 8)
    mask = torch.tensor([[False, False, True]])  # one real item and no x̂: nothing else to attend to
    admissible = torch.tensor([[False, False, True]] * 3)
    admissible[2, 2] = True
    torch.testing.assert_close(encoder(tokens, mask), reference_session_encoder(encoder, tokens, mask, admissible))


def test_the_session_layer_is_bias_free_attention_then_linear_elu_layernorm_per_ffn_width():
    """The layer of docs/T2DIFF.md §11 (official code): bias-free q/k/v/out, and each FFN step Linear (no bias), ELU, LayerNorm."""
    default = SessionEncoder(6)
    assert (default.n_heads, default.mask_diag, default.mask_pads) == (2, True, True)
    assert default.attention_norm.eps == default.ffn_norm.eps == 1e-8
    encoder = SessionEncoder(6, ffn_hidden=(5, 4), eps=1e-6)
    for projection in (encoder.query, encoder.key, encoder.value, encoder.out):
        assert projection.bias is None and projection.weight.shape == (6, 6)
    assert encoder.attention_norm.eps == encoder.ffn_norm.eps == 1e-6
    assert [[type(m) for m in step] for step in encoder.ffn] == [[torch.nn.Linear, torch.nn.ELU, torch.nn.LayerNorm]] * 3
    assert [(step[0].in_features, step[0].out_features, step[0].bias, step[2].normalized_shape, step[2].eps) for step in encoder.ffn] == [
        (6, 5, None, (5,), 1e-6),
        (5, 4, None, (4,), 1e-6),
        (4, 6, None, (6,), 1e-6),
    ]


def test_target_attention_ignores_padding_and_is_zero_without_history():
    torch.manual_seed(0)
    attention = TargetAttention(8)
    query, history = torch.randn(2, 8), torch.randn(2, 6, 8)
    mask = torch.tensor([[False, False, False, True, True, True], [False] * 6])
    out = attention(query, history, mask)
    changed = history.clone()
    changed[~mask] = 9.0
    torch.testing.assert_close(out, attention(query, changed, mask))
    assert torch.equal(out[1], torch.zeros(8))
    real = history[:1, 3:]  # the first user's real rows: the softmax runs over these only
    q = query[:1].unsqueeze(1).expand_as(real)
    logits = attention.score(torch.cat([q, real, q - real, q * real], dim=-1)).squeeze(-1)
    torch.testing.assert_close(out[:1], (logits.softmax(-1).unsqueeze(-1) * real).sum(1))


def test_target_attention_equals_the_concatenated_form():
    """The per-user factorisation computes exactly the DIN scorer on [h_s, x, h_s - x, h_s ⊙ x]."""
    torch.manual_seed(0)
    attention = TargetAttention(8, mask_pads=False)
    query, history = torch.randn(3, 8), torch.randn(3, 5, 8)
    q = query.unsqueeze(1).expand_as(history)
    logits = attention.score(torch.cat([q, history, q - history, q * history], dim=-1)).squeeze(-1)
    expected = (logits.softmax(-1).unsqueeze(-1) * history).sum(1)
    torch.testing.assert_close(attention(query, history, torch.ones(3, 5, dtype=torch.bool)), expected)


def test_target_attention_weights_are_a_softmax_over_the_real_older_rows_only():
    torch.manual_seed(0)
    attention = TargetAttention(8)
    query, history = torch.randn(2, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[False, True, False, True, True], [False] * 5])  # the second user has no older history
    real = history[:1, mask[0]]
    q = query[:1].unsqueeze(1).expand_as(real)
    logits = attention.score(torch.cat([q, real, q - real, q * real], dim=-1)).squeeze(-1)
    expected = torch.cat([(logits.softmax(-1).unsqueeze(-1) * real).sum(1), torch.zeros(1, 8)])
    torch.testing.assert_close(attention(query, history, mask), expected, rtol=1e-5, atol=1e-6)
