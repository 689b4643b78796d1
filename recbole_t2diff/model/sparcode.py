"""SparCode: sparse retrievable cross-interactions between quantized query tokens and items.

Su et al., "Beyond Two-Tower Matching: Learning Sparse Retrievable Cross-Interactions for
Recommendation", SIGIR 2023. Read top to bottom as the authors' overview figure:

1. tokenizer: the history becomes one vector h (SASRec's last position, or a DNN over the mean);
2. heads: K_u linear heads turn h into K_u query tokens z_e;
3. quantizer: each token is product-quantized (M codebooks of N codewords, shared by all heads),
   so it is named by a code key and its value q̃ is a codeword (straight-through in training);
4. item side: v_i = U e_i + c, not quantized;
5. interaction: one MLP scores every (token, item) pair, its first layer split so that the query
   and item halves are computed once each: s = g(ReLU(W_q q̃ + W_v v + b_1));
6. score: y(u, i) = Σ_k φ(s_k + b), φ = ReLU, so a (code, item) pair contributes only when positive.

Because the codes are finite, φ(s(code, item) + b) can be precomputed for every code and stored,
positive entries only, in a code-keyed sparse inverted index (``recbole_t2diff.sparse_index``):
serving then runs the tokenizer and adds K_u posting lists. Every knob is documented in
``properties/model/SparCode.yaml``; the maths is in ``docs/SPARCODE.md``.
"""
import contextlib
import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.layers import TransformerEncoder

from recbole_t2diff.errors import UsageError
from recbole_t2diff.model.quantizer import CodeTally, ProductQuantizer

TOKENIZERS = ("sasrec", "dnn")
INTERACTIONS = ("mlp", "dot")
LOSS_TYPES = ("CE", "BPR")
SCORE_MODES = ("exact", "index")
INDEX_KEYS = ("all", "used")
INDEX_MISSES = ("compute", "empty")
INDEX_DTYPES = ("float32", "float16")
# Rows x items per block of the all-item scoring: one hidden tensor is this x H_1 x 4 bytes.
DEFAULT_CHUNK = {"cpu": 2**16, "cuda": 2**20}


def _fail(key, value, why):
    raise UsageError(f"invalid SparCode setting {key}={value}: {why}")


def _integer(config, key, minimum):
    value = config[key]
    if value is None or float(value) != int(float(value)) or int(float(value)) < minimum:
        _fail(key, value, f"it must be an integer >= {minimum}")
    return int(float(value))


def _fraction(config, key):
    value = config[key]
    if value is None or not 0 <= float(value) < 1:
        _fail(key, value, "it must lie in [0, 1)")
    return float(value)


def _non_negative(config, key):
    value = config[key]
    if value is None or float(value) < 0:
        _fail(key, value, "it must be a number >= 0")
    return float(value)


def _one_of(config, key, choices):
    if config[key] not in choices:
        _fail(key, config[key], f"use one of {', '.join(choices)}")
    return config[key]


def _widths(config, key):
    widths = config[key]
    if not isinstance(widths, (list, tuple)) or not widths or any(int(w) != w or w < 1 for w in widths):
        _fail(key, widths, "give a non-empty list of positive integers, e.g. [256, 256, 256]")
    return [int(w) for w in widths]


class UniformDropout(nn.Dropout):
    """``nn.Dropout`` whose CPU mask is ``rand >= p`` in float32: the same Bernoulli(1 - p) mask up to float32's
    2^-24 resolution, but a vectorised uniform draw costs about a third of ``bernoulli_`` (which was 30 % of a CPU
    training step at softmax_negatives: 20 with bf16_autocast, profiled). Other devices keep ``F.dropout``."""

    def forward(self, x):
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        scaled_mask = torch.rand(x.shape).ge_(self.p).mul_(1 / (1 - self.p))  # 0 or 1/(1-p), in place: no extra tensor
        return x * scaled_mask.to(x.dtype)  # p < 1: check_config keeps every dropout in [0, 1)


def describe_codes(stats, quantizer):
    """One log line's worth of :meth:`SparCode.code_stats`."""
    usage = "/".join(f"{share:.0%}" for share in stats["usage"])
    perplexity = "/".join(f"{value:.1f}" for value in stats["perplexity"])
    return (f"usage {usage} of {quantizer.codebook_size} codes per codebook, perplexity {perplexity}, "
            f"{stats['distinct_keys']} distinct keys, relative quantization error {stats['relative_error']:.3f}")


class SparCode(SequentialRecommender):
    """SparCode as a RecBole sequential model (docs/SPARCODE.md §1-§9)."""

    @classmethod
    def check_config(cls, config):
        """Reject invalid knobs before any data is loaded, with a one-line fix."""
        d = _integer(config, "embedding_size", 1)
        d_t = _integer(config, "token_size", 1)
        _integer(config, "MAX_ITEM_LIST_LENGTH", 1)
        tokenizer = _one_of(config, "tokenizer", TOKENIZERS)
        if tokenizer == "sasrec":
            _integer(config, "n_layers", 1)
            heads = _integer(config, "n_heads", 1)
            if d % heads:
                _fail("n_heads", heads, f"it must divide embedding_size={d}")
            _integer(config, "inner_size", 1)
            _fraction(config, "hidden_dropout_prob")
            _fraction(config, "attn_dropout_prob")
            if not isinstance(config["last_layer_read_only"], bool):
                _fail("last_layer_read_only", config["last_layer_read_only"], "use true or false")
        else:
            _widths(config, "dnn_hidden")
            _fraction(config, "dnn_dropout")
        _integer(config, "n_query_tokens", 1)
        item_tokens = _integer(config, "n_item_tokens", 1)
        quantize = config["quantize"]
        if quantize not in (True, False):
            _fail("quantize", quantize, "use true or false")
        codebooks = _integer(config, "n_codebooks", 1)
        size = _integer(config, "codebook_size", 2)
        if d_t % codebooks:
            _fail("n_codebooks", codebooks, f"it must divide token_size={d_t}")
        if codebooks * (size - 1).bit_length() >= 62:
            _fail("codebook_size", size, "codebook_size ** n_codebooks must stay below 2^62 for int64 keys; lower one of them")
        _non_negative(config, "vq_beta")
        _fraction(config, "ema_decay")
        _non_negative(config, "ema_eps")
        _non_negative(config, "dead_code_threshold")
        interaction = _one_of(config, "interaction", INTERACTIONS)
        if interaction == "dot" and item_tokens != 1:
            _fail("n_item_tokens", item_tokens, "interaction: dot scores one item token; set n_item_tokens: 1")
        if interaction == "mlp":
            _widths(config, "mlp_hidden")
            _fraction(config, "mlp_dropout")
        if config["score_relu"] not in (True, False):
            _fail("score_relu", config["score_relu"], "use true or false")
        if not isinstance(config["score_bias"], (int, float)) or isinstance(config["score_bias"], bool):
            _fail("score_bias", config["score_bias"], "it must be a number, e.g. 0.0 or -0.5")
        _non_negative(config, "sparsity_weight")
        _fraction(config, "relu_leak")
        loss_type = _one_of(config, "loss_type", LOSS_TYPES)
        negatives = config["train_neg_sample_args"] or {}
        if loss_type == "BPR" and negatives.get("distribution", "none") == "none":
            _fail("loss_type", loss_type, "BPR needs sampled negatives, set train_neg_sample_args: {distribution: uniform, sample_num: 1}")
        if not isinstance(config["uniform_dropout"], bool):
            _fail("uniform_dropout", config["uniform_dropout"], "use true or false")
        if not isinstance(config["bf16_autocast"], bool):
            _fail("bf16_autocast", config["bf16_autocast"], "use true or false")
        if config["softmax_negatives"] is not None:
            if loss_type != "CE":
                _fail("softmax_negatives", config["softmax_negatives"], "it samples the softmax of loss_type: CE; set softmax_negatives: ~ for BPR")
            _integer(config, "softmax_negatives", 1)
        score_mode = _one_of(config, "score_mode", SCORE_MODES)
        if score_mode == "index" and not quantize:
            _fail("score_mode", score_mode, "the index is keyed by codes and needs quantize: true; use score_mode: exact")
        if config["score_chunk_rows"] is not None:
            _integer(config, "score_chunk_rows", 1)
        _one_of(config, "index_keys", INDEX_KEYS)
        _one_of(config, "index_miss", INDEX_MISSES)
        _non_negative(config, "index_threshold")
        if config["index_max_postings"] is not None:
            _integer(config, "index_max_postings", 1)
        _one_of(config, "index_dtype", INDEX_DTYPES)
        if quantize and int(config["nproc"] or 1) > 1:
            _fail("nproc", config["nproc"], "the codebooks' EMA is not synchronised across processes; train with one process or quantize: false")

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.check_config(config)
        d = self.embedding_size = int(config["embedding_size"])
        d_t = self.token_size = int(config["token_size"])
        self.n_query_tokens = int(config["n_query_tokens"])
        self.n_item_tokens = int(config["n_item_tokens"])
        self.tokenizer = config["tokenizer"]
        self.last_layer_read_only = bool(config["last_layer_read_only"])
        self.interaction = config["interaction"]
        self.score_relu = config["score_relu"]
        self.score_bias = float(config["score_bias"])
        self.relu_leak = float(config["relu_leak"])
        self.sparsity_weight = float(config["sparsity_weight"])
        self.vq_beta = float(config["vq_beta"])
        self.loss_type = config["loss_type"]
        self.softmax_negatives = None if config["softmax_negatives"] is None else int(config["softmax_negatives"])
        self.ce_checkpoint = bool(config["ce_checkpoint"])
        self.bf16_autocast = bool(config["bf16_autocast"])
        self.score_mode = config["score_mode"]
        device = torch.device(config["device"]).type
        self.score_chunk_rows = int(config["score_chunk_rows"] or DEFAULT_CHUNK.get(device, DEFAULT_CHUNK["cpu"]))
        self.index_settings = {name: config[f"index_{name}"] for name in ("keys", "miss", "threshold", "max_postings", "dtype")}
        self.sparse_index = None  # built lazily by score_mode: index; never part of the state_dict
        # The training split's histories: ``index_keys: used`` keeps the keys they tokenize to.
        self.train_sequences = (dataset.inter_feat[self.ITEM_SEQ], dataset.inter_feat[self.ITEM_SEQ_LEN])
        self.dead_positives = torch.zeros(2, dtype=torch.long)  # (dead, seen) training positives since the last eval()

        self.item_embedding = nn.Embedding(self.n_items, d, padding_idx=0)
        if self.tokenizer == "sasrec":  # RecBole's SASRec stack, composed rather than subclassed
            self.position_embedding = nn.Embedding(self.max_seq_length, d)
            self.trm_encoder = TransformerEncoder(
                n_layers=int(config["n_layers"]), n_heads=int(config["n_heads"]), hidden_size=d,
                inner_size=int(config["inner_size"]), hidden_dropout_prob=float(config["hidden_dropout_prob"]),
                attn_dropout_prob=float(config["attn_dropout_prob"]), hidden_act=config["hidden_act"],
                layer_norm_eps=float(config["layer_norm_eps"]),
            )
            self.input_norm = nn.LayerNorm(d, eps=float(config["layer_norm_eps"]))
            self.input_dropout = nn.Dropout(float(config["hidden_dropout_prob"]))
        else:
            widths = [d] + [int(w) for w in config["dnn_hidden"]]
            layers = []
            for width_in, width_out in zip(widths, widths[1:]):
                layers += [nn.Linear(width_in, width_out), nn.ReLU(), nn.Dropout(float(config["dnn_dropout"]))]
            self.dnn = nn.Sequential(*layers, nn.Linear(widths[-1], d))
        # K_u independent Linear(d -> d_t) heads, as one Linear with K_u·d_t outputs.
        self.query_heads = nn.Linear(d, self.n_query_tokens * d_t)
        self.quantizer = None
        if config["quantize"]:
            self.quantizer = ProductQuantizer(
                d_t, int(config["n_codebooks"]), int(config["codebook_size"]), float(config["ema_decay"]),
                float(config["ema_eps"]), float(config["dead_code_threshold"]),
            )
        self.item_heads = nn.Linear(d, self.n_item_tokens * d_t)
        # The training batches' code usage since the last eval(), logged there (not saved).
        self.epoch_codes = None if self.quantizer is None else CodeTally(self.quantizer)
        self.restarts_logged = 0

        self.initializer_range = float(config["initializer_range"])
        self.apply(self._init_weights)
        if self.interaction == "mlp":
            # The first layer W_1[q̃ ; v] + b_1, split into its query and item halves (docs/SPARCODE.md §6).
            hidden = [int(w) for w in config["mlp_hidden"]]
            self.query_layer = nn.Linear(d_t, hidden[0], bias=False)
            self.item_layer = nn.Linear(self.n_item_tokens * d_t, hidden[0])
            dropout = float(config["mlp_dropout"])
            tail = [nn.Dropout(dropout)]
            for width_in, width_out in zip(hidden, hidden[1:]):
                tail += [nn.Linear(width_in, width_out), nn.ReLU(), nn.Dropout(dropout)]
            self.mlp_tail = nn.Sequential(*tail, nn.Linear(hidden[-1], 1))
            self._init_interaction()
        if config["uniform_dropout"]:
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
                return self._encode_to_read_position(tokens, mask, item_seq_len - 1)
            encoded = self.trm_encoder(tokens, mask, output_all_encoded_layers=True)[-1]
            return self.gather_indexes(encoded, item_seq_len - 1)
        # Padding is excluded from the sum and the count: RecBole-style init overwrites row 0 too.
        mask = (item_seq > 0).unsqueeze(-1).float()
        mean = (self.item_embedding(item_seq) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.dnn(mean)

    def _encode_to_read_position(self, tokens, mask, read):
        """SASRec's encoder output at position ``read`` [B] only: the layers before the last run at every
        position (the last attends to them all), the last one for the read position's query alone. The
        same function as the full stack read there (RecBole's MultiHeadAttention, restated for one query
        row), at 1/L of the last layer's query, output and feed-forward work."""
        *earlier, last = self.trm_encoder.layer
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

    # ---- item side and interaction --------------------------------------------------------------

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
        return self.mlp_tail(torch.relu(query_side + item_side)).squeeze(-1)

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

    def posting_rows(self, keys, item_side=None):
        """ReLU(s(c(key), i) + b) [len(keys), I] for code keys against ``item_side`` (default: every item
        id, padding included): the rows the sparse index stores, ReLU'd whatever ``score_relu`` (docs/SPARCODE.md §10)."""
        item_side = self.item_side() if item_side is None else item_side
        return self.row_scores(self.query_side(self.quantizer.lookup(self.quantizer.codes(keys))), item_side, relu=True)

    @staticmethod
    def accumulate(row_values, token_row, n_users):
        """y [B, I] = Σ_k r[row of token k]: a code used twice by a user adds twice, as Σ_k requires."""
        users = torch.arange(n_users, device=token_row.device).repeat_interleave(len(token_row) // n_users)
        return row_values.new_zeros(n_users, row_values.size(1)).index_add_(0, users, row_values[token_row])

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
            rec_loss, unscored = self.rec_loss(self.query_side(query), interaction)
        losses.append(rec_loss)
        if self.quantizer is not None:
            losses.append(self.vq_beta * commitment)
            self.quantizer.update(tokens, codes)  # after the loss: this batch scored with the old codewords
        if self.sparsity_weight > 0:
            losses.append(self.sparsity_weight * unscored)
        return tuple(losses) if len(losses) > 1 else losses[0]

    def rec_loss(self, query_side, interaction):
        """(L_rec, L_sparse): the recommendation loss and the mean φ(s + b) over the non-target pairs it scored.

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
        negative_values = self.activate(self.interact(query_side[:, :, None], self.item_side(negatives)[None, None]))  # [B, K, n]
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
            restarts = int(self.quantizer.restarts)
            logging.getLogger().info(f"SparCode codes in training: {describe_codes(self.epoch_codes.stats(), self.quantizer)}, "
                                     f"{restarts - self.restarts_logged} restarts")
            self.epoch_codes, self.restarts_logged = CodeTally(self.quantizer), restarts
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

    # ---- the two-tower reduction (docs/SPARCODE.md §11, §14) ------------------------------------------------

    def check_two_tower(self):
        """Refuse, in one line, a model whose scores are not one user vector · one item vector."""
        unlike = [knob for knob, is_set in (("interaction: mlp", self.interaction == "mlp"), ("score_relu: true", self.score_relu)) if is_set]
        if unlike:
            raise UsageError(
                f"SparCode with {' and '.join(unlike)} does not score by the inner product of one user vector and one item "
                "vector: it has no two-tower export; serve it through its sparse index (recbole_t2diff.sparse_index.SparseIndex), "
                "or train the two-tower reduction (interaction: dot, score_relu: false)")

    def user_vectors(self, interaction):
        """Σ_k q̃_k [B, d_t], the user tower of the two-tower reduction: there y(u, i) = Σ_k (q̃_k · v_i + b)
        = (Σ_k q̃_k) · v_i + K_u·b, and the constant K_u·b changes no ranking, so it is left out."""
        self.check_two_tower()
        return self.query_values(interaction).sum(1)

    def predict(self, interaction):
        query_side = self.query_side(self.query_values(interaction))
        return self.activate(self.interact(query_side, self.item_side(interaction[self.ITEM_ID])[:, None])).sum(-1)

    def full_sort_predict(self, interaction):
        if self.score_mode == "index":  # index() has just checked the weights' fingerprint: hash them once per batch
            return self.index().accumulate(self, self.query_keys(interaction))[0]
        rows, token_row = self.query_rows(interaction)
        return self.accumulate(self.code_scores(rows), token_row, len(interaction[self.ITEM_SEQ]))

    def index(self):
        """The sparse inverted index of this model's current weights, (re)built when stale."""
        from recbole_t2diff.sparse_index import SparseIndex, fingerprint

        settings = self.index_settings
        if self.sparse_index is None or self.sparse_index.meta["fingerprint"] != fingerprint(self, settings):
            self.sparse_index = SparseIndex.build(self, **settings)
        return self.sparse_index
