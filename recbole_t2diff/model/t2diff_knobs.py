"""T2Diff's knobs, read and checked once (``T2Diff.check_config``); ``properties/model/T2Diff.yaml`` documents each.

Besides the knobs as given, the parsed settings hold ``x_hat``, the one place the tower's x̂ is decided from
``use_diffusion`` and ``x_hat_source``: none (no x̂ token), copy_last (x̂ := x_L, the control), diffusion (the drift
U-Net) or next_item (the next-item denoiser).
"""

from recbole_t2diff.knobs import KnobReader
from recbole_t2diff.model.diffusion import REVERSE_COEFS, SAMPLERS, beta_schedule
from recbole_t2diff.model.unet import PADDINGS, STEP_CONDITIONINGS, STEP_EMBEDDINGS

SESSION_SPLITS = ("last_k", "time_gap")
TIME_LAGS = ("auto", "none", "bucket")
POSITIONS = ("none", "learned")
X_HAT_SOURCES = ("diffusion", "copy_last", "next_item")
GENERATED_X_HATS = ("diffusion", "next_item")  # the x̂ a denoiser generates
XHAT_LOSSES = ("none", "ce")
XHAT_LOSS_ON = ("one_step", "served")
TRAIN_XHATS = ("one_step", "chain")
DIFF_LOSSES = ("l2norm", "mse")
DIFFUSION_SCALES = ("rms", "none")
DIFF_LOSS_POSITIONS = ("all", "valid", "last")
LOSS_TYPES = ("CE", "BPR")


def read_t2diff_knobs(config):
    """The parsed settings (a read-only mapping) of a resolved config, or a one-line UsageError with the fix."""
    knobs = KnobReader(config, "T2Diff")
    refuse = knobs.refuse
    d = _read_tower(knobs)
    _read_diffusion(knobs)
    if knobs.one_of("xhat_loss_on", XHAT_LOSS_ON) == "served" and (config["xhat_loss"] != "ce" or config["train_xhat"] != "chain"):
        refuse(
            "xhat_loss_on",
            f"served with xhat_loss={config['xhat_loss']}, train_xhat={config['train_xhat']}",
            "it puts the x̂ cross-entropy on the chain the tower is served; set xhat_loss: ce and train_xhat: chain",
        )
    use_diffusion = knobs.boolean("use_diffusion")
    if knobs.boolean("x_hat_in_score") and not use_diffusion:
        refuse("x_hat_in_score", "True with use_diffusion=False", "there is no x̂ to add to the score")
    source = knobs.one_of("x_hat_source", X_HAT_SOURCES)
    if source != "diffusion" and not use_diffusion:
        refuse(
            "x_hat_source",
            f"{source} with use_diffusion=False",
            "use_diffusion: False removes x̂ altogether; keep use_diffusion: True to feed the copied last item as x̂",
        )
    if knobs.boolean("x_hat_gate") and not (use_diffusion and source != "copy_last"):
        refuse("x_hat_gate", True, "it gates a generated x̂ against the copied last item; it needs use_diffusion: True and x_hat_source: diffusion or next_item")
    if source == "next_item" and config["train_xhat"] != "chain":
        refuse(
            "x_hat_source",
            f"{source} with train_xhat={config['train_xhat']}",
            "the one-step estimate denoises the noised next item "
            "itself, so the tower would learn from the answer (on ml-100k validation NDCG@10 fell to 0.03); set train_xhat: chain, "
            "the x̂ the sampler serves",
        )
    knobs.keep("x_hat", source if use_diffusion else "none")
    knobs.fraction("condition_dropout")
    knobs.number("guidance_weight", minimum=0)
    knobs.number("lambda_xhat", minimum=0)
    loss_type = knobs.one_of("loss_type", LOSS_TYPES)
    negatives = config["train_neg_sample_args"] or {}
    if loss_type == "BPR" and negatives.get("distribution", "none") == "none":
        refuse("loss_type", loss_type, "BPR needs sampled negatives, set train_neg_sample_args: {distribution: uniform, sample_num: 1}")
    if config["softmax_negatives"] is not None and loss_type != "CE":
        refuse("softmax_negatives", config["softmax_negatives"], "it samples the softmax of loss_type: CE; drop it for BPR")
    knobs.integer("softmax_negatives", 1, optional=True)
    knobs.fraction("dropout_prob")
    knobs.number("lambda_diff", minimum=0)
    if knobs.raw("category_field") is not None and config["category_dim"] is not None:
        if not 0 < knobs.integer("category_dim", 1) < d:
            refuse("category_dim", config["category_dim"], f"it must lie between 0 and embedding_size={d}")
    else:
        knobs.raw("category_dim")
    for flag in ("use_drift", "use_target_attention", "stop_grad", "use_user_ffn", "mask_diag"):
        knobs.boolean(flag)
    knobs.number("emb_max_norm", minimum=0, optional=True)
    knobs.number("initializer_range", minimum=0)
    knobs.number("layer_norm_eps", minimum=0)
    knobs.keep("eval_seed", config["eval_seed"] if config["eval_seed"] is not None else config["seed"])
    knobs.integer("att_hidden", 1, optional=True)
    knobs.widths("session_ffn_hidden", allow_empty=True)
    return knobs.settings()


def _read_tower(knobs):
    """The mixed-attention tower's knobs: history and session, time, heads."""
    max_len = knobs.integer("MAX_ITEM_LIST_LENGTH", 2)
    session_len = knobs.integer("session_len", 1)
    if session_len >= max_len:
        knobs.refuse(
            "session_len",
            session_len,
            f"it must be smaller than MAX_ITEM_LIST_LENGTH={max_len} so that an older history remains; lower session_len or raise MAX_ITEM_LIST_LENGTH",
        )
    split = knobs.one_of("session_split", SESSION_SPLITS)
    gap = knobs.number("session_gap")
    mask_pads = knobs.boolean("mask_pads")
    if split == "time_gap":
        if not gap > 0:
            knobs.refuse("session_gap", knobs.config["session_gap"], "give the gap that ends a session in seconds (> 0), e.g. 1800")
        if not mask_pads:
            knobs.refuse("session_split", "time_gap with mask_pads=False", "sessions of varying length need the padding masks")
    knobs.one_of("time_lag", TIME_LAGS)
    knobs.one_of("position_embedding", POSITIONS)
    d = knobs.integer("embedding_size", 2)
    heads = knobs.integer("n_heads", 1)
    if d % heads:
        knobs.refuse("n_heads", heads, f"it must divide embedding_size={d}")
    return d


def _read_diffusion(knobs):
    """The denoiser's and the sampler's knobs."""
    config = knobs.config
    levels = knobs.integer("unet_levels", 1)
    out_proj = knobs.boolean("unet_out_proj")
    mult = config["unet_mult"]
    if not isinstance(mult, (list, tuple)) or len(mult) < levels or any(int(m) < 1 for m in mult):
        knobs.refuse("unet_mult", mult, f"give at least unet_levels={levels} positive integers")
    knobs.keep("unet_mult", [int(m) for m in mult])
    if int(mult[0]) != 1 and not out_proj:
        knobs.refuse("unet_mult", mult, "the first factor must be 1 unless unet_out_proj is true")
    n_steps = knobs.integer("n_steps", 1)
    beta_schedule(knobs.raw("beta_schedule"), n_steps, knobs.number("beta_a", optional=True), knobs.number("beta_b", optional=True))
    sampler = knobs.one_of("sampler", SAMPLERS)
    infer_steps = knobs.integer("infer_steps", 1, optional=True)
    if infer_steps is not None:
        if sampler == "ddpm" and infer_steps != n_steps:
            knobs.refuse(
                "infer_steps",
                f"{infer_steps} with sampler=ddpm",
                f"the ddpm chain always runs all n_steps={n_steps}; set infer_steps: ~ (--infer_steps=None), or sampler: ddim for fewer steps",
            )
        if infer_steps > n_steps:
            knobs.refuse("infer_steps", f"{infer_steps} with sampler=ddim", f"it must lie in 1..n_steps={n_steps}")
    knobs.number("ddim_eta", minimum=0, maximum=1)
    knobs.integer("infer_samples", 1)
    knobs.one_of("reverse_coef", REVERSE_COEFS)
    knobs.one_of("unet_padding", PADDINGS)
    knobs.one_of("step_emb", STEP_EMBEDDINGS)
    knobs.number("step_emb_scale")
    knobs.boolean("denoiser_next_slot")
    knobs.one_of("diff_loss", DIFF_LOSSES)
    knobs.one_of("diffusion_scale", DIFFUSION_SCALES)
    knobs.one_of("diff_loss_positions", DIFF_LOSS_POSITIONS)
    knobs.one_of("step_conditioning", STEP_CONDITIONINGS)
    knobs.one_of("xhat_loss", XHAT_LOSSES)
    knobs.one_of("train_xhat", TRAIN_XHATS)
