"""Layers of SparCode's tokenizer that RecBole's do not offer: a cheaper CPU dropout, fused activations in SASRec's
feed-forward layers, and SASRec's encoder read at one position without running its last layer at every other."""

import torch
import torch.nn.functional as F
from recbole.model.layers import FeedForward
from torch import nn

# RecBole's FeedForward writes gelu as x·0.5·(1 + erf(x/√2)) and swish as x·sigmoid(x): five and two tensor passes
# forward, more for autograd's backward. torch's kernels compute the same functions in one pass each way (gelu
# within 1.2e-6 of RecBole's on unit-scale inputs): on SparCode's [512, 50, 256] feed-forward input, RecBole's gelu
# took 96-174 ms forward and backward on one CPU thread, F.gelu 18 ms.
FUSED_ACTIVATIONS = {FeedForward.gelu: F.gelu, FeedForward.swish: F.silu}


class UniformDropout(nn.Dropout):
    """``nn.Dropout`` whose CPU mask is ``rand >= p`` in float32: the same Bernoulli(1 - p) mask up to float32's
    2^-24 resolution, but a vectorised uniform draw costs about a third of ``bernoulli_`` (which was 30 % of a CPU
    training step at softmax_negatives: 20 with bf16_autocast, profiled). Other devices keep ``F.dropout``."""

    def forward(self, x):
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        scaled_mask = torch.rand(x.shape).ge_(self.p).mul_(1 / (1 - self.p))  # 0 or 1/(1-p), in place: no extra tensor
        return x * scaled_mask.to(x.dtype)  # p < 1: check_config keeps every dropout in [0, 1)


def fuse_activations(encoder):
    """Every feed-forward layer of RecBole's TransformerEncoder ``encoder`` computes its gelu or swish with torch's
    kernel (``FUSED_ACTIVATIONS``); relu, tanh and sigmoid are torch's already."""
    for layer in encoder.layer:
        feed_forward = layer.feed_forward
        method = getattr(feed_forward.intermediate_act_fn, "__func__", None)
        if method in FUSED_ACTIVATIONS:
            feed_forward.intermediate_act_fn = FUSED_ACTIVATIONS[method]


def encode_at_read_position(encoder, tokens, mask, read):
    """RecBole's TransformerEncoder ``encoder`` (SASRec's stack) read at position ``read`` [B] only: the layers before the last run at every
    position (the last attends to them all), the last one for the read position's query alone. The
    same function as the full stack read there (RecBole's MultiHeadAttention, restated for one query
    row), at 1/L of the last layer's query, output and feed-forward work."""
    *earlier, last = encoder.layer
    for layer in earlier:
        tokens = layer(tokens, mask)
    attention = last.multi_head_attention
    query_input = tokens.gather(1, read.view(-1, 1, 1).expand(-1, 1, tokens.size(-1)))  # [B, 1, d]
    mask_row = mask.gather(2, read.view(-1, 1, 1, 1).expand(-1, mask.size(1), 1, mask.size(-1)))  # [B, 1, 1, L]

    def heads(x):  # [B, n, d] -> [B, heads, n, d/heads]
        return attention.transpose_for_scores(x).permute(0, 2, 1, 3)

    scores = heads(attention.query(query_input)) @ heads(attention.key(tokens)).transpose(-1, -2)
    probabilities = attention.attn_dropout(attention.softmax(scores / attention.sqrt_attention_head_size + mask_row))
    context = (probabilities @ heads(attention.value(tokens))).permute(0, 2, 1, 3).reshape_as(query_input)
    hidden = attention.LayerNorm(attention.out_dropout(attention.dense(context)) + query_input)
    return last.feed_forward(hidden)[:, 0]
