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
        # In place on the sum, the largest tensor of a step that scores token by token ([B, K_u, negatives, H_1]): one
        # allocation and one pass fewer, the same values and gradients (ReLU's backward reads its output either way).
        return self.mlp_tail((query_side + item_side).relu_()).squeeze(-1)

    def shares_rows(self):
        """Whether :meth:`shared_row_scores` applies: an MLP with no dropout in its tail (a mask per token would make
        tokens of one code score differently), over quantized tokens (only a code fixes a token's value)."""
        return self.quantizer is not None and self.interaction == "mlp" and all(getattr(layer, "p", 0) == 0 for layer in self.mlp_tail)

    def shared_row_scores(self, query_side, keys, item_side):
        """s [T, n] of every token against items shared by all of them, the MLP run once per distinct code key.

        ``query_side`` [T, H_1] holds W_q q̃ of T training tokens whose values are fixed by their ``keys`` [T] (the
        straight-through q̃ equals its codeword up to float rounding); ``item_side`` [n, H_1]. The tail's work shrinks
        to U/T, the share of distinct keys (0.35 to 0.68 of an ml-100k batch's 1,024 tokens over the first 8 epochs), with
        the same values and the same gradients up to float rounding: see :class:`SharedRowScores`."""
        rows, token_row = torch.unique(keys, return_inverse=True)
        first = torch.full((len(rows),), len(keys), dtype=torch.long, device=keys.device)
        first.scatter_reduce_(0, token_row, torch.arange(len(keys), device=keys.device), "amin")
        linears = [layer for layer in self.mlp_tail if isinstance(layer, nn.Linear)]
        params = [tensor for layer in linears for tensor in (layer.weight, layer.bias)]
        return SharedRowScores.apply(query_side, item_side, token_row, first, *params)

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


def per_token_sum(grad, token_row, jacobian):
    """[T, H]: Σ_n grad[t, n] · jacobian[token_row[t], n] for grad [T, n] and jacobian [U, n, H], as one sparse [T, U·n]
    by dense [U·n, H] product: gathering jacobian[token_row] first writes a [T, n, H] tensor, 10x slower on a CPU."""
    tokens, n = grad.shape
    rows = torch.arange(tokens, device=grad.device).repeat_interleave(n)
    columns = (token_row[:, None] * n + torch.arange(n, device=grad.device)).flatten()
    # Row-major with each row's columns ascending and none repeated: coalesced as built, so nothing sorts them again.
    picks = torch.sparse_coo_tensor(torch.stack([rows, columns]), grad.flatten(), (tokens, jacobian.size(0) * n), is_coalesced=True, check_invariants=False)
    return torch.sparse.mm(picks, jacobian.flatten(0, 1))


class SharedRowScores(torch.autograd.Function):
    """Pair scores of T tokens against n shared items through the MLP tail, computed for U distinct token values.

    Tokens of one code key have one value, so their scores are the key's, but each token needs its own gradient
    (the straight-through estimator hands it to the tokenizer token by token). Each score is a scalar function of
    its row's pre-activation p = W_q q̃ + W_v v + b_1, so with J = ∂s/∂p (one [U, n, H_1] tensor, the MLP's
    backward for a unit output gradient) and G = the gradients of the tokens of each key summed: token t gets
    Σ_n g[t, n] J[row(t), n], item n gets Σ_u G[u, n] J[u, n], and each tail weight gets autograd's own formula
    with the output gradient G. The forward, J and the weight gradients each cost one pass of the tail over U·n
    rows where per-token scoring costs three over T·n (docs/SPARCODE.md §6).

    The tail is Linear layers with a ReLU after each but the last (its Dropouts have p = 0: shares_rows);
    ``params`` are their weights and biases in order. Under autocast the backward runs under it too.
    """

    @staticmethod
    def forward(ctx, query_side, item_side, token_row, first, *params):
        x = (query_side[first][:, None] + item_side[None]).relu_()  # ReLU(p) [U, n, H_1]
        inputs = [x]  # every layer's input, a ReLU's output: where it is 0 is where the ReLU's derivative is
        weights, biases = params[0::2], params[1::2]
        for i, (weight, bias) in enumerate(zip(weights, biases)):
            x = F.linear(x, weight, bias)
            if i < len(weights) - 1:
                x = x.relu_()
                inputs.append(x)
        ctx.save_for_backward(token_row, *inputs, *params)
        ctx.n_layers = len(weights)
        ctx.dtypes = (query_side.dtype, item_side.dtype)
        ctx.autocast = (torch.is_autocast_enabled(query_side.device.type), torch.get_autocast_dtype(query_side.device.type), query_side.device.type)
        return x.squeeze(-1)[token_row]  # [T, n]

    @staticmethod
    def backward(ctx, grad):
        token_row, *saved = ctx.saved_tensors
        n = ctx.n_layers
        inputs, params = saved[:n], saved[n:]
        weights = params[0::2]
        enabled, dtype, device = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            grad = grad.to(inputs[0].dtype)
            per_row = grad.new_zeros(inputs[0].shape[:2]).index_add_(0, token_row, grad)  # G [U, n]
            param_grads = []
            unit = None  # ∂s/∂(layer i's output): 1 for the last layer
            for i in reversed(range(n)):
                # The loss's gradient at layer i's output, row by row: G times the unit one
                out_grad = per_row.reshape(-1, 1) if unit is None else (per_row.unsqueeze(-1) * unit).flatten(0, 1)
                param_grads[:0] = [out_grad.t() @ inputs[i].flatten(0, 1), out_grad.sum(0)]
                weight = weights[i].to(grad.dtype)
                through = weight.expand(*per_row.shape, -1) if unit is None else unit @ weight  # ∂s/∂(layer i's input)
                unit = torch.ops.aten.threshold_backward(through, inputs[i], 0)  # through the ReLU that made that input
            jacobian = unit  # J = ∂s/∂p [U, n, H_1]
            item_grad = torch.einsum("un,unh->nh", per_row, jacobian)
        query_grad = per_token_sum(grad.float(), token_row, jacobian.float())
        param_grads = [g.to(p.dtype).reshape(p.shape) for g, p in zip(param_grads, params)]
        return query_grad.to(ctx.dtypes[0]), item_grad.to(ctx.dtypes[1]), None, None, *param_grads
