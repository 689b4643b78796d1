"""SparCode's cross-interaction: how a (query token, item) pair is scored (docs/SPARCODE.md §6-§7, §10).

Item side v_i = U e_i + c (``item_heads``); one MLP g scores every pair, its first layer split into a query half
and an item half that are each computed once: s = g(ReLU(W_q q̃ + W_v v + b_1)) (``interaction: mlp``), or the
inner product q̃·v (``dot``); a pair contributes φ(s + b), φ = ReLU. Because the query tokens are quantized, the
rows φ(s(c(key), i) + b) of every code key can be precomputed: :meth:`CrossInteraction.code_row_scores` gives them
to ``recbole_t2diff.sparse_index``.

:class:`CrossInteraction` is mixed into :class:`~recbole_t2diff.model.sparcode.SparCode`; its layers
(``query_layer``, ``item_layer``, ``mlp_tail``) are attributes of the model itself, as checkpoints name them.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Rows x items per block of the all-item scoring: one hidden tensor is this x H_1 x 4 bytes.
DEFAULT_CHUNK = {"cpu": 2**16, "cuda": 2**20}


class CrossInteraction:
    """Pair scores of a SparCode: the item side, the interaction network and φ, exact or by code rows."""

    def build_interaction(self, knobs):
        """The first layer W_1[q̃ ; v] + b_1, split into its query and item halves (docs/SPARCODE.md §6), and the
        MLP's tail; nothing for ``interaction: dot``."""
        if self.interaction != "mlp":
            return
        hidden = knobs["mlp_hidden"]
        self.query_layer = nn.Linear(self.token_size, hidden[0], bias=False)
        self.item_layer = nn.Linear(self.n_item_tokens * self.token_size, hidden[0])
        dropout = knobs["mlp_dropout"]
        tail = [nn.Dropout(dropout)]
        for width_in, width_out in zip(hidden, hidden[1:]):
            tail += [nn.Linear(width_in, width_out), nn.ReLU(), nn.Dropout(dropout)]
        self.mlp_tail = nn.Sequential(*tail, nn.Linear(hidden[-1], 1))
        self._init_interaction()

    def _init_interaction(self):
        """Kaiming-normal weights and zero biases, so token scores start O(1) (docs/SPARCODE.md §6). The two
        halves of the first layer share the fan-in of the concatenated layer they stand for."""
        fan_in = self.query_layer.in_features + self.item_layer.in_features
        for layer in (self.query_layer, self.item_layer):
            layer.weight.data.normal_(0.0, (2.0 / fan_in) ** 0.5)
        self.item_layer.bias.data.zero_()
        for layer in self.mlp_tail:
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                layer.bias.data.zero_()

    def item_vectors(self, ids=None):
        """v [.., K_i·d_t] for ``ids`` or every item id (padding 0 included) when None."""
        ids = torch.arange(self.n_items, device=self.item_embedding.weight.device) if ids is None else ids
        return self.item_heads(self.item_embedding(ids))

    def query_side(self, query):
        """The query half of the first layer, W_1q q̃ (the token itself for ``dot``)."""
        return self.query_layer(query) if self.interaction == "mlp" else query

    def item_side(self, ids=None):
        """The item half of the first layer, W_1v v + b_1 (the item token itself for ``dot``)."""
        vectors = self.item_vectors(ids)
        return self.item_layer(vectors) if self.interaction == "mlp" else vectors

    def interact(self, query_side, item_side):
        """Token scores s for query and item halves that broadcast against each other ([..., H_1])."""
        if self.interaction == "dot":
            return (query_side * item_side).sum(-1)
        # In place on the sum, the largest tensor of a training step ([B, K_u, 1 + negatives, H_1]): one allocation
        # and one pass fewer, the same values and gradients (ReLU's backward reads its output either way).
        return self.mlp_tail((query_side + item_side).relu_()).squeeze(-1)

    def activate(self, scores, leaky=False, relu=None):
        """φ(s + b): ReLU (leaky by ``relu_leak`` for training positives), or the identity with score_relu: false;
        ``relu`` overrides score_relu (the index always stores the ReLU'd scores)."""
        shifted = scores + self.score_bias
        if not (self.score_relu if relu is None else relu):
            return shifted
        return F.leaky_relu(shifted, self.relu_leak) if leaky and self.relu_leak > 0 else torch.relu(shifted)

    def row_scores(self, query_side, item_side, checkpointed=False, relu=None):
        """r = φ(s(row, item) + b) [R, I] for rows [R, H_1] against items [I, H_1], in blocks of
        at most ``score_chunk_rows`` pairs so no hidden tensor grows past that x H_1 floats;
        ``checkpointed`` blocks are recomputed in backward instead of kept (``ce_checkpoint``);
        ``relu`` as in :meth:`activate`."""
        if self.interaction == "dot":
            return self.activate(query_side @ item_side.t(), relu=relu)
        rows_per_block = max(1, self.score_chunk_rows // max(1, len(item_side)))

        def block(rows):
            return self.activate(self.interact(rows[:, None], item_side[None]), relu=relu)

        blocks = []
        for rows in query_side.split(rows_per_block):
            use_checkpoint = checkpointed and torch.is_grad_enabled()
            blocks.append(checkpoint(block, rows, use_reentrant=False) if use_checkpoint else block(rows))
        return torch.cat(blocks)  # split() yields one empty block for no rows, so there is always one

    def code_scores(self, rows):
        """r [R, n_items] for query values ``rows`` [R, d_t] (codewords or tokens) in eval mode."""
        return self.row_scores(self.query_side(rows), self.item_side())

    @torch.no_grad()
    def code_row_scores(self, keys=None, block_keys=None):
        """The rows the sparse index stores (docs/SPARCODE.md §10): φ(s(c(key), i) + b) with φ = ReLU whatever
        ``score_relu``, for every item i = 1..I-1 (the padding item 0 is never stored), scored in the model's
        current mode (the index builds in eval mode). Yields blocks [k, I-1] for the code ``keys`` [K] in their
        order (None: every key 0..N^M-1), ``block_keys`` keys at a time (None: as many as ``score_chunk_rows``
        pairs allow, at least 1)."""
        item_side = self.item_side()[1:]
        n_keys = self.quantizer.n_keys if keys is None else len(keys)
        block = int(block_keys or max(1, self.score_chunk_rows // max(1, len(item_side))))
        for start in range(0, n_keys, block):
            stop = min(start + block, n_keys)
            chunk = torch.arange(start, stop, device=item_side.device) if keys is None else keys[start:stop]
            query = self.quantizer.lookup(self.quantizer.codes(chunk))
            yield self.row_scores(self.query_side(query), item_side, relu=True)

    @staticmethod
    def accumulate(row_values, token_row, n_users):
        """y [B, I] = Σ_k r[row of token k]: a code used twice by a user adds twice, as Σ_k requires."""
        users = torch.arange(n_users, device=token_row.device).repeat_interleave(len(token_row) // n_users)
        return row_values.new_zeros(n_users, row_values.size(1)).index_add_(0, users, row_values[token_row])
