"""Every numeric knob at its edges: the last accepted value passes ``check_config`` and the first
rejected one gets the one-line error naming the knob. A check whose bound moves by one (``<`` for
``<=``, a minimum of 2 for 1) or whose branch is dropped fails here, not at some later crash. A search's float for an integer knob (20.0) is accepted as the
integer."""

import re

import pytest

from recbole_t2diff.config import Config
from recbole_t2diff.errors import UsageError
from recbole_t2diff.model.sparcode import SparCode
from recbole_t2diff.model.t2diff import T2Diff

from helpers import make_model


class Settings(dict):
    """A resolved config as ``check_config`` reads it: a missing key is None, as in RecBole's Config."""

    def __missing__(self, key):
        return None


@pytest.fixture(scope="module")
def defaults():
    return {model: dict(Config(model=model.__name__, dataset="ml-100k").final_config_dict) for model in (T2Diff, SparCode)}


def check(defaults, model, knobs):
    model.check_config(Settings({**defaults[model], **knobs}))


UNIFORM = {"distribution": "uniform", "sample_num": 1}


T2DIFF_ACCEPTED = [
    {"MAX_ITEM_LIST_LENGTH": 2, "session_len": 1},
    {"session_len": 49},
    {"session_split": "time_gap", "session_gap": 0.5},
    {"embedding_size": 2, "n_heads": 1},
    {"embedding_size": 6, "n_heads": 3},
    {"unet_levels": 1, "unet_mult": [1]},
    {"unet_levels": 2, "unet_mult": [1, 1]},
    {"unet_levels": 2, "unet_mult": (1, 3, 9)},
    {"unet_mult": [2, 4, 8, 16], "unet_out_proj": True},
    {"n_steps": 1, "infer_steps": 1},
    {"sampler": "ddim", "infer_steps": 50},
    {"sampler": "ddpm", "infer_steps": 50},
    {"sampler": "ddpm", "infer_steps": None},
    {"ddim_eta": 0},
    {"ddim_eta": 1},
    {"infer_samples": 1},
    {"lambda_xhat": 0},
    {"lambda_diff": 0},
    {"dropout_prob": 0},
    {"dropout_prob": 0.99},
    {"softmax_negatives": 1},
    {"loss_type": "BPR", "train_neg_sample_args": UNIFORM},
    {"x_hat_source": "copy_last", "use_diffusion": True},
    {"x_hat_source": "diffusion", "use_diffusion": False},
    {"x_hat_source": "next_item", "train_xhat": "chain", "guidance_weight": 0, "condition_dropout": 0},
    {"x_hat_source": "next_item", "train_xhat": "chain", "condition_dropout": 0.99, "x_hat_gate": True},
    {"position_embedding": "learned"},
    {"xhat_loss": "ce", "train_xhat": "chain", "xhat_loss_on": "served", "x_hat_in_score": True},
    {"category_field": "genre", "category_dim": 1},
    {"category_field": "genre", "category_dim": 63},
    {"category_field": None, "category_dim": 64},
]


T2DIFF_REJECTED = [
    ({"MAX_ITEM_LIST_LENGTH": 1, "session_len": 1}, "MAX_ITEM_LIST_LENGTH=1"),
    ({"session_len": 0}, "session_len=0"),
    ({"session_len": 50}, "session_len=50"),
    ({"session_len": 1.5}, "session_len=1.5"),
    ({"session_split": "time_gap", "session_gap": 0}, "session_gap=0"),
    ({"session_split": "time_gap", "mask_pads": False}, "session_split=time_gap with mask_pads=False"),
    ({"session_split": "gap"}, "session_split=gap"),
    ({"time_lag": "log"}, "time_lag=log"),
    ({"embedding_size": 1, "n_heads": 1}, "embedding_size=1"),
    ({"n_heads": 0}, "n_heads=0"),
    ({"unet_levels": 0}, "unet_levels=0"),
    ({"unet_levels": 4, "unet_mult": [1, 2, 4]}, "unet_mult=[1, 2, 4]"),
    ({"unet_levels": 2, "unet_mult": [1, 0]}, "unet_mult=[1, 0]"),
    ({"unet_levels": 1, "unet_mult": 1}, "unet_mult=1"),
    ({"unet_levels": 2, "unet_mult": [2, 4]}, "unet_mult=[2, 4]: the first factor must be 1"),
    ({"n_steps": 0}, "n_steps=0"),
    ({"sampler": "ddim", "infer_steps": 51}, "infer_steps=51"),
    ({"sampler": "ddim", "infer_steps": 0}, "infer_steps=0"),
    ({"sampler": "ddpm", "infer_steps": 49}, "infer_steps=49 with sampler=ddpm"),
    ({"ddim_eta": -0.01}, "ddim_eta=-0.01"),
    ({"ddim_eta": 1.01}, "ddim_eta=1.01"),
    ({"infer_samples": 0}, "infer_samples=0"),
    ({"lambda_xhat": -0.1}, "lambda_xhat=-0.1"),
    ({"lambda_diff": -0.1}, "lambda_diff=-0.1"),
    ({"dropout_prob": 1}, "dropout_prob=1"),
    ({"dropout_prob": -0.1}, "dropout_prob=-0.1"),
    ({"softmax_negatives": 0}, "softmax_negatives=0"),
    ({"loss_type": "BPR", "train_neg_sample_args": UNIFORM, "softmax_negatives": 5}, "softmax_negatives"),
    ({"loss_type": "BPR"}, "loss_type=BPR: BPR needs sampled negatives"),
    ({"loss_type": "BPR", "train_neg_sample_args": {"distribution": "none"}}, "loss_type=BPR: BPR needs"),
    ({"loss_type": "BPR", "train_neg_sample_args": {"sample_num": 1}}, "loss_type=BPR: BPR needs"),
    ({"x_hat_source": "copy_last", "use_diffusion": False}, "x_hat_source=copy_last with use_diffusion=False"),
    ({"guidance_weight": -0.1}, "guidance_weight=-0.1"),
    ({"x_hat_source": "next_item"}, "x_hat_source=next_item with train_xhat=one_step"),
    ({"condition_dropout": 1}, "condition_dropout=1"),
    ({"condition_dropout": -0.1}, "condition_dropout=-0.1"),
    ({"x_hat_source": "copy_last", "x_hat_gate": True}, "x_hat_gate=True"),
    ({"category_field": "genre", "category_dim": 64}, "category_dim=64"),
    ({"category_field": "genre", "category_dim": 0}, "category_dim=0"),
    *[
        ({knob: "nonsense"}, f"{knob}=nonsense")
        for knob in (
            "reverse_coef",
            "unet_padding",
            "step_emb",
            "diff_loss",
            "diffusion_scale",
            "diff_loss_positions",
            "step_conditioning",
            "xhat_loss",
            "train_xhat",
            "x_hat_source",
            "loss_type",
            "sampler",
            "position_embedding",
            "xhat_loss_on",
        )
    ],
]


SPARCODE_ACCEPTED = [
    {"embedding_size": 1, "n_heads": 1, "token_size": 1, "n_codebooks": 1},
    {"MAX_ITEM_LIST_LENGTH": 1},
    {"n_layers": 1, "inner_size": 1},
    {"hidden_dropout_prob": 0, "attn_dropout_prob": 0.99},
    {"tokenizer": "dnn", "dnn_hidden": [1], "dnn_dropout": 0},
    {"tokenizer": "dnn", "n_heads": 3},  # only the sasrec tokenizer has heads
    {"n_query_tokens": 1, "n_item_tokens": 1},
    {"n_item_tokens": 3},
    {"quantize": False, "score_mode": "exact"},
    {"codebook_size": 2},
    {"token_size": 2, "n_codebooks": 2, "codebook_size": 2**30},  # keys of 2 x 30 bits
    {"vq_beta": 0, "ema_decay": 0, "ema_eps": 0, "dead_code_threshold": 0},
    {"ema_decay": 0.999},
    {"interaction": "dot", "n_item_tokens": 1},
    {"interaction": "dot", "mlp_hidden": [], "mlp_dropout": 5},  # the MLP's knobs do not apply to dot
    {"mlp_hidden": (1,), "mlp_dropout": 0},
    {"mlp_hidden": [2.0]},
    {"score_relu": False, "score_bias": -1},
    {"last_layer_read_only": False, "bf16_autocast": True, "uniform_dropout": False},
    {"tokenizer": "dnn", "last_layer_read_only": "n/a"},  # only the sasrec tokenizer has layers
    {"score_bias": 0.5},
    {"sparsity_weight": 0, "relu_leak": 0},
    {"loss_type": "BPR", "train_neg_sample_args": UNIFORM, "softmax_negatives": None},
    {"softmax_negatives": 1},
    {"score_mode": "index", "quantize": True},
    {"score_chunk_rows": 1, "index_max_postings": 1, "index_threshold": 0},
    {"nproc": 1},
    {"nproc": 2, "quantize": False},
]


SPARCODE_REJECTED = [
    ({"embedding_size": 0}, "embedding_size=0"),
    ({"token_size": 0}, "token_size=0"),
    ({"MAX_ITEM_LIST_LENGTH": 0}, "MAX_ITEM_LIST_LENGTH=0"),
    ({"MAX_ITEM_LIST_LENGTH": 2.5}, "MAX_ITEM_LIST_LENGTH=2.5"),
    ({"MAX_ITEM_LIST_LENGTH": None}, "MAX_ITEM_LIST_LENGTH=None"),
    ({"tokenizer": "gru"}, "tokenizer=gru"),
    ({"n_layers": 0}, "n_layers=0"),
    ({"n_heads": 0}, "n_heads=0"),
    ({"n_heads": 3}, "n_heads=3"),
    ({"inner_size": 0}, "inner_size=0"),
    ({"hidden_dropout_prob": 1}, "hidden_dropout_prob=1"),
    ({"attn_dropout_prob": -0.1}, "attn_dropout_prob=-0.1"),
    ({"attn_dropout_prob": None}, "attn_dropout_prob=None"),
    ({"tokenizer": "dnn", "dnn_hidden": []}, "dnn_hidden=[]"),
    ({"tokenizer": "dnn", "dnn_hidden": [0]}, "dnn_hidden=[0]"),
    ({"tokenizer": "dnn", "dnn_hidden": [2.5]}, "dnn_hidden=[2.5]"),
    ({"tokenizer": "dnn", "dnn_hidden": 8}, "dnn_hidden=8"),
    ({"tokenizer": "dnn", "dnn_dropout": 1}, "dnn_dropout=1"),
    ({"n_query_tokens": 0}, "n_query_tokens=0"),
    ({"n_item_tokens": 0}, "n_item_tokens=0"),
    ({"quantize": "yes"}, "quantize=yes"),
    ({"n_codebooks": 0}, "n_codebooks=0"),
    ({"n_codebooks": 3}, "n_codebooks=3"),
    ({"codebook_size": 1}, "codebook_size=1"),
    ({"token_size": 2, "n_codebooks": 2, "codebook_size": 2**30 + 1}, "codebook_size=1073741825"),  # 2 x 31 bits
    ({"vq_beta": -0.1}, "vq_beta=-0.1"),
    ({"vq_beta": None}, "vq_beta=None"),
    ({"ema_decay": 1}, "ema_decay=1"),
    ({"ema_eps": -1e-9}, "ema_eps="),
    ({"dead_code_threshold": -0.01}, "dead_code_threshold=-0.01"),
    ({"interaction": "cross"}, "interaction=cross"),
    ({"interaction": "dot", "n_item_tokens": 2}, "n_item_tokens=2"),
    ({"mlp_hidden": [128, 0]}, "mlp_hidden=[128, 0]"),
    ({"mlp_dropout": 1}, "mlp_dropout=1"),
    ({"score_relu": "no"}, "score_relu=no"),
    ({"last_layer_read_only": "yes"}, "last_layer_read_only=yes"),
    ({"bf16_autocast": 1.0}, "bf16_autocast=1.0"),
    ({"uniform_dropout": "no"}, "uniform_dropout=no"),
    ({"score_bias": True}, "score_bias=True"),
    ({"score_bias": "0.5"}, "score_bias=0.5"),
    ({"sparsity_weight": -1}, "sparsity_weight=-1"),
    ({"relu_leak": 1}, "relu_leak=1"),
    ({"loss_type": "NLL"}, "loss_type=NLL"),
    ({"loss_type": "BPR", "softmax_negatives": None}, "loss_type=BPR"),
    ({"loss_type": "BPR", "softmax_negatives": None, "train_neg_sample_args": {"sample_num": 1}}, "loss_type=BPR"),
    ({"loss_type": "BPR", "train_neg_sample_args": UNIFORM}, "softmax_negatives=100"),
    ({"softmax_negatives": 0}, "softmax_negatives=0"),
    ({"score_mode": "approx"}, "score_mode=approx"),
    ({"score_mode": "index", "quantize": False}, "score_mode=index"),
    ({"score_chunk_rows": 0}, "score_chunk_rows=0"),
    ({"index_keys": "some"}, "index_keys=some"),
    ({"index_miss": "skip"}, "index_miss=skip"),
    ({"index_threshold": -0.5}, "index_threshold=-0.5"),
    ({"index_max_postings": 0}, "index_max_postings=0"),
    ({"index_dtype": "int8"}, "index_dtype=int8"),
    ({"nproc": 2}, "nproc=2"),
]


@pytest.mark.parametrize(
    "model,knobs",
    [(T2Diff, k) for k in T2DIFF_ACCEPTED] + [(SparCode, k) for k in SPARCODE_ACCEPTED],
    ids=lambda v: v.__name__ if isinstance(v, type) else str(v),
)
def test_the_last_accepted_value_passes(defaults, model, knobs):
    check(defaults, model, knobs)


@pytest.mark.parametrize(
    "model,knobs,message",
    [(T2Diff, *case) for case in T2DIFF_REJECTED] + [(SparCode, *case) for case in SPARCODE_REJECTED],
    ids=lambda v: v.__name__ if isinstance(v, type) else str(v),
)
def test_the_first_rejected_value_names_its_knob(defaults, model, knobs, message):
    with pytest.raises(UsageError, match=re.escape(f"invalid {model.__name__} setting {message}")) as raised:
        check(defaults, model, knobs)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("knobs,message", [({"beta_a": 0.5}, "beta_a=0.5, beta_b=4.5"), ({"beta_b": 10}, "beta_a=0.01, beta_b=10.0")])
def test_the_schedule_constants_are_checked_with_the_other_knobs(defaults, knobs, message):
    """Both constants reach the check that runs with the config, before any data is loaded."""
    with pytest.raises(UsageError, match=re.escape(message) + r".*outside \(0, 1\)"):
        check(defaults, T2Diff, knobs)


def test_check_config_returns_the_parsed_settings_the_constructor_builds_from(defaults):
    """Integers come back as int (a search's 20.0 included), x̂'s source is decided once as ``x_hat``."""
    knobs = T2Diff.check_config(Settings({**defaults[T2Diff], "n_steps": 20.0, "session_ffn_hidden": None}))
    assert knobs["n_steps"] == 20 and type(knobs["n_steps"]) is int and knobs["session_ffn_hidden"] == []
    assert knobs["x_hat"] == "diffusion"
    for settings, x_hat in [
        ({"use_diffusion": False}, "none"),
        ({"x_hat_source": "copy_last"}, "copy_last"),
        ({"x_hat_source": "next_item", "train_xhat": "chain"}, "next_item"),
    ]:
        assert T2Diff.check_config(Settings({**defaults[T2Diff], **settings}))["x_hat"] == x_hat
    sparcode = SparCode.check_config(Settings({**defaults[SparCode], "mlp_hidden": [8.0, 4]}))
    assert sparcode["mlp_hidden"] == [8, 4] and sparcode["score_bias"] == 0.0 and "dnn_hidden" not in sparcode
    with pytest.raises(TypeError):
        sparcode["score_bias"] = 1.0  # read-only: the constructor takes them as checked


@pytest.mark.parametrize(
    "model,knobs,message",
    [
        (T2Diff, {"lambda_diff": "abc"}, "lambda_diff=abc: it must be a number >= 0"),
        (T2Diff, {"ddim_eta": None}, "ddim_eta=None: it must be a number in [0, 1]"),
        (T2Diff, {"n_steps": float("inf")}, "n_steps=inf: it must be an integer >= 1"),
        (T2Diff, {"use_drift": "yes"}, "use_drift=yes: use true or false"),
        (T2Diff, {"session_ffn_hidden": [0]}, "session_ffn_hidden=[0]: give a list of positive integers"),
        (SparCode, {"relu_leak": float("nan")}, "relu_leak=nan: it must lie in [0, 1)"),
        (SparCode, {"ce_checkpoint": 1}, "ce_checkpoint=1: use true or false"),
    ],
    ids=str,
)
def test_a_value_of_the_wrong_kind_is_refused_in_one_line(defaults, model, knobs, message):
    with pytest.raises(UsageError, match=re.escape(f"invalid {model.__name__} setting {message}")) as raised:
        check(defaults, model, knobs)
    assert "\n" not in str(raised.value)


def test_float_knobs_from_a_search_are_accepted_as_integers(tiny_data):
    config = Config(model="T2Diff", dataset="ml-100k", config_dict={"n_steps": 20.0, "session_len": 5.0})
    T2Diff.check_config(config)  # hyperopt's quniform gives floats: accepted, not rejected
    model = make_model(tiny_data, n_steps=20.0, session_len=5.0)  # ... and used as the integers they stand for
    assert (model.n_steps, model.session_len) == (20, 5) and type(model.n_steps) is type(model.session_len) is int
    assert model.diffusion.alphas_cumprod.shape == (21,)  # one entry per step, plus index 0
