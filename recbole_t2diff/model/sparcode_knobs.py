"""SparCode's knobs, read and checked once (``SparCode.check_config``); ``properties/model/SparCode.yaml`` documents each.

A knob that only one variant uses (the SASRec tokenizer's layers, the MLP's widths) is read only for that variant,
so the other variants' configs may leave it at anything.
"""

from recbole_t2diff.knobs import KnobReader

TOKENIZERS = ("sasrec", "dnn")
INTERACTIONS = ("mlp", "dot")
LOSS_TYPES = ("CE", "BPR")
SCORE_MODES = ("exact", "index")
INDEX_KEYS = ("all", "used")
INDEX_MISSES = ("compute", "empty")
INDEX_DTYPES = ("float32", "float16")


def read_sparcode_knobs(config):
    """The parsed settings (a read-only mapping) of a resolved config, or a one-line UsageError with the fix."""
    knobs = KnobReader(config, "SparCode")
    refuse = knobs.refuse
    d = knobs.integer("embedding_size", 1)
    d_t = knobs.integer("token_size", 1)
    knobs.integer("MAX_ITEM_LIST_LENGTH", 1)
    if knobs.one_of("tokenizer", TOKENIZERS) == "sasrec":
        knobs.integer("n_layers", 1)
        heads = knobs.integer("n_heads", 1)
        if d % heads:
            refuse("n_heads", heads, f"it must divide embedding_size={d}")
        knobs.integer("inner_size", 1)
        knobs.fraction("hidden_dropout_prob")
        knobs.fraction("attn_dropout_prob")
        knobs.boolean("last_layer_read_only")
        knobs.raw("hidden_act")  # RecBole's TransformerEncoder names its choices
    else:
        knobs.widths("dnn_hidden")
        knobs.fraction("dnn_dropout")
    knobs.integer("n_query_tokens", 1)
    item_tokens = knobs.integer("n_item_tokens", 1)
    quantize = knobs.boolean("quantize")
    codebooks = knobs.integer("n_codebooks", 1)
    size = knobs.integer("codebook_size", 2)
    if d_t % codebooks:
        refuse("n_codebooks", codebooks, f"it must divide token_size={d_t}")
    if codebooks * (size - 1).bit_length() >= 62:
        refuse("codebook_size", size, "codebook_size ** n_codebooks must stay below 2^62 for int64 keys; lower one of them")
    knobs.number("vq_beta", minimum=0)
    knobs.fraction("ema_decay")
    knobs.number("ema_eps", minimum=0)
    knobs.number("dead_code_threshold", minimum=0)
    interaction = knobs.one_of("interaction", INTERACTIONS)
    if interaction == "dot" and item_tokens != 1:
        refuse("n_item_tokens", item_tokens, "interaction: dot scores one item token; set n_item_tokens: 1")
    if interaction == "mlp":
        knobs.widths("mlp_hidden")
        knobs.fraction("mlp_dropout")
    knobs.boolean("score_relu")
    knobs.number("score_bias", example="0.0 or -0.5")
    knobs.number("sparsity_weight", minimum=0)
    knobs.fraction("relu_leak")
    loss_type = knobs.one_of("loss_type", LOSS_TYPES)
    negatives = config["train_neg_sample_args"] or {}
    if loss_type == "BPR" and negatives.get("distribution", "none") == "none":
        refuse("loss_type", loss_type, "BPR needs sampled negatives, set train_neg_sample_args: {distribution: uniform, sample_num: 1}")
    knobs.boolean("uniform_dropout")
    knobs.boolean("bf16_autocast")
    knobs.boolean("ce_checkpoint")
    if config["softmax_negatives"] is not None and loss_type != "CE":
        refuse("softmax_negatives", config["softmax_negatives"], "it samples the softmax of loss_type: CE; set softmax_negatives: ~ for BPR")
    knobs.integer("softmax_negatives", 1, optional=True)
    if knobs.one_of("score_mode", SCORE_MODES) == "index" and not quantize:
        refuse("score_mode", "index", "the index is keyed by codes and needs quantize: true; use score_mode: exact")
    knobs.integer("score_chunk_rows", 1, optional=True)
    knobs.one_of("index_keys", INDEX_KEYS)
    knobs.one_of("index_miss", INDEX_MISSES)
    knobs.number("index_threshold", minimum=0)
    knobs.integer("index_max_postings", 1, optional=True)
    knobs.one_of("index_dtype", INDEX_DTYPES)
    if quantize and int(config["nproc"] or 1) > 1:
        refuse("nproc", config["nproc"], "the codebooks' EMA is not synchronised across processes; train with one process or quantize: false")
    knobs.number("initializer_range", minimum=0)
    knobs.number("layer_norm_eps", minimum=0)
    return knobs.settings()
