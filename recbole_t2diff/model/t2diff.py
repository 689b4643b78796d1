"""T2Diff: a two-tower matcher whose user tower carries cross-interaction through diffusion.

Wang et al., "Unleashing the Potential of Two-Tower Models: Diffusion-Based Cross-Interaction for
Large-Scale Matching", WWW 2025. The user tower (Fig. 2):

1. drift preparation: z_0 = [x_2..x_L ; x_next] - [x_1..x_L], the temporal drift of the history;
2. diffusion: a 1-D U-Net reconstructs z_0 from noise, conditioned on the history; the generated
   next item is x̂ = x_L + ẑ_0[L] (training: one-step estimate from the noised true drift;
   inference: the T-step reverse chain, which never sees the target) — ``generator.py``;
3. mixed attention: self-attention over the last ``session_len`` items plus x̂ gives h_s, target
   attention of h_s over the older history gives h_l, and e_u = [h_l ; h_s].

The item tower is e_i = LN(ELU(W·x_i)) and the score is e_u·e_i, so item vectors stay precomputable.
Every knob is documented in ``properties/model/T2Diff.yaml`` and read in ``t2diff_knobs.py``; the maths is in
``docs/T2DIFF.md``.
"""

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from recbole.model.abstract_recommender import SequentialRecommender

from recbole_t2diff.errors import UsageError
from recbole_t2diff.model.attention import SessionEncoder, TargetAttention, masked_mean
from recbole_t2diff.model.generator import XHatGenerator
from recbole_t2diff.model.t2diff_knobs import read_t2diff_knobs
from recbole_t2diff.tensor_state import tensor_state

LAG_BUCKETS = 24  # log2 buckets of the lag in minutes: the last one starts at 2^22 min (~8 years)


def realign(item_seq, item_seq_len):
    """RecBole's left-aligned, end-padded lists -> right-aligned ids (most recent item last) and mask."""
    length = item_seq.size(1)
    source = torch.arange(length, device=item_seq.device)[None, :] - (length - item_seq_len[:, None])
    valid = source >= 0
    return item_seq.gather(1, source.clamp(min=0)) * valid, valid


class T2Diff(XHatGenerator, SequentialRecommender):
    """T2Diff as a RecBole sequential model, trained with full-softmax CE + λ·diffusion loss."""

    @classmethod
    def check_config(cls, config):
        """The parsed knobs (a read-only mapping) before any data is loaded; an invalid one is refused in one line with its fix."""
        return read_t2diff_knobs(config)

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        knobs = self.check_config(config)
        d = self.embedding_size = knobs["embedding_size"]
        self.session_len = knobs["session_len"]
        self.session_split = knobs["session_split"]
        self.session_gap = knobs["session_gap"]
        self.TIME = config["TIME_FIELD"]
        self.TIME_SEQ = self.TIME + config["LIST_SUFFIX"]
        self.time_lag = self._resolve_time_lag(knobs["time_lag"], dataset)
        self.x_hat, self.x_hat_source = knobs["x_hat"], knobs["x_hat_source"]
        self.use_drift = knobs["use_drift"]
        self.stop_grad = knobs["stop_grad"]
        self.lambda_diff = knobs["lambda_diff"]
        self.loss_type = knobs["loss_type"]
        self.softmax_negatives = knobs["softmax_negatives"]
        self.diff_loss = knobs["diff_loss"]
        self.diff_loss_positions = knobs["diff_loss_positions"]
        self.infer_samples = knobs["infer_samples"]
        self.n_steps = knobs["n_steps"]
        self.xhat_loss = knobs["xhat_loss"]
        self.xhat_loss_on = knobs["xhat_loss_on"]
        self.lambda_xhat = knobs["lambda_xhat"]
        self.train_xhat = knobs["train_xhat"]
        self.diffusion_scale = knobs["diffusion_scale"]
        self.guidance_weight = knobs["guidance_weight"]
        self.condition_dropout = knobs["condition_dropout"]
        self.set_sampler(knobs["sampler"], knobs["infer_steps"], knobs["ddim_eta"])
        self.emb_max_norm = knobs["emb_max_norm"]
        self.eval_seed = knobs["eval_seed"]
        self._eval_generator = None
        self.initializer_range = knobs["initializer_range"]
        eps = knobs["layer_norm_eps"]

        # Item tokens: one table shared by the user side (raw tokens) and the item tower.
        category_field = knobs["category_field"]
        id_dim = d if category_field is None else d - (knobs["category_dim"] or d // 2)
        self.item_embedding = nn.Embedding(self.n_items, id_dim, padding_idx=0)
        self.category_embedding = None
        if category_field is not None:
            self.register_buffer("item_categories", self._item_categories(dataset, category_field))
            self.category_embedding = nn.Embedding(dataset.num(category_field), d - id_dim, padding_idx=0)
        self.build_generator(knobs, eps)
        mask_pads = knobs["mask_pads"]
        self.session_encoder = SessionEncoder(d, knobs["n_heads"], knobs["session_ffn_hidden"], knobs["mask_diag"], mask_pads, eps)
        self.lag_embedding = nn.Embedding(LAG_BUCKETS + 1, d, padding_idx=0) if self.time_lag == "bucket" else None
        # Row j of the right-aligned history is L - 1 - j steps before the request: attention alone is
        # blind to order (a permuted session gives the same h_s), so this embedding is what tells it.
        self.position_embedding = nn.Embedding(self.max_seq_length, d) if knobs["position_embedding"] == "learned" else None
        self.target_attention = TargetAttention(d, knobs["att_hidden"], mask_pads, eps) if knobs["use_target_attention"] else None
        self.user_ffn = nn.Sequential(nn.Linear(2 * d, 2 * d), nn.ELU(), nn.LayerNorm(2 * d, eps=eps)) if knobs["use_user_ffn"] else None
        self.item_tower = nn.Sequential(nn.Linear(d, 2 * d, bias=False), nn.ELU(), nn.LayerNorm(2 * d, eps=eps))
        if self.denoises and self.xhat_loss == "ce":
            # Tokens start at ~N(0, initializer_range²) per coordinate, so raw dot products with the
            # table are ~0.03 and the softmax is flat: a learned logit scale, starting where a token's
            # product with itself is 1, lets the x̂ objective sharpen without waiting for the tokens to grow.
            self.xhat_logit_scale = nn.Parameter(torch.tensor(-math.log(d * self.initializer_range**2)))
        # x_hat_gate: x̂ enters the session as x_L + g·(x̂ - x_L), g starting at 0, so the tower begins as the copy-last
        # control (which beat every diffusion x̂ so far) and takes x̂ in only as far as training finds it useful.
        self.x_hat_gate = nn.Parameter(torch.zeros(())) if self.denoises and knobs["x_hat_gate"] else None
        # x_hat_in_score: e_u + P·x̂, P starting at 0, so x̂ can point the score at items directly (still two towers:
        # x̂ depends on the user only).
        self.score_projection = nn.Linear(d, 2 * d, bias=False) if self.x_hat != "none" and knobs["x_hat_in_score"] else None
        self.dropout = nn.Dropout(knobs["dropout_prob"])
        self._all_item_vectors = None  # (key, every item's vector), kept while no weight it reads changes

        self.apply(self._init_weights)
        if self.x_hat == "diffusion":  # _init_weights drew the FiLM maps like any Linear: back to zero
            self.denoiser.unet.zero_film()
        if self.score_projection is not None:  # x̂ enters the score only as far as training moves P from 0
            nn.init.zeros_(self.score_projection.weight)

    def _resolve_time_lag(self, time_lag, dataset):
        """``time_lag`` with ``auto`` decided by the data; refuses time_gap sessions or the bucketed lag on data without clock time."""
        needs_time = self.session_split == "time_gap" or time_lag == "bucket"
        if not (needs_time or time_lag == "auto"):
            return time_lag
        # one pass over the data's times serves both
        problem = self._time_problem(dataset, "session_split: time_gap" if self.session_split == "time_gap" else "time_lag: bucket")
        if needs_time and problem:
            raise UsageError(problem)
        if time_lag == "auto":
            # Measured on ml-100k (results/time): the lag feature added +0.008 test NDCG@10 over 3 seeds;
            # it needs clock time, so data whose time field is an order index (or absent) goes without.
            time_lag = "none" if problem else "bucket"
            logging.getLogger().info(f"time_lag: auto -> {time_lag}" + (f" ({problem})" if problem else ""))
        return time_lag

    @staticmethod
    def _item_categories(dataset, field):
        feature = dataset.get_item_feature()
        if field not in feature.columns:
            raise UsageError(f"category_field '{field}' is not loaded: add it to load_col, e.g. load_col: {{item: [item_id, {field}]}}")
        categories = feature[field]
        return categories.long() if categories.dim() == 2 else categories.long().unsqueeze(-1)

    def _time_problem(self, dataset, wanted):
        """Why the time field cannot serve ``wanted`` (one line), or ``None`` when it holds clock time:
        time gaps and lags need it, not a missing, normalised or order-index time field."""
        feature = dataset.inter_feat
        if self.TIME_SEQ not in feature.columns:
            return f"{wanted} needs the time field '{self.TIME}' of every interaction: add it to load_col (inter) and set TIME_FIELD"
        times, valid = realign(feature[self.TIME_SEQ], feature[self.ITEM_SEQ_LEN])
        times = torch.cat([times, feature[self.TIME].unsqueeze(1)], dim=1)
        valid = torch.cat([valid, valid.new_ones(len(valid), 1)], dim=1)
        steps = (times[:, 1:] - times[:, :-1])[valid[:, 1:] & valid[:, :-1]]
        if len(steps) and bool((steps == 1).all()):
            return (
                f"{wanted} needs clock time, but '{self.TIME}' only counts each user's interactions (0, 1, 2, ...), as in "
                f"this project's copies of ml-1m and amazon-beauty: use session_split: last_k and time_lag: none on this data"
            )
        if float(feature[self.TIME].max()) <= 1:
            return (
                f"{wanted} needs clock time in seconds, but '{self.TIME}' lies in [0, 1] (normalised): set normalize_all: False "
                f"or leave '{self.TIME}' out of normalize_field"
            )
        return None

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    # ---- item tokens and the item tower ---------------------------------------------------------

    def tokens(self, ids, clip=True):
        """Input tokens of item ``ids`` (any shape): id embedding, plus the mean category embedding."""
        tokens = self.item_embedding(ids)
        if self.category_embedding is not None:
            categories = self.item_categories[ids]  # [..., G], 0 = no category
            tokens = torch.cat([tokens, masked_mean(self.category_embedding(categories), categories > 0)], dim=-1)
        if clip and self.emb_max_norm is not None:  # functional max-norm: out of place, gradients flow
            tokens = tokens * (self.emb_max_norm / tokens.norm(dim=-1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0)
        return tokens

    def item_vectors(self, ids=None):
        """Item tower output for ``ids``, or for every item id (padding 0 included) when None: without gradients,
        the one computed while the tensors it reads last stood as they are now (docs/T2DIFF.md §12)."""
        every_item = ids is None
        if every_item:
            ids = torch.arange(self.n_items, device=self.item_embedding.weight.device)
        if not every_item or torch.is_grad_enabled():
            return self.item_tower(self.tokens(ids, clip=False))
        key = tensor_state([*self.item_embedding.parameters(), *self.item_tower.parameters(), *self._category_tensors()])
        if self._all_item_vectors is None or self._all_item_vectors[0] != key:
            self._all_item_vectors = (key, self.item_tower(self.tokens(ids, clip=False)))
        return self._all_item_vectors[1]

    def _category_tensors(self):
        return [] if self.category_embedding is None else [self.item_categories, *self.category_embedding.parameters()]

    # ---- user tower -----------------------------------------------------------------------------

    def history(self, interaction):
        """Right-aligned history tokens X [B, L, d] (padding rows exactly 0) and their mask."""
        ids, mask = realign(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return self.tokens(ids) * mask.unsqueeze(-1), mask

    def tower_inputs(self, interaction, history, mask):
        """What the mixed attention reads besides x̂: the history tokens, plus the embedded time lag
        between the request (the target's timestamp, known when serving; its item never is) and each
        item (``time_lag: bucket``), plus each row's distance from the most recent item
        (``position_embedding: learned``), and the current session's rows (``session_split: time_gap``)."""
        if self.position_embedding is not None:
            distance = torch.arange(history.size(1) - 1, -1, -1, device=history.device)
            history = history + self.position_embedding(distance) * mask.unsqueeze(-1)  # padding rows stay exactly 0
        times = None
        if self.lag_embedding is not None or self.session_split == "time_gap":
            times, _ = realign(interaction[self.TIME_SEQ], interaction[self.ITEM_SEQ_LEN])
        if self.lag_embedding is not None:
            lag_minutes = (interaction[self.TIME].unsqueeze(1) - times).clamp(min=0) / 60
            buckets = 1 + torch.log2(1 + lag_minutes).floor().clamp(max=LAG_BUCKETS - 1).long()
            history = history + self.lag_embedding(buckets) * mask.unsqueeze(-1)  # padding rows stay exactly 0
        in_session = None
        if self.session_split == "time_gap":
            # row j is in the session when no gap >= session_gap lies between it and the last item
            gaps = torch.cat([times[:, 1:] - times[:, :-1] >= self.session_gap, mask.new_zeros(len(mask), 1)], dim=1)
            in_session = (gaps.flip(1).cumsum(1).flip(1) == 0) & mask
            in_session[:, : -self.session_len] = False
        return history, in_session

    def user_vector(self, history, mask, x_hat, in_session=None):
        """Mixed attention: e_u = [h_l ; h_s] from the session (plus x̂) and the older history.

        ``in_session`` [B, L] marks the current session's rows (``session_split: time_gap``; always
        within the last ``session_len``); None = the last ``session_len`` rows.
        """
        k = self.session_len
        history = self.dropout(history)  # training only; x̂ and the diffusion branch see clean tokens
        session, session_mask = history[:, -k:], mask[:, -k:] if in_session is None else in_session[:, -k:]
        if x_hat is not None:
            session = torch.cat([session, x_hat.unsqueeze(1)], dim=1)
            session_mask = torch.cat([session_mask, session_mask.new_ones(len(session), 1)], dim=1)
        h_s = self.session_encoder(session, session_mask)
        if in_session is None:
            older, older_mask = history[:, :-k], mask[:, :-k]
        else:  # rows of the last session_len before a time gap belong to the older history
            older, older_mask = history, mask & ~in_session
        if self.target_attention is not None:
            h_l = self.target_attention(h_s, older, older_mask)
        else:
            h_l = masked_mean(older, older_mask)
        user = torch.cat([h_l, h_s], dim=-1)
        user = self.user_ffn(user) if self.user_ffn is not None else user
        return user + self.score_projection(x_hat) if self.score_projection is not None and x_hat is not None else user

    # ---- RecBole interface ----------------------------------------------------------------------

    def forward(self, interaction):
        """User vectors e_u [B, 2d] for inference: x̂ comes from the reverse chain, never the target."""
        history, mask = self.history(interaction)
        tokens, in_session = self.tower_inputs(interaction, history, mask)
        x_hat = self.inference_x_hat(history, self.condition(tokens, mask, in_session))
        return self.user_vector(tokens, mask, self.session_x_hat(history, x_hat), in_session)

    def calculate_loss(self, interaction):
        history, mask = self.history(interaction)
        tokens, in_session = self.tower_inputs(interaction, history, mask)
        x_hat, diffusion_losses = None, []
        if self.denoises:
            x_hat, diffusion_losses = self.diffusion_training(history, mask, interaction[self.POS_ITEM_ID], self.condition(tokens, mask, in_session))
            x_hat = self.session_x_hat(history, x_hat)
        elif self.x_hat == "copy_last":  # the control: x̂ := x_L, treated like a generated x̂
            x_hat = history[:, -1].detach() if self.stop_grad else history[:, -1]
        tower_loss = self.tower_loss(self.user_vector(tokens, mask, x_hat, in_session), interaction)
        return (tower_loss, *diffusion_losses) if diffusion_losses else tower_loss

    def tower_loss(self, user, interaction):
        """Full-softmax CE over all items [P Eq. 24], sampled-softmax CE, or BPR."""
        target = interaction[self.POS_ITEM_ID]
        if self.loss_type == "BPR":
            positive, negative = self.item_vectors(torch.stack([target, interaction[self.NEG_ITEM_ID]]))
            return -F.logsigmoid((user * positive).sum(-1) - (user * negative).sum(-1)).mean()
        if self.softmax_negatives is None:
            return F.cross_entropy(user @ self.item_vectors().t(), target)
        # Sampled softmax: the positive against negatives drawn uniformly once per batch, so the
        # item tower runs on softmax_negatives + B items instead of the whole catalogue. A negative
        # equal to a row's target is masked out of that row (an "accidental hit").
        negatives = torch.randint(1, self.n_items, (self.softmax_negatives,), device=target.device)
        positive = (user * self.item_vectors(target)).sum(-1, keepdim=True)
        sampled = (user @ self.item_vectors(negatives).t()).masked_fill(negatives[None, :] == target[:, None], -1e9)
        logits = torch.cat([positive, sampled], dim=1)
        return F.cross_entropy(logits, torch.zeros_like(target))

    def predict(self, interaction):
        """Scores of (user, item) rows. x̂ depends on the user only: one chain per distinct user in
        the batch, shared by all of that user's candidate rows (sampled evaluation, e.g. uni100)."""
        users, rows = interaction[self.USER_ID].unique(return_inverse=True)
        first = torch.full((len(users),), len(rows), device=rows.device).scatter_reduce(0, rows, torch.arange(len(rows), device=rows.device), reduce="amin")
        order = first.argsort()  # users in order of first appearance: noise as a full-sort batch of them draws it
        user = self.forward(interaction[first[order]])[order.argsort()[rows]]
        return (user * self.item_vectors(interaction[self.ITEM_ID])).sum(-1)

    def full_sort_predict(self, interaction):
        return self.forward(interaction) @ self.item_vectors().t()
