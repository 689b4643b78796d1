"""SparCode: sparse retrievable cross-interactions between quantized query tokens and items.

Su et al., "Beyond Two-Tower Matching: Learning Sparse Retrievable Cross-Interactions for
Recommendation", SIGIR 2023. Read top to bottom as the authors' overview figure:

1. tokenizer: the history becomes one vector h (SASRec's last position, or a DNN over the mean);
2. heads: K_u linear heads turn h into K_u query tokens z_e;
3. quantizer: each token is product-quantized (M codebooks of N codewords, shared by all heads),
   so it is named by a code key and its value q̃ is a codeword (straight-through in training) — ``quantizer.py``;
4. item side: v_i = U e_i + c, not quantized;
5. interaction: one MLP scores every (token, item) pair, its first layer split so that the query
   and item halves are computed once each: s = g(ReLU(W_q q̃ + W_v v + b_1)) — ``interaction.py``;
6. score: y(u, i) = Σ_k φ(s_k + b), φ = ReLU, so a (code, item) pair contributes only when positive.

Because the codes are finite, φ(s(code, item) + b) can be precomputed for every code and stored,
positive entries only, in a code-keyed sparse inverted index (``recbole_t2diff.sparse_index``):
serving then runs the tokenizer and adds K_u posting lists. Every knob is documented in
``properties/model/SparCode.yaml`` and read in ``sparcode_knobs.py``; the maths is in ``docs/SPARCODE.md``.
"""

import contextlib
import logging

import torch
import torch.nn.functional as F
from torch import nn

from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.layers import TransformerEncoder

from recbole_t2diff.errors import UsageError
from recbole_t2diff.model.interaction import DEFAULT_CHUNK, CrossInteraction
from recbole_t2diff.model.layers import UniformDropout, encode_at_read_position, fuse_activations
from recbole_t2diff.model.quantizer import CodeTally, ProductQuantizer, describe_codes
from recbole_t2diff.model.sparcode_knobs import read_sparcode_knobs
from recbole_t2diff.sparse_index import current_index

# The parts of the state_dict that code rows depend on (the tokenizer and query heads only choose keys).
CODE_ROW_PARTS = ("quantizer", "item_embedding", "item_heads", "query_layer", "item_layer", "mlp_tail")


class SparCode(CrossInteraction, SequentialRecommender):
    """SparCode as a RecBole sequential model (docs/SPARCODE.md §1-§9)."""

    @classmethod
    def check_config(cls, config):
        """The parsed knobs (a read-only mapping) before any data is loaded; an invalid one is refused in one line with its fix."""
        return read_sparcode_knobs(config)

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        knobs = self.check_config(config)
        d = self.embedding_size = knobs["embedding_size"]
        d_t = self.token_size = knobs["token_size"]
        self.n_query_tokens = knobs["n_query_tokens"]
        self.n_item_tokens = knobs["n_item_tokens"]
        self.tokenizer = knobs["tokenizer"]
        self.last_layer_read_only = self.tokenizer == "sasrec" and knobs["last_layer_read_only"]
        self.interaction = knobs["interaction"]
        self.score_relu = knobs["score_relu"]
        self.score_bias = knobs["score_bias"]
        self.relu_leak = knobs["relu_leak"]
        self.sparsity_weight = knobs["sparsity_weight"]
        self.vq_beta = knobs["vq_beta"]
        self.loss_type = knobs["loss_type"]
        self.softmax_negatives = knobs["softmax_negatives"]
        self.ce_checkpoint = knobs["ce_checkpoint"]
        self.bf16_autocast = knobs["bf16_autocast"]
        self.score_mode = knobs["score_mode"]
        device = torch.device(config["device"]).type
        self.score_chunk_rows = knobs["score_chunk_rows"] or DEFAULT_CHUNK.get(device, DEFAULT_CHUNK["cpu"])
        self.index_settings = {name: knobs[f"index_{name}"] for name in ("keys", "miss", "threshold", "max_postings", "dtype")}
        self.sparse_index = None  # built lazily by score_mode: index; never part of the state_dict
        # The training split's histories: ``index_keys: used`` keeps the keys they tokenize to.
        self.train_sequences = (dataset.inter_feat[self.ITEM_SEQ], dataset.inter_feat[self.ITEM_SEQ_LEN])
        self.dead_positives = torch.zeros(2, dtype=torch.long)  # (dead, seen) training positives since the last eval()
        self.initializer_range = knobs["initializer_range"]

        self.item_embedding = nn.Embedding(self.n_items, d, padding_idx=0)
        if self.tokenizer == "sasrec":  # RecBole's SASRec stack, composed rather than subclassed
            eps = knobs["layer_norm_eps"]
            self.position_embedding = nn.Embedding(self.max_seq_length, d)
            self.trm_encoder = TransformerEncoder(
                n_layers=knobs["n_layers"],
                n_heads=knobs["n_heads"],
                hidden_size=d,
                inner_size=knobs["inner_size"],
                hidden_dropout_prob=knobs["hidden_dropout_prob"],
                attn_dropout_prob=knobs["attn_dropout_prob"],
                hidden_act=knobs["hidden_act"],
                layer_norm_eps=eps,
            )
            fuse_activations(self.trm_encoder)  # the same activation in one kernel pass (layers.FUSED_ACTIVATIONS)
            self.input_norm = nn.LayerNorm(d, eps=eps)
            self.input_dropout = nn.Dropout(knobs["hidden_dropout_prob"])
        else:
            widths = [d] + knobs["dnn_hidden"]
            layers = []
            for width_in, width_out in zip(widths, widths[1:]):
                layers += [nn.Linear(width_in, width_out), nn.ReLU(), nn.Dropout(knobs["dnn_dropout"])]
            self.dnn = nn.Sequential(*layers, nn.Linear(widths[-1], d))
        # K_u independent Linear(d -> d_t) heads, as one Linear with K_u·d_t outputs.
        self.query_heads = nn.Linear(d, self.n_query_tokens * d_t)
        self.quantizer = None
        if knobs["quantize"]:
            self.quantizer = ProductQuantizer(
                d_t,
                knobs["n_codebooks"],
                knobs["codebook_size"],
                decay=knobs["ema_decay"],
                eps=knobs["ema_eps"],
                dead_code_threshold=knobs["dead_code_threshold"],
            )
        self.item_heads = nn.Linear(d, self.n_item_tokens * d_t)
        # The training batches' code usage since the last eval(), logged there (not saved).
        self.epoch_codes = None if self.quantizer is None else CodeTally(self.quantizer)

        self.apply(self._init_weights)
        self.build_interaction(knobs)
        if knobs["uniform_dropout"]:
            self._use_uniform_dropout()

    def _use_uniform_dropout(self):
        """Every ``nn.Dropout`` (RecBole's Transformer layers included) becomes a :class:`UniformDropout` of the same p."""
        for module in list(self.modules()):
            for name, child in module.named_children():
                if type(child) is nn.Dropout:
                    setattr(module, name, UniformDropout(child.p))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    # ---- query side -----------------------------------------------------------------------------

    def history_vector(self, interaction):
        """h [B, d]: SASRec's output at the last real position, or the DNN over the masked mean."""
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        if self.tokenizer == "sasrec":
            positions = torch.arange(item_seq.size(1), device=item_seq.device)
            tokens = self.item_embedding(item_seq) + self.position_embedding(positions)[None]
            tokens = self.input_dropout(self.input_norm(tokens))
            mask = self.get_attention_mask(item_seq)
            if self.last_layer_read_only:
                return encode_at_read_position(self.trm_encoder, tokens, mask, item_seq_len - 1)
            encoded = self.trm_encoder(tokens, mask, output_all_encoded_layers=True)[-1]
            return self.gather_indexes(encoded, item_seq_len - 1)
        # Padding is excluded from the sum and the count: RecBole-style init overwrites row 0 too.
        mask = (item_seq > 0).unsqueeze(-1).float()
        mean = (self.item_embedding(item_seq) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.dnn(mean)

    def query_tokens(self, interaction):
        """z_e [B, K_u, d_t]: every head sees the whole history, however short."""
        return self.query_heads(self.history_vector(interaction)).view(-1, self.n_query_tokens, self.token_size)

    def query_rows(self, interaction):
        """The distinct query values to score and where each token finds its row.

        Returns (rows [R, d_t], token_row [B·K_u]). Quantized tokens are deduplicated by key: a
        code fixes the token's value, so one row per distinct code is exact. Continuous tokens are
        each their own row. No buffer changes here.
        """
        if self.quantizer is None:
            tokens = self.query_tokens(interaction)
            return tokens.reshape(-1, self.token_size), torch.arange(tokens.size(0) * tokens.size(1), device=tokens.device)
        distinct, token_row = torch.unique(self.query_keys(interaction).flatten(), return_inverse=True)
        return self.quantizer.lookup(self.quantizer.codes(distinct)), token_row

    @torch.no_grad()
    def query_keys(self, interaction):
        """Code keys [B, K_u] of the histories' query tokens (quantize: true); no buffer changes."""
        return self.quantizer.keys(self.quantizer.assign(self.query_tokens(interaction)))

    # ---- training -------------------------------------------------------------------------------

    def training_autocast(self):
        """``bf16_autocast``: the tokenizer and the interaction network of a training step in bfloat16. Off, no
        context at all: ``autocast(enabled=False)`` would switch off the autocast of RecBole's ``enable_amp``."""
        if not self.bf16_autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.item_embedding.weight.device.type, dtype=torch.bfloat16)

    def calculate_loss(self, interaction):
        with self.training_autocast():
            tokens = self.query_tokens(interaction)
        tokens = tokens.float()  # the quantizer, its EMA and the commitment term stay float32 (a no-op without autocast)
        losses = []
        if self.quantizer is not None:
            if not self.quantizer.initialised:
                self.quantizer.seed(tokens)
            codes = self.quantizer.assign(tokens)
            quantized = self.quantizer.lookup(codes)
            query = tokens + (quantized - tokens).detach()  # straight-through: the loss reaches the tokenizer
            commitment = F.mse_loss(tokens, quantized.detach())
            self.epoch_codes.add(tokens, codes, quantized)
        else:
            query = tokens
        with self.training_autocast():
            rec_loss, unscored = self.rec_loss(self.query_side(query), interaction, None if self.quantizer is None else self.quantizer.keys(codes))
        losses.append(rec_loss)
        if self.quantizer is not None:
            losses.append(self.vq_beta * commitment)
            self.quantizer.update(tokens, codes)  # after the loss: this batch scored with the old codewords
        if self.sparsity_weight > 0:
            losses.append(self.sparsity_weight * unscored)
        return tuple(losses) if len(losses) > 1 else losses[0]

    def rec_loss(self, query_side, interaction, keys=None):
        """(L_rec, L_sparse): the recommendation loss and the mean φ(s + b) over the non-target pairs it scored.

        With the tokens' code ``keys`` [B, K_u], sampled negatives are scored once per distinct key
        (:meth:`shared_row_scores`, where it applies): the same values and gradients, at a fraction of the work.

        Only the positives take the leaky ReLU (``relu_leak``), so a positive whose every token
        scores ≤ −b still gets a gradient. Negatives keep the plain ReLU: leaky, nothing would stop
        the loss from sinking them, and the scale of every score with them, without bound.
        """
        target = interaction[self.POS_ITEM_ID]
        positive_values = self.activate(self.interact(query_side, self.item_side(target)[:, None]), leaky=True)  # [B, K]
        self._count_dead_positives(positive_values)
        positive = positive_values.sum(1)
        if self.loss_type == "BPR":
            negative_values = self.activate(self.interact(query_side, self.item_side(interaction[self.NEG_ITEM_ID])[:, None]))
            return -F.logsigmoid((positive - negative_values.sum(1)).float()).mean(), negative_values.float().mean()
        if self.softmax_negatives is None:  # full CE over all items, column 0 included as in SASRec
            batch = len(query_side)
            values = self.row_scores(query_side.reshape(-1, query_side.size(-1)), self.item_side(), self.ce_checkpoint)
            values = values.view(batch, self.n_query_tokens, -1)
            logits = values.sum(1).scatter(1, target[:, None], positive[:, None])
            not_target = torch.ones_like(logits, dtype=torch.bool).scatter_(1, target[:, None], False)
            unscored = (values.float() * not_target[:, None]).sum() / (not_target.sum() * self.n_query_tokens)
            return F.cross_entropy(logits.float(), target), unscored
        # Sampled softmax: uniform negatives shared by the batch; a negative equal to a row's target
        # (an accidental hit) is masked out of that row.
        negatives = torch.randint(1, self.n_items, (self.softmax_negatives,), device=target.device)
        negative_side = self.item_side(negatives)
        if keys is not None and self.shares_rows():
            scores = self.shared_row_scores(query_side.flatten(0, 1), keys.flatten(), negative_side).view(*keys.shape, -1)
        else:
            scores = self.interact(query_side[:, :, None], negative_side[None, None])
        negative_values = self.activate(scores)  # [B, K, n]
        hits = negatives[None, :] == target[:, None]  # [B, n]
        logits = torch.cat([positive[:, None], negative_values.sum(1).masked_fill(hits, -1e9)], dim=1).float()
        kept = (~hits).unsqueeze(1).float()
        unscored = (negative_values.float() * kept).sum() / (kept.sum() * self.n_query_tokens).clamp(min=1)
        return F.cross_entropy(logits, torch.zeros_like(target)), unscored

    @torch.no_grad()
    def _count_dead_positives(self, positive_values):
        """A positive whose every token value is ≤ 0 after φ gets no gradient through the ReLU (docs/SPARCODE.md §7)."""
        if self.score_relu:
            dead = (positive_values <= 0).all(-1)
            self.dead_positives += torch.tensor([int(dead.sum()), dead.numel()])

    def train(self, mode=True):
        # RecBole calls eval() before every validation: report the epoch's dead positives and code usage there.
        if not mode and self.dead_positives[1] > 0:
            dead, seen = self.dead_positives.tolist()
            logging.getLogger().info(f"SparCode: {dead / seen:.1%} of training positives had every token score <= -score_bias (no gradient)")
            self.dead_positives.zero_()
        if not mode and self.epoch_codes is not None and self.epoch_codes.tokens > 0:
            restarts = int(self.quantizer.restarts - self.epoch_codes.restarts_before)
            logging.getLogger().info(f"SparCode codes in training: {describe_codes(self.epoch_codes.stats(), self.quantizer)}, {restarts} restarts")
            self.epoch_codes = CodeTally(self.quantizer)
        return super().train(mode)

    @torch.no_grad()
    def code_stats(self, loader):
        """Codebook diagnostics (docs/SPARCODE.md §5, §12) over the histories of ``loader`` (training or evaluation), in
        eval mode: per codebook the share of its N codes used and the perplexity of their use, distinct
        keys, the relative quantization error Σ‖z_e − z_q‖² / Σ‖z_e‖², and the restarts so far."""
        if self.quantizer is None:
            raise UsageError("code_stats needs a quantized SparCode (quantize: true): quantize: false has no codes")
        was_training = self.training
        super().train(False)  # not self.eval(): that would log and reset the training epoch's tally
        tally = CodeTally(self.quantizer)
        try:
            for batch in loader:
                interaction = (batch[0] if isinstance(batch, tuple) else batch).to(self.item_embedding.weight.device)
                tokens = self.query_tokens(interaction)
                codes = self.quantizer.assign(tokens)
                tally.add(tokens, codes, self.quantizer.lookup(codes))
        finally:
            super().train(was_training)
        return {**tally.stats(), "restarts": int(self.quantizer.restarts)}

    # ---- scoring --------------------------------------------------------------------------------

    def query_values(self, interaction):
        """q̃ [B, K_u, d_t] as scored at inference: codewords, or the tokens with quantize: false."""
        tokens = self.query_tokens(interaction)
        return tokens if self.quantizer is None else self.quantizer.lookup(self.quantizer.assign(tokens))

    def forward(self, interaction):
        return self.query_values(interaction)

    def predict(self, interaction):
        query_side = self.query_side(self.query_values(interaction))
        return self.activate(self.interact(query_side, self.item_side(interaction[self.ITEM_ID])[:, None])).sum(-1)

    def full_sort_predict(self, interaction):
        if self.score_mode == "index":  # index() has just checked the weights' fingerprint: hash them once per batch
            return self.index().accumulate(self, self.query_keys(interaction))[0]
        rows, token_row = self.query_rows(interaction)
        return self.accumulate(self.code_scores(rows), token_row, len(interaction[self.ITEM_SEQ]))

    # ---- the two-tower reduction (docs/SPARCODE.md §11, §14) ------------------------------------------------

    def check_two_tower(self):
        """Refuse, in one line, a model whose scores are not one user vector · one item vector."""
        unlike = [knob for knob, is_set in (("interaction: mlp", self.interaction == "mlp"), ("score_relu: true", self.score_relu)) if is_set]
        if unlike:
            raise UsageError(
                f"SparCode with {' and '.join(unlike)} does not score by the inner product of one user vector and one item "
                "vector: it has no two-tower export; serve it through its sparse index (recbole_t2diff.sparse_index.SparseIndex), "
                "or train the two-tower reduction (interaction: dot, score_relu: false)"
            )

    def user_vectors(self, interaction):
        """Σ_k q̃_k [B, d_t], the user tower of the two-tower reduction: there y(u, i) = Σ_k (q̃_k · v_i + b)
        = (Σ_k q̃_k) · v_i + K_u·b, and the constant K_u·b changes no ranking, so it is left out."""
        self.check_two_tower()
        return self.query_values(interaction).sum(1)

    # ---- the sparse index (recbole_t2diff.sparse_index, docs/SPARCODE.md §10-§11) --------------------------

    def index(self):
        """The sparse inverted index of this model's current weights, (re)built when stale."""
        return current_index(self)

    def code_layout(self):
        """What shapes an index of this model's codes: n_codebooks, codebook_size, n_query_tokens, n_items and
        score_bias; None with quantize: false (no codes)."""
        if self.quantizer is None:
            return None
        return {
            "n_codebooks": self.quantizer.n_codebooks,
            "codebook_size": self.quantizer.codebook_size,
            "n_query_tokens": self.n_query_tokens,
            "n_items": self.n_items,
            "score_bias": self.score_bias,
        }

    def code_row_state(self):
        """(name, tensor) of every state_dict entry that code rows depend on, sorted by name: what an index's
        fingerprint hashes."""
        return [(name, tensor) for name, tensor in sorted(self.state_dict().items()) if name.split(".")[0] in CODE_ROW_PARTS]

    @torch.no_grad()
    def training_keys(self):
        """Sorted distinct code keys of the training split's histories (``index_keys: used``), in the current mode."""
        sequences, lengths = self.train_sequences
        device = self.item_embedding.weight.device
        found = []
        for seq, length in zip(*(tensor.split(1024) for tensor in (sequences, lengths))):  # 1024 histories at a time
            found.append(torch.unique(self.query_keys({self.ITEM_SEQ: seq.to(device), self.ITEM_SEQ_LEN: length.to(device)})))
        return torch.unique(torch.cat(found))
