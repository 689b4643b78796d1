"""T2Diff: a two-tower matcher whose user tower carries cross-interaction through diffusion.

Wang et al., "Unleashing the Potential of Two-Tower Models: Diffusion-Based Cross-Interaction for
Large-Scale Matching", WWW 2025. The user tower (Fig. 2):

1. drift preparation: z_0 = [x_2..x_L ; x_next] - [x_1..x_L], the temporal drift of the history;
2. diffusion: a 1-D U-Net reconstructs z_0 from noise, conditioned on the history; the generated
   next item is x̂ = x_L + ẑ_0[L] (training: one-step estimate from the noised true drift;
   inference: the T-step reverse chain, which never sees the target);
3. mixed attention: self-attention over the last ``session_len`` items plus x̂ gives h_s, target
   attention of h_s over the older history gives h_l, and e_u = [h_l ; h_s].

The item tower is e_i = LN(ELU(W·x_i)) and the score is e_u·e_i, so item vectors stay precomputable.
Every knob is documented in ``properties/model/T2Diff.yaml``; the maths is in ``docs/T2DIFF.md``.
"""
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from recbole.model.abstract_recommender import SequentialRecommender

from recbole_t2diff.errors import UsageError
from recbole_t2diff.model.attention import SessionEncoder, TargetAttention, masked_mean
from recbole_t2diff.model.diffusion import REVERSE_COEFS, SAMPLERS, GaussianDiffusion, beta_schedule
from recbole_t2diff.model.unet import PADDINGS, STEP_CONDITIONINGS, STEP_EMBEDDINGS, Denoiser, NextItemDenoiser

SESSION_SPLITS = ("last_k", "time_gap")
TIME_LAGS = ("auto", "none", "bucket")
POSITIONS = ("none", "learned")
LAG_BUCKETS = 24  # log2 buckets of the lag in minutes: the last one starts at 2^22 min (~8 years)
X_HAT_SOURCES = ("diffusion", "copy_last", "next_item")
XHAT_LOSSES = ("none", "ce")
XHAT_LOSS_ON = ("one_step", "served")
TRAIN_XHATS = ("one_step", "chain")
DIFF_LOSSES = ("l2norm", "mse")
DIFFUSION_SCALES = ("rms", "none")
DIFF_LOSS_POSITIONS = ("all", "valid", "last")
LOSS_TYPES = ("CE", "BPR")
NEG_LOGIT = -1e9  # the padding item's logit in the x̂ softmax


def realign(item_seq, item_seq_len):
    """RecBole's left-aligned, end-padded lists -> right-aligned ids (most recent item last) and mask."""
    length = item_seq.size(1)
    source = torch.arange(length, device=item_seq.device)[None, :] - (length - item_seq_len[:, None])
    valid = source >= 0
    return item_seq.gather(1, source.clamp(min=0)) * valid, valid


def _integer(config, key, minimum):
    value = config[key]
    if value is None or float(value) != int(float(value)) or int(float(value)) < minimum:
        raise UsageError(f"invalid T2Diff setting {key}={value}: it must be an integer >= {minimum}")
    return int(float(value))


def _one_of(config, key, choices):
    if config[key] not in choices:
        raise UsageError(f"invalid T2Diff setting {key}={config[key]}: use one of {', '.join(choices)}")
    return config[key]


class T2Diff(SequentialRecommender):
    """T2Diff as a RecBole sequential model, trained with full-softmax CE + λ·diffusion loss."""

    @classmethod
    def check_config(cls, config):
        """Reject invalid knobs before any data is loaded, with a one-line fix."""
        max_len = _integer(config, "MAX_ITEM_LIST_LENGTH", 2)
        session_len = _integer(config, "session_len", 1)
        if session_len >= max_len:
            raise UsageError(
                f"invalid T2Diff setting session_len={session_len}: it must be smaller than "
                f"MAX_ITEM_LIST_LENGTH={max_len} so that an older history remains; lower session_len or raise MAX_ITEM_LIST_LENGTH"
            )
        if _one_of(config, "session_split", SESSION_SPLITS) == "time_gap":
            if not float(config["session_gap"]) > 0:
                raise UsageError(f"invalid T2Diff setting session_gap={config['session_gap']}: give the gap that ends a session in seconds (> 0), e.g. 1800")
            if not config["mask_pads"]:
                raise UsageError("invalid T2Diff setting session_split=time_gap with mask_pads=False: sessions of varying length need the padding masks")
        _one_of(config, "time_lag", TIME_LAGS)
        _one_of(config, "position_embedding", POSITIONS)
        d = _integer(config, "embedding_size", 2)
        heads = _integer(config, "n_heads", 1)
        if d % heads:
            raise UsageError(f"invalid T2Diff setting n_heads={heads}: it must divide embedding_size={d}")
        levels = _integer(config, "unet_levels", 1)
        mult = config["unet_mult"]
        if not isinstance(mult, (list, tuple)) or len(mult) < levels or any(int(m) < 1 for m in mult):
            raise UsageError(f"invalid T2Diff setting unet_mult={mult}: give at least unet_levels={levels} positive integers")
        if int(mult[0]) != 1 and not config["unet_out_proj"]:
            raise UsageError(f"invalid T2Diff setting unet_mult={mult}: the first factor must be 1 unless unet_out_proj is true")
        n_steps = _integer(config, "n_steps", 1)
        beta_schedule(config["beta_schedule"], n_steps, config["beta_a"], config["beta_b"])
        sampler = _one_of(config, "sampler", SAMPLERS)
        if config["infer_steps"] is not None:
            infer_steps = _integer(config, "infer_steps", 1)
            if sampler == "ddpm" and infer_steps != n_steps:
                raise UsageError(
                    f"invalid T2Diff setting infer_steps={infer_steps} with sampler=ddpm: the ddpm chain always runs all "
                    f"n_steps={n_steps}; set infer_steps: ~ (--infer_steps=None), or sampler: ddim for fewer steps"
                )
            if infer_steps > n_steps:
                raise UsageError(
                    f"invalid T2Diff setting infer_steps={infer_steps} with sampler=ddim: it must lie in 1..n_steps={n_steps}"
                )
        if not 0 <= float(config["ddim_eta"]) <= 1:
            raise UsageError(f"invalid T2Diff setting ddim_eta={config['ddim_eta']}: it must lie in [0, 1]")
        _integer(config, "infer_samples", 1)
        _one_of(config, "reverse_coef", REVERSE_COEFS)
        _one_of(config, "unet_padding", PADDINGS)
        _one_of(config, "step_emb", STEP_EMBEDDINGS)
        _one_of(config, "diff_loss", DIFF_LOSSES)
        _one_of(config, "diffusion_scale", DIFFUSION_SCALES)
        _one_of(config, "diff_loss_positions", DIFF_LOSS_POSITIONS)
        _one_of(config, "step_conditioning", STEP_CONDITIONINGS)
        _one_of(config, "xhat_loss", XHAT_LOSSES)
        _one_of(config, "train_xhat", TRAIN_XHATS)
        if _one_of(config, "xhat_loss_on", XHAT_LOSS_ON) == "served" and (config["xhat_loss"] != "ce" or config["train_xhat"] != "chain"):
            raise UsageError(
                f"invalid T2Diff setting xhat_loss_on=served with xhat_loss={config['xhat_loss']}, train_xhat={config['train_xhat']}: "
                "it puts the x̂ cross-entropy on the chain the tower is served; set xhat_loss: ce and train_xhat: chain"
            )
        if config["x_hat_in_score"] and not config["use_diffusion"]:
            raise UsageError("invalid T2Diff setting x_hat_in_score=True with use_diffusion=False: there is no x̂ to add to the score")
        if _one_of(config, "x_hat_source", X_HAT_SOURCES) != "diffusion" and not config["use_diffusion"]:
            raise UsageError(
                f"invalid T2Diff setting x_hat_source={config['x_hat_source']} with use_diffusion=False: use_diffusion: False "
                "removes x̂ altogether; keep use_diffusion: True to feed the copied last item as x̂"
            )
        if config["x_hat_gate"] and not (config["use_diffusion"] and config["x_hat_source"] != "copy_last"):
            raise UsageError("invalid T2Diff setting x_hat_gate=True: it gates a generated x̂ against the copied last item; "
                             "it needs use_diffusion: True and x_hat_source: diffusion or next_item")
        if config["x_hat_source"] == "next_item" and config["train_xhat"] != "chain":
            raise UsageError(
                f"invalid T2Diff setting x_hat_source=next_item with train_xhat={config['train_xhat']}: the one-step estimate "
                "denoises the noised next item itself, so the tower would learn from the answer (on ml-100k validation "
                "NDCG@10 fell to 0.03); set train_xhat: chain, the x̂ the sampler serves"
            )
        if not 0 <= float(config["condition_dropout"]) < 1:
            raise UsageError(f"invalid T2Diff setting condition_dropout={config['condition_dropout']}: it must lie in [0, 1)")
        if float(config["guidance_weight"]) < 0:
            raise UsageError(f"invalid T2Diff setting guidance_weight={config['guidance_weight']}: it must be >= 0")
        if float(config["lambda_xhat"]) < 0:
            raise UsageError(f"invalid T2Diff setting lambda_xhat={config['lambda_xhat']}: it must be >= 0")
        loss_type = _one_of(config, "loss_type", LOSS_TYPES)
        negatives = config["train_neg_sample_args"] or {}
        if loss_type == "BPR" and negatives.get("distribution", "none") == "none":
            raise UsageError(
                "invalid T2Diff setting loss_type=BPR: BPR needs sampled negatives, set "
                "train_neg_sample_args: {distribution: uniform, sample_num: 1}"
            )
        if config["softmax_negatives"] is not None:
            if loss_type != "CE":
                raise UsageError("invalid T2Diff setting softmax_negatives: it samples the softmax of loss_type: CE; drop it for BPR")
            _integer(config, "softmax_negatives", 1)
        if not 0 <= float(config["dropout_prob"]) < 1:
            raise UsageError(f"invalid T2Diff setting dropout_prob={config['dropout_prob']}: it must lie in [0, 1)")
        if float(config["lambda_diff"]) < 0:
            raise UsageError(f"invalid T2Diff setting lambda_diff={config['lambda_diff']}: it must be >= 0")
        if config["category_field"] is not None and config["category_dim"] is not None:
            if not 0 < _integer(config, "category_dim", 1) < d:
                raise UsageError(f"invalid T2Diff setting category_dim={config['category_dim']}: it must lie between 0 and embedding_size={d}")

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.check_config(config)
        d = self.embedding_size = int(config["embedding_size"])
        self.session_len = int(config["session_len"])
        self.session_split = config["session_split"]
        self.session_gap = float(config["session_gap"])
        self.TIME = config["TIME_FIELD"]
        self.TIME_SEQ = self.TIME + config["LIST_SUFFIX"]
        self.time_lag = config["time_lag"]
        needs_time = self.session_split == "time_gap" or self.time_lag == "bucket"
        if needs_time or self.time_lag == "auto":  # one pass over the data's times serves both
            problem = self._time_problem(dataset, "session_split: time_gap" if self.session_split == "time_gap" else "time_lag: bucket")
            if needs_time and problem:
                raise UsageError(problem)
            if self.time_lag == "auto":
                # Measured on ml-100k (results/time): the lag feature added +0.008 test NDCG@10 over 3 seeds;
                # it needs clock time, so data whose time field is an order index (or absent) goes without.
                self.time_lag = "none" if problem else "bucket"
                logging.getLogger().info(f"time_lag: auto -> {self.time_lag}" + (f" ({problem})" if problem else ""))
        self.use_diffusion = config["use_diffusion"]
        self.use_drift = config["use_drift"]
        self.use_target_attention = config["use_target_attention"]
        self.stop_grad = config["stop_grad"]
        self.lambda_diff = float(config["lambda_diff"])
        self.loss_type = config["loss_type"]
        self.softmax_negatives = None if config["softmax_negatives"] is None else int(config["softmax_negatives"])
        self.diff_loss = config["diff_loss"]
        self.diff_loss_positions = config["diff_loss_positions"]
        self.infer_samples = int(config["infer_samples"])
        self.n_steps = int(config["n_steps"])
        self.x_hat_source = config["x_hat_source"]
        self.xhat_loss = config["xhat_loss"]
        self.lambda_xhat = float(config["lambda_xhat"])
        self.train_xhat = config["train_xhat"]
        self.diffusion_scale = config["diffusion_scale"]
        self.set_sampler(config["sampler"], config["infer_steps"], config["ddim_eta"])
        self.emb_max_norm = config["emb_max_norm"]
        self.eval_seed = config["eval_seed"] if config["eval_seed"] is not None else config["seed"]
        self._eval_generator = None
        eps = float(config["layer_norm_eps"])

        # Item tokens: one table shared by the user side (raw tokens) and the item tower.
        category_field = config["category_field"]
        id_dim = d if category_field is None else d - int(config["category_dim"] or d // 2)
        self.item_embedding = nn.Embedding(self.n_items, id_dim, padding_idx=0)
        self.category_embedding = None
        if category_field is not None:
            self.register_buffer("item_categories", self._item_categories(dataset, category_field))
            self.category_embedding = nn.Embedding(dataset.num(category_field), d - id_dim, padding_idx=0)

        # x̂ from a diffusion model: the paper's drift U-Net, or (next_item) a DreamRec-style denoiser of the next
        # item's token alone, conditioned on the tower's encoding of the history, with classifier-free guidance.
        self.denoises = self.use_diffusion and self.x_hat_source in ("diffusion", "next_item")
        self.guidance_weight = float(config["guidance_weight"])
        self.condition_dropout = float(config["condition_dropout"])
        if self.denoises:
            self.diffusion = GaussianDiffusion(
                self.n_steps, config["beta_schedule"], config["beta_a"], config["beta_b"], config["reverse_coef"]
            )
            if self.diffusion_scale == "rms":  # running RMS of what is diffused (the drift, or the next item's token),
                self.register_buffer("drift_rms", torch.zeros(()))  # 0 until training measures it; see ``scale``
        if self.denoises and self.x_hat_source == "next_item":
            self.condition_projection = nn.Linear(2 * d, d)  # e_u without x̂ -> the denoiser's condition
            self.denoiser = NextItemDenoiser(d, self.n_steps, eps)
        elif self.denoises:
            self.denoiser = Denoiser(
                d, self.n_steps, int(config["unet_levels"]), [int(m) for m in config["unet_mult"]], config["unet_padding"],
                config["unet_out_proj"], config["step_emb"], float(config["step_emb_scale"]), eps,
                config["step_conditioning"], config["denoiser_next_slot"],
            )
        mask_pads = config["mask_pads"]
        self.session_encoder = SessionEncoder(
            d, int(config["n_heads"]), config["session_ffn_hidden"] or [], config["mask_diag"], mask_pads, eps
        )
        self.lag_embedding = nn.Embedding(LAG_BUCKETS + 1, d, padding_idx=0) if self.time_lag == "bucket" else None
        # Row j of the right-aligned history is L - 1 - j steps before the request: attention alone is
        # blind to order (a permuted session gives the same h_s), so this embedding is what tells it.
        self.position_embedding = (
            nn.Embedding(self.max_seq_length, d) if config["position_embedding"] == "learned" else None
        )
        self.target_attention = TargetAttention(d, config["att_hidden"], mask_pads, eps) if self.use_target_attention else None
        self.user_ffn = (
            nn.Sequential(nn.Linear(2 * d, 2 * d), nn.ELU(), nn.LayerNorm(2 * d, eps=eps)) if config["use_user_ffn"] else None
        )
        self.item_tower = nn.Sequential(nn.Linear(d, 2 * d, bias=False), nn.ELU(), nn.LayerNorm(2 * d, eps=eps))
        if self.denoises and self.xhat_loss == "ce":
            # Tokens start at ~N(0, initializer_range²) per coordinate, so raw dot products with the
            # table are ~0.03 and the softmax is flat: a learned logit scale, starting where a token's
            # product with itself is 1, lets the x̂ objective sharpen without waiting for the tokens to grow.
            self.xhat_logit_scale = nn.Parameter(torch.tensor(-math.log(d * float(config["initializer_range"]) ** 2)))
        # x_hat_gate: x̂ enters the session as x_L + g·(x̂ - x_L), g starting at 0, so the tower begins as the copy-last
        # control (which beat every diffusion x̂ so far) and takes x̂ in only as far as training finds it useful.
        self.x_hat_gate = nn.Parameter(torch.zeros(())) if self.denoises and config["x_hat_gate"] else None
        self.xhat_loss_on = config["xhat_loss_on"]
        # x_hat_in_score: e_u + P·x̂, P starting at 0, so x̂ can point the score at items directly (still two towers:
        # x̂ depends on the user only).
        self.score_projection = nn.Linear(d, 2 * d, bias=False) if self.use_diffusion and config["x_hat_in_score"] else None
        self.dropout = nn.Dropout(float(config["dropout_prob"]))

        self.initializer_range = float(config["initializer_range"])
        self.apply(self._init_weights)
        if self.denoises and self.x_hat_source == "diffusion":  # _init_weights drew the FiLM maps like any Linear: back to zero
            self.denoiser.unet.zero_film()
        if self.score_projection is not None:  # x̂ enters the score only as far as training moves P from 0
            nn.init.zeros_(self.score_projection.weight)

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
            return (f"{wanted} needs clock time, but '{self.TIME}' only counts each user's interactions (0, 1, 2, ...), as in "
                    f"this project's copies of ml-1m and amazon-beauty: use session_split: last_k and time_lag: none on this data")
        if float(feature[self.TIME].max()) <= 1:
            return (f"{wanted} needs clock time in seconds, but '{self.TIME}' lies in [0, 1] (normalised): set normalize_all: False "
                    f"or leave '{self.TIME}' out of normalize_field")
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
        """Item tower output for ``ids``, or for every item id (padding 0 included) when None."""
        ids = torch.arange(self.n_items, device=self.item_embedding.weight.device) if ids is None else ids
        return self.item_tower(self.tokens(ids, clip=False))

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

    def next_sequence(self, history, next_token):
        """What is diffused: the drift [x_2..x_L ; x_next] - X, or the next-token sequence itself."""
        shifted = torch.cat([history[:, 1:], next_token.unsqueeze(1)], dim=1)
        return shifted - history if self.use_drift else shifted

    def generated_item(self, history, z0_last):
        """x̂ from the last reconstructed row: drift utilisation adds it back onto x_L."""
        return history[:, -1] + z0_last if self.use_drift else z0_last

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

    # ---- diffusion ------------------------------------------------------------------------------

    def scale(self, z0=None, mask=None):
        """The unit the diffusion runs in: the drift's running RMS with ``diffusion_scale: rms``, else 1.

        The schedule's noise is unit Gaussian, but d=64 tokens move by ~0.1 per coordinate, so raw
        drifts drown in noise from the first steps and the denoiser learns to predict ~0. Dividing
        drift and history by their scale (updated from the real rows of training batches ``z0``)
        gives the signal-to-noise ratios the schedule was designed for (docs/T2DIFF.md §6).
        """
        if self.diffusion_scale == "none":
            return 1.0
        if self.training and z0 is not None:
            with torch.no_grad():  # torch.where, not an if on a tensor: no host sync per batch on a GPU
                rms = z0[mask].pow(2).mean().sqrt()
                self.drift_rms.copy_(torch.where(self.drift_rms == 0, rms, 0.99 * self.drift_rms + 0.01 * rms))
        return torch.where(self.drift_rms > 0, self.drift_rms, torch.ones_like(self.drift_rms))  # untrained: 1

    def one_step_estimate(self, z0, condition, s, noise):
        """ẑ_0 from ``z0`` noised at steps ``s`` [B], conditioned on ``condition`` (both in diffusion units)."""
        return self.denoiser(self.diffusion.add_noise(z0, s, noise), condition, s)

    def diffusion_target(self, condition, next_token, mask=None):
        """(z_0, condition, scale): the true drift and the history in diffusion units, and the unit
        (training batches, given their ``mask``, update a running ``scale``)."""
        z0 = self.next_sequence(condition, next_token)
        scale = self.scale(z0, mask)
        return z0 / scale, condition / scale, scale

    def diffusion_training(self, history, mask, target, condition=None):
        """The diffusion losses and the x̂ the tower trains with (docs/T2DIFF.md §9).

        The denoiser learns from one-step estimates of the noised true drift: the row-wise regression
        of ẑ_0 (λ_diff) and, with ``xhat_loss: ce``, a softmax over the item table that asks x̂ to
        name the true next item (λ_xhat; gradients reach the item embeddings through the table).
        The tower's x̂ is that one-step estimate (``train_xhat: one_step`` [P][C]; at small s it is
        nearly the target, which inference never delivers), or ``chain``: a run of the inference
        sampler from noise (detached under ``stop_grad``), so the tower trains on the x̂ it will be served.
        """
        if self.x_hat_source == "next_item":
            return self.next_item_training(condition, target)
        condition = history.detach() if self.stop_grad else history
        next_token = self.tokens(target)
        z0, scaled_condition, scale = self.diffusion_target(condition, next_token.detach() if self.stop_grad else next_token, mask)
        s = torch.randint(1, self.n_steps + 1, (len(z0),), device=z0.device)
        z0_hat = self.one_step_estimate(z0, scaled_condition, s, torch.randn_like(z0))

        per_row = self.row_loss(z0_hat - z0)
        if self.diff_loss_positions == "all":
            rows = torch.ones_like(mask)
        elif self.diff_loss_positions == "valid":  # rows whose next element is a real item
            rows = torch.cat([mask[:, 1:], mask.new_ones(len(mask), 1)], dim=1)
        else:  # last: the row behind x̂
            rows = torch.zeros_like(mask)
            rows[:, -1] = True
        losses = [self.lambda_diff * (per_row * rows).sum() / rows.sum()]

        return self.tower_x_hat(self.generated_item(condition, z0_hat[:, -1] * scale), condition, target, losses)

    def tower_x_hat(self, x_hat, condition, target, losses):
        """The x̂ the tower trains with, given the one-step estimate ``x_hat``; appends the x̂ loss to ``losses``.

        ``xhat_loss_on: served`` puts the x̂ cross-entropy on the chain the tower is served, run with gradients
        into the denoiser (ranking-aligned), instead of on the one-step estimate at a random step."""
        if self.xhat_loss == "ce" and self.xhat_loss_on == "served":
            x_hat = self.generate(condition)
            losses.append(self.lambda_xhat * self.xhat_cross_entropy(x_hat, target))
            return (x_hat.detach() if self.stop_grad else x_hat), losses
        if self.xhat_loss == "ce":
            losses.append(self.lambda_xhat * self.xhat_cross_entropy(x_hat, target))
        if self.train_xhat == "chain":
            # Under stop_grad the chain runs without a graph; without it the tower loss reaches the
            # denoiser through every step of the x̂ it will be served, as it does through one_step.
            with torch.set_grad_enabled(not self.stop_grad):
                x_hat = self.generate(condition)
        return (x_hat.detach() if self.stop_grad else x_hat), losses

    def row_loss(self, error):
        """``diff_loss`` per row of ``error`` [..., d]: its L2 norm (l2norm) or mean squared value (mse)."""
        return error.norm(dim=-1) if self.diff_loss == "l2norm" else error.pow(2).mean(-1)

    def xhat_cross_entropy(self, x_hat, target):
        """Softmax of x̂ against every item token (the padding item excluded), for the true next item."""
        logits = self.xhat_logit_scale.exp() * x_hat @ self.tokens(torch.arange(self.n_items, device=target.device)).t()
        return F.cross_entropy(logits.index_fill(1, logits.new_zeros(1, dtype=torch.long), NEG_LOGIT), target)

    def next_item_training(self, condition, target):
        """``x_hat_source: next_item``: the diffusion loss of the next item's token alone, conditioned on the
        tower's encoding of the history ``condition`` [B, d] (dropped with probability ``condition_dropout``),
        and the x̂ the tower trains with, as :meth:`diffusion_training` for the drift."""
        next_token = self.tokens(target)
        x0 = next_token.detach() if self.stop_grad else next_token
        scale = self.scale(x0.unsqueeze(1), torch.ones(len(x0), 1, dtype=torch.bool, device=x0.device))
        x0 = x0 / scale
        s = torch.randint(1, self.n_steps + 1, (len(x0),), device=x0.device)
        dropped = torch.rand(len(x0), device=x0.device) < self.condition_dropout
        x0_hat = self.denoiser(self.diffusion.add_noise(x0, s, torch.randn_like(x0)), condition, s, dropped)
        per_row = self.row_loss(x0_hat - x0)
        return self.tower_x_hat(x0_hat * scale, condition, target, [self.lambda_diff * per_row.mean()])

    def next_item_condition(self, tokens, mask, in_session=None):
        """The next-item denoiser's condition [B, d]: the tower's user vector without x̂, projected to d (the
        projection is the generator's: under ``stop_grad`` the diffusion loss trains it, not the tower)."""
        encoding = self.user_vector(tokens, mask, None, in_session)
        return self.condition_projection(encoding.detach() if self.stop_grad else encoding)

    def generate(self, condition, generator=None):
        """x̂ from the inference sampler: ``condition`` is the history [B, L, d] for the drift U-Net, the history's
        encoding [B, d] for ``next_item``."""
        if self.x_hat_source == "next_item":
            return self.sample_next_item(condition, generator)
        return self.sample_generated_item(condition, generator)

    def sample_next_item(self, condition, generator=None):
        """x̂ from the reverse chain over the next item's token, with classifier-free guidance: each call
        estimates (1 + w)·f(z, c) - w·f(z, ∅), w = ``guidance_weight``; averaged over ``infer_samples`` chains."""
        batch, d = condition.shape
        scale = self.scale()
        condition = condition.repeat_interleave(self.infer_samples, dim=0)
        free = torch.ones(len(condition), dtype=torch.bool, device=condition.device)

        def denoise(z_s, s):
            steps = torch.full((len(z_s),), s, device=z_s.device, dtype=torch.long)
            guided = self.denoiser(z_s, condition, steps)
            if self.guidance_weight == 0:
                return guided
            return (1 + self.guidance_weight) * guided - self.guidance_weight * self.denoiser(z_s, condition, steps, free)

        z0 = self.reverse(denoise, condition.shape, generator, condition.device)
        return (z0 * scale).view(batch, self.infer_samples, d).mean(1)

    def sample_generated_item(self, history, generator=None):
        """x̂ from the reverse chain (DDPM, or DDIM with ``infer_steps`` calls), averaged over ``infer_samples`` chains per user.

        Noise comes from ``generator`` (None: torch's global one, as in training).
        """
        batch, _, d = history.shape
        scale = self.scale()
        condition = history.repeat_interleave(self.infer_samples, dim=0)
        scaled_condition = condition / scale

        def denoise(z_s, s):
            return self.denoiser(z_s, scaled_condition, torch.full((len(z_s),), s, device=z_s.device, dtype=torch.long))

        z0 = self.reverse(denoise, condition.shape, generator, history.device)
        return self.generated_item(condition, z0[:, -1] * scale).view(batch, self.infer_samples, d).mean(1)

    def reverse(self, denoise, shape, generator, device):
        """ẑ_0 from pure noise of ``shape`` by the configured sampler (DDIM with ``infer_steps`` calls, or the
        ancestral chain), its noise drawn from ``generator`` (None: torch's global one)."""

        def draw_noise(size):
            return torch.randn(size, generator=generator, device=device)

        z_T = draw_noise(shape)
        if self.sampler == "ddim":
            return self.diffusion.ddim_chain(denoise, z_T, draw_noise, self.infer_steps, self.ddim_eta)
        return self.diffusion.reverse_chain(denoise, z_T, draw_noise)

    def inference_x_hat(self, history, condition=None):
        """The x̂ that evaluation and serving use: the reverse chain, the copied last item (control), or None.
        ``x_hat_source: next_item`` needs its ``condition`` (:meth:`next_item_condition`)."""
        if not self.use_diffusion:
            return None
        if not self.denoises:
            return history[:, -1]
        return self.generate(history if condition is None else condition, self.eval_generator(history.device))

    def session_x_hat(self, history, x_hat):
        """The x̂ token the session attention reads: x̂ itself, or with ``x_hat_gate`` x_L + g·(x̂ - x_L)."""
        if self.x_hat_gate is None or x_hat is None:
            return x_hat
        last = history[:, -1].detach() if self.stop_grad else history[:, -1]  # as the copy-last control's x̂
        return last + self.x_hat_gate * (x_hat - last)

    def set_sampler(self, sampler, infer_steps=None, ddim_eta=0.0):
        """Choose the inference sampler; it changes no weight, so a trained model can switch."""
        self.sampler = sampler
        self.infer_steps = int(infer_steps or self.n_steps)
        self.ddim_eta = float(ddim_eta)

    def eval_generator(self, device):
        """The random generator of the reverse chain, re-seeded with ``eval_seed`` at every evaluation."""
        if self._eval_generator is None or self._eval_generator.device != torch.device(device):
            self._eval_generator = torch.Generator(device=device).manual_seed(int(self.eval_seed))
        return self._eval_generator

    def train(self, mode=True):
        # RecBole's trainer calls model.eval() at the start of every evaluation: dropping the
        # generator there makes each evaluation draw the same chain noise, so valid and test
        # metrics do not depend on what ran before (training, other evaluations, a reload).
        if not mode:
            self._eval_generator = None
        return super().train(mode)

    def xhat_quality(self, loader):
        """How close the x̂ that inference serves is to the true next item, over a full-sort split.

        Returns ``xhat_rel_error`` = Σ|x̂ - x_next| / Σ|x_next - x_L| (pooled over users: 1.0 is what
        copying x_L scores) and ``xhat_hit@1`` / ``xhat_hit@10``: how often the true next item is the
        nearest item token to x̂ in L2, or among its 10 nearest (the padding item excluded). None for a
        model without x̂.
        """
        if not self.use_diffusion:
            return None
        self.eval()  # also re-seeds the chain's noise, as every evaluation does
        error = drift = hit1 = hit10 = count = 0.0
        with torch.no_grad():
            items = self.tokens(torch.arange(1, self.n_items, device=self.item_embedding.weight.device))
            for batch in loader:
                interaction = batch[0].to(items.device)
                history, mask = self.history(interaction)
                tokens, in_session = self.tower_inputs(interaction, history, mask)
                x_hat = self.inference_x_hat(history, self.condition(tokens, mask, in_session))
                target_ids = interaction[self.ITEM_ID]
                target = self.tokens(target_ids)
                error += (x_hat - target).norm(dim=-1).sum().item()
                drift += (target - history[:, -1]).norm(dim=-1).sum().item()
                distance = torch.cdist(x_hat, items)
                rank = (distance < distance.gather(1, (target_ids - 1)[:, None])).sum(1)
                hit1 += (rank < 1).sum().item()
                hit10 += (rank < 10).sum().item()
                count += len(rank)
        return {"xhat_rel_error": round(error / max(drift, 1e-12), 4), "xhat_hit@1": round(hit1 / count, 4),
                "xhat_hit@10": round(hit10 / count, 4)}

    # ---- RecBole interface ----------------------------------------------------------------------

    def forward(self, interaction):
        """User vectors e_u [B, 2d] for inference: x̂ comes from the reverse chain, never the target."""
        history, mask = self.history(interaction)
        tokens, in_session = self.tower_inputs(interaction, history, mask)
        x_hat = self.inference_x_hat(history, self.condition(tokens, mask, in_session))
        return self.user_vector(tokens, mask, self.session_x_hat(history, x_hat), in_session)

    def condition(self, tokens, mask, in_session):
        """What the next-item denoiser is conditioned on (None for every other x̂): see :meth:`next_item_condition`."""
        return self.next_item_condition(tokens, mask, in_session) if self.denoises and self.x_hat_source == "next_item" else None

    def calculate_loss(self, interaction):
        history, mask = self.history(interaction)
        tokens, in_session = self.tower_inputs(interaction, history, mask)
        x_hat, diffusion_losses = None, []
        if self.denoises:
            x_hat, diffusion_losses = self.diffusion_training(history, mask, interaction[self.POS_ITEM_ID],
                                                              self.condition(tokens, mask, in_session))
            x_hat = self.session_x_hat(history, x_hat)
        elif self.use_diffusion:  # the copy-last control: x̂ := x_L, treated like a generated x̂
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
        first = torch.full((len(users),), len(rows), device=rows.device).scatter_reduce(
            0, rows, torch.arange(len(rows), device=rows.device), reduce="amin")
        order = first.argsort()  # users in order of first appearance: noise as a full-sort batch of them draws it
        user = self.forward(interaction[first[order]])[order.argsort()[rows]]
        return (user * self.item_vectors(interaction[self.ITEM_ID])).sum(-1)

    def full_sort_predict(self, interaction):
        return self.forward(interaction) @ self.item_vectors().t()
