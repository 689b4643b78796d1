"""SparCode (sparcode.py, interaction.py, layers.py; docs/SPARCODE.md §15): the tokenizer's layout, the split-layer
algebra of the interaction, the losses, the two-tower reduction, checkpoints and the runner. The quantizer's maths is in
test_quantizer.py, the sparse index in test_sparse_index.py.
"""

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recbole_t2diff.errors import UsageError
from recbole_t2diff.export import export_embeddings
from recbole_t2diff.quick_start import evaluate_checkpoint, load_data_and_model, run

from helpers import (
    QUIET,
    REPO,
    TINY_MODEL,
    TINY_SPARCODE,
    copy_batch,
    first_batch,
    make_model,
    scores,
    tiny_config,
    trained_sparcode,
    valid_batch,
    with_negatives,
)


# ---- layout ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer", ["sasrec", "dnn"])
def test_padding_and_garbage_after_the_length_change_no_score(sparcode_data, tokenizer):
    batch = valid_batch(sparcode_data)
    lengths = batch["item_length"]
    assert (lengths < batch["item_id_list"].size(1)).any(), "the batch must contain padded sequences"
    model = trained_sparcode(sparcode_data, tokenizer=tokenizer)
    before = scores(model, batch)
    seq = batch["item_id_list"].clone()
    seq[torch.arange(seq.size(1))[None, :] >= lengths[:, None]] = 5
    altered = copy_batch(batch)
    altered.interaction["item_id_list"] = seq
    if tokenizer == "dnn":  # the DNN pools embeddings: padding must be masked, not zero by luck
        with torch.no_grad():
            model.item_embedding.weight[0] = 3.0
        altered.interaction["item_id_list"] = batch["item_id_list"]
    torch.testing.assert_close(before[:, 1:], scores(model, altered)[:, 1:])


def test_scoring_never_reads_the_target(sparcode_data):
    batch = valid_batch(sparcode_data)
    model = trained_sparcode(sparcode_data)
    before = scores(model, batch)
    altered = copy_batch(batch)
    altered.interaction["item_id"] = torch.ones_like(batch["item_id"])
    torch.testing.assert_close(before, scores(model, altered))


def test_the_sasrec_tokenizer_is_recboles_sasrec(sparcode_data, tiny_path):
    from recbole.model.sequential_recommender.sasrec import SASRec

    model = trained_sparcode(sparcode_data, n_heads=4, hidden_act="relu", layer_norm_eps=1e-5)  # no default left to fall back on
    batch = valid_batch(sparcode_data)
    config = sparcode_data[0]
    keys = ("n_layers", "n_heads", "inner_size", "hidden_dropout_prob", "attn_dropout_prob", "hidden_act", "layer_norm_eps")
    sasrec_config = tiny_config(tiny_path, model="SASRec", hidden_size=config["embedding_size"], **{k: config[k] for k in keys})
    sasrec_config["n_heads"], sasrec_config["hidden_act"], sasrec_config["layer_norm_eps"] = 4, "relu", 1e-5
    sasrec = SASRec(sasrec_config, sparcode_data[1].dataset)
    weights = {("LayerNorm" + name[len("input_norm") :] if name.startswith("input_norm") else name): value for name, value in model.state_dict().items()}
    sasrec.load_state_dict({name: weights[name] for name in sasrec.state_dict()})
    sasrec.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.history_vector(batch), sasrec(batch["item_id_list"], batch["item_length"]))


@pytest.mark.parametrize("n_layers", [1, 2])
def test_the_last_layer_at_the_read_position_is_the_full_stack_read_there(sparcode_data, monkeypatch, n_layers):
    batch = valid_batch(sparcode_data)
    assert len(set(batch["item_length"].tolist())) > 1, "read positions must differ across the batch"
    full = trained_sparcode(sparcode_data, n_layers=n_layers, n_heads=2, last_layer_read_only=False, **QUIET)
    read_only = make_model(sparcode_data, n_layers=n_layers, n_heads=2, last_layer_read_only=True, **QUIET)
    read_only.load_state_dict(full.state_dict())
    assert (full.last_layer_read_only, read_only.last_layer_read_only) == (False, True)
    with torch.no_grad():
        torch.testing.assert_close(read_only.eval().history_vector(batch), full.eval().history_vector(batch), rtol=1e-5, atol=1e-6)
    # Gradients in float64: in float32 the input LayerNorm's cancellation (eps 1e-12) amplifies rounding.
    for model in (full.double(), read_only.double()):
        model.train()  # dropout 0: training mode computes the same function, and gradients flow
        model.zero_grad()
        model.history_vector(batch).pow(2).sum().backward()
    for (name, weight), (_, other) in zip(full.named_parameters(), read_only.named_parameters()):
        if weight.grad is not None:
            torch.testing.assert_close(other.grad, weight.grad, rtol=1e-9, atol=1e-20, msg=name)
    last = read_only.trm_encoder.layer[-1]
    monkeypatch.setattr(last, "forward", lambda *args: pytest.fail("the last layer ran at every position"))
    read_only.history_vector(batch)


def test_uniform_dropout_draws_the_same_masks_as_dropout():
    from recbole_t2diff.model.sparcode import UniformDropout

    torch.manual_seed(0)
    x = torch.rand(400, 2500) + 1.0  # no zero to mistake for a dropped entry
    for p in (0.1, 0.5):
        dropout = UniformDropout(p)
        out = dropout(x)
        kept = out != 0
        assert abs(kept.float().mean().item() - (1 - p)) < 0.002  # Bernoulli(1 - p) over 1e6 entries: sd 5e-4
        torch.testing.assert_close(out[kept], x[kept] / (1 - p))
        assert not torch.equal(kept[0], kept[1]), "a fresh mask per entry"
        assert dropout(x.to(torch.bfloat16)).dtype == torch.bfloat16
        x.requires_grad_(True)
        dropout(x).sum().backward()
        torch.testing.assert_close(x.grad[x.grad != 0], torch.full_like(x.grad[x.grad != 0], 1 / (1 - p)))
        x = x.detach()
        assert dropout.eval()(x) is x and UniformDropout(0.0)(x) is x


@pytest.mark.parametrize("tokenizer", ["sasrec", "dnn"])
def test_uniform_dropout_replaces_every_dropout_and_only_when_asked(sparcode_data, tokenizer):
    from recbole_t2diff.model.sparcode import UniformDropout

    knobs = {"tokenizer": tokenizer, "mlp_dropout": 0.2, "hidden_dropout_prob": 0.3, "attn_dropout_prob": 0.4, "dnn_dropout": 0.1}
    model = make_model(sparcode_data, uniform_dropout=True, **knobs)
    plain = make_model(sparcode_data, uniform_dropout=False, **knobs)
    dropouts = [(name, type(module), module.p) for name, module in model.named_modules() if isinstance(module, nn.Dropout)]
    expected = [(name, UniformDropout, module.p) for name, module in plain.named_modules() if isinstance(module, nn.Dropout)]
    assert dropouts == expected and len(dropouts) >= (6 if tokenizer == "sasrec" else 2)
    assert all(type(module) is nn.Dropout for module in plain.modules() if isinstance(module, nn.Dropout))
    assert model.state_dict().keys() == plain.state_dict().keys()


@pytest.mark.parametrize("act, fused", [("gelu", F.gelu), ("swish", F.silu), ("relu", F.relu)])
def test_the_tokenizer_computes_recboles_activation_with_torchs_kernel(sparcode_data, act, fused):
    """The same function as RecBole's FeedForward (forward and gradients, to float rounding), by torch's kernel."""
    import copy

    from recbole.model.layers import FeedForward

    model = make_model(sparcode_data, hidden_act=act, n_layers=2)
    assert [layer.feed_forward.intermediate_act_fn for layer in model.trm_encoder.layer] == [fused, fused]
    recbole = copy.deepcopy(model.trm_encoder)
    for layer in recbole.layer:
        layer.feed_forward.intermediate_act_fn = FeedForward.get_hidden_act(layer.feed_forward, act)
    z = torch.linspace(-8, 8, 4001, requires_grad=True)
    for layer, plain in zip(model.trm_encoder.layer, recbole.layer):
        (value, slope), (plain_value, plain_slope) = (
            (y, torch.autograd.grad(y.sum(), z)[0]) for y in (layer.feed_forward.intermediate_act_fn(z), plain.feed_forward.intermediate_act_fn(z))
        )
        torch.testing.assert_close(value, plain_value, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(slope, plain_slope, rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)  # and wired as RecBole's: the whole encoder, forward and backward
    x, mask = torch.randn(8, 12, model.trm_encoder.layer[0].feed_forward.dense_1.in_features) * 3, torch.zeros(8, 1, 12, 12)
    outputs = []
    for encoder in (model.trm_encoder.eval(), recbole.eval()):
        encoder.zero_grad()
        out = encoder(x, mask)[-1]
        out.pow(2).sum().backward()
        outputs.append((out, [w.grad for w in encoder.parameters()]))
    (fused_out, fused_grads), (plain_out, plain_grads) = outputs
    torch.testing.assert_close(fused_out, plain_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_the_dnn_tokenizer_pools_the_real_items_of_each_history(sparcode_data):
    model, batch = trained_sparcode(sparcode_data, tokenizer="dnn"), copy_batch(valid_batch(sparcode_data))
    seq = batch["item_id_list"].clone()
    seq[0], seq[1] = 0, 0
    seq[0, 0], seq[1, :3] = 1, torch.tensor([1, 2, 1])  # a history of item 1 alone, and one with item 1 twice
    batch.interaction["item_id_list"], batch.interaction["item_length"] = seq, (seq > 0).sum(1)
    assert model.item_embedding.weight[0].abs().sum() > 0, "the padding row is not zero: the mask must exclude it"
    expected = torch.stack([model.item_embedding(row[row > 0]).mean(0) for row in seq])
    with torch.no_grad():
        torch.testing.assert_close(model.history_vector(batch), model.dnn(expected))


def test_scoring_knobs_reach_the_model(sparcode_data):
    from recbole_t2diff.model.sparcode import DEFAULT_CHUNK

    model = make_model(sparcode_data, ce_checkpoint=True, score_mode="index", score_chunk_rows=1234)
    assert (model.ce_checkpoint, model.score_mode, model.score_chunk_rows) == (True, "index", 1234)
    default = make_model(sparcode_data)
    assert (default.ce_checkpoint, default.score_mode) == (False, "exact")
    # Unset, the block size is the device type's: a GPU takes larger blocks; an unknown type, the CPU's.
    devices = [("cpu", DEFAULT_CHUNK["cpu"]), ("meta", DEFAULT_CHUNK["cpu"])]
    for device, expected in devices + ([("cuda", DEFAULT_CHUNK["cuda"])] if torch.cuda.is_available() else []):
        assert make_model(sparcode_data, device=torch.device(device)).score_chunk_rows == expected


def test_train_trains_and_eval_reports_then_clears_the_dead_positives(sparcode_data, caplog):
    model = make_model(sparcode_data)
    model.eval()
    assert model.train() is model and model.training and model.quantizer.training
    model.dead_positives += torch.tensor([1, 1])  # one positive seen, and it was dead
    model.train()
    assert model.dead_positives.tolist() == [1, 1], "counted over the epoch: training mode keeps them"
    with caplog.at_level("INFO"):
        model.eval()
    assert "SparCode: 100.0% of training positives had every token score <= -score_bias" in caplog.text
    assert model.dead_positives.tolist() == [0, 0] and not model.training


def test_every_width_and_quantizer_knob_reaches_its_layer(sparcode_data):
    model = make_model(
        sparcode_data, tokenizer="dnn", dnn_hidden=[16, 12], mlp_hidden=[16, 12, 10], n_item_tokens=2, ema_decay=0.5, ema_eps=0.1, dead_code_threshold=0.2
    )
    d, d_t = model.embedding_size, model.token_size
    shapes = lambda stack: [(layer.in_features, layer.out_features) for layer in stack if isinstance(layer, nn.Linear)]
    assert shapes(model.dnn) == [(d, 16), (16, 12), (12, d)]
    assert (model.query_layer.in_features, model.query_layer.out_features, model.query_layer.bias) == (d_t, 16, None)
    assert (model.item_layer.in_features, model.item_layer.out_features) == (2 * d_t, 16)
    assert shapes(model.mlp_tail) == [(16, 12), (12, 10), (10, 1)]
    assert (model.quantizer.decay, model.quantizer.eps, model.quantizer.dead_code_threshold) == (0.5, 0.1, 0.2)
    assert model.dead_positives.dtype == torch.long  # exact counts


def test_sasrec_knobs_reach_the_encoder(sparcode_data):
    model = make_model(sparcode_data, n_heads=4, attn_dropout_prob=0.2, hidden_dropout_prob=0.3, hidden_act="relu", layer_norm_eps=1e-5)
    layer = model.trm_encoder.layer[0]
    assert (layer.multi_head_attention.num_attention_heads, layer.multi_head_attention.attn_dropout.p) == (4, 0.2)
    assert (layer.multi_head_attention.out_dropout.p, layer.feed_forward.LayerNorm.eps) == (0.3, 1e-5)
    assert layer.feed_forward.intermediate_act_fn is F.relu


def test_initial_weights_follow_recboles_sasrec_and_padding_never_learns(sparcode_data):
    model = make_model(sparcode_data, initializer_range=0.05)
    assert abs(model.item_embedding.weight.std().item() / 0.05 - 1) < 0.15 and abs(model.item_embedding.weight.mean()) < 0.02
    assert (model.input_norm.weight == 1).all() and (model.input_norm.bias == 0).all()
    assert (model.query_heads.bias == 0).all()
    model.train()
    batch = first_batch(sparcode_data[1])
    loss = model.calculate_loss(batch)
    sum(loss if isinstance(loss, tuple) else [loss]).backward()
    grad = model.item_embedding.weight.grad
    assert (grad[0] == 0).all(), "the padding id gets no gradient"
    assert (grad[1] != 0).any(), "item 1 is a real item and learns"


def test_forward_is_the_query_tokens(sparcode_data):
    model, batch = trained_sparcode(sparcode_data), valid_batch(sparcode_data)
    with torch.no_grad():
        torch.testing.assert_close(model(batch), model.query_values(batch))


def test_tokens_work_for_histories_of_one_item(sparcode_data):
    batch = copy_batch(valid_batch(sparcode_data))
    batch.interaction["item_length"] = torch.ones_like(batch["item_length"])
    for tokenizer in ("sasrec", "dnn"):
        assert torch.isfinite(scores(trained_sparcode(sparcode_data, tokenizer=tokenizer), batch)).all()


# ---- algebra --------------------------------------------------------------------------------------


def test_split_first_layer_equals_the_concatenated_mlp(sparcode_data):
    model = trained_sparcode(sparcode_data, mlp_dropout=0.0)
    query, items = torch.randn(5, 8), model.item_vectors()
    joint = nn.Linear(16, 16)
    with torch.no_grad():
        joint.weight.copy_(torch.cat([model.query_layer.weight, model.item_layer.weight], dim=1))
        joint.bias.copy_(model.item_layer.bias)
        pairs = torch.cat([query[:, None].expand(-1, len(items), -1), items[None].expand(5, -1, -1)], dim=-1)
        concatenated = model.mlp_tail(torch.relu(joint(pairs))).squeeze(-1)
        split = model.interact(model.query_side(query)[:, None], model.item_side()[None])
    torch.testing.assert_close(split, concatenated)


@pytest.mark.parametrize("overrides", [{}, {"quantize": False}, {"interaction": "dot"}, {"score_relu": False, "score_bias": -0.3}])
def test_predict_equals_full_sort_predict_on_every_item(sparcode_data, overrides):
    batch = valid_batch(sparcode_data)
    model = trained_sparcode(sparcode_data, **overrides)
    full = scores(model, batch)
    for item in range(1, model.n_items):
        single = copy_batch(batch)
        single.interaction["item_id"] = torch.full_like(batch["item_id"], item)
        with torch.no_grad():
            torch.testing.assert_close(model.predict(single), full[:, item])


def test_blocks_and_code_dedupe_change_no_score(sparcode_data):
    """Any block size gives the same scores, and the deduplicated sum Σ_k r[code_k] equals scoring
    every token separately (users sharing codes, and a user using a code twice, included)."""
    batch = valid_batch(sparcode_data)
    model = trained_sparcode(sparcode_data)
    full = scores(model, batch)
    model.score_chunk_rows = 1
    torch.testing.assert_close(scores(model, batch), full)
    with torch.no_grad():
        query = model.query_values(batch)  # [B, K, d_t]
        per_token = sum(model.code_scores(query[:, k]) for k in range(model.n_query_tokens))
        rows, token_row = model.query_rows(batch)
    assert len(rows) < len(token_row), "the batch must share codes for dedupe to matter"
    torch.testing.assert_close(full, per_token)


def test_row_scores_split_rows_into_blocks_of_the_pair_budget_and_checkpoint_only_with_grad(sparcode_data, monkeypatch):
    import recbole_t2diff.model.interaction as interaction_module

    model = make_model(sparcode_data)
    rows, items = torch.randn(7, 16), torch.randn(5, 16)
    blocks, checkpointed = [], []
    interact = model.interact
    monkeypatch.setattr(model, "interact", lambda q, v: blocks.append(q.shape[0]) or interact(q, v))
    whole = model.activate(interact(rows[:, None], items[None]))
    for budget, expected in [(10, [2, 2, 2, 1]), (4, [1] * 7), (100, [7])]:  # rows per block: budget // items, at least 1
        model.score_chunk_rows, blocks[:] = budget, []
        torch.testing.assert_close(model.row_scores(rows, items), whole)
        assert blocks == expected
    model.score_chunk_rows, blocks[:] = 3, []
    model.row_scores(rows, items[:1])
    assert blocks == [3, 3, 1]  # one item: 3 rows per block
    assert model.row_scores(rows[:0], items).shape == (0, 5)

    real_checkpoint = interaction_module.checkpoint
    monkeypatch.setattr(
        interaction_module, "checkpoint", lambda function, *args, **kwargs: checkpointed.append(kwargs) or real_checkpoint(function, *args, **kwargs)
    )
    model.score_chunk_rows = 10
    plain = model.row_scores(rows, items).sum()
    assert checkpointed == []
    with torch.no_grad():
        model.row_scores(rows, items, checkpointed=True)
    assert checkpointed == []  # nothing to recompute without a backward pass
    recomputed = model.row_scores(rows, items, checkpointed=True).sum()
    assert checkpointed == [{"use_reentrant": False}] * 4
    parameters = [p for p in model.mlp_tail.parameters()]
    # Rows that need no gradient still give the MLP its gradient (the reentrant variant would not).
    for expected, got in zip(torch.autograd.grad(plain, parameters), torch.autograd.grad(recomputed, parameters)):
        torch.testing.assert_close(got, expected)


def test_dot_scores_are_one_product_not_blocks(sparcode_data, monkeypatch):
    model = make_model(sparcode_data, interaction="dot")
    rows, items = torch.randn(7, 8), torch.randn(5, 8)
    monkeypatch.setattr(model, "interact", lambda q, v: pytest.fail("dot scoring went through the pairwise blocks"))
    torch.testing.assert_close(model.row_scores(rows, items), model.activate(rows @ items.t()))


def test_the_split_first_layer_starts_at_the_fan_in_of_the_concatenated_layer(sparcode_data):
    model = make_model(sparcode_data, embedding_size=64, token_size=64, n_heads=2, mlp_hidden=[256, 128])
    fan_in = model.query_layer.in_features + model.item_layer.in_features  # 128
    for layer in (model.query_layer, model.item_layer):
        assert abs(layer.weight.std().item() / (2.0 / fan_in) ** 0.5 - 1) < 0.05 and abs(layer.weight.mean().item()) < 0.01
    assert (model.item_layer.bias == 0).all()
    hidden = [layer for layer in model.mlp_tail if isinstance(layer, nn.Linear)]
    assert all((layer.bias == 0).all() for layer in hidden)
    wide = hidden[0]  # 256 x 128 weights: a std estimate within ~1%
    assert abs(wide.weight.std().item() / (2.0 / wide.in_features) ** 0.5 - 1) < 0.05  # Kaiming for ReLU


# ---- losses ---------------------------------------------------------------------------------------


def test_full_ce_is_cross_entropy_of_the_full_sort_logits(sparcode_data):
    model = trained_sparcode(sparcode_data, softmax_negatives=None, relu_leak=0.0, **QUIET)
    batch = first_batch(sparcode_data[1])
    logits = scores(model, batch)
    model.train()
    rec_loss = model.calculate_loss(batch)[0]
    torch.testing.assert_close(rec_loss, F.cross_entropy(logits, batch["item_id"]))


def test_the_loss_terms_are_recommendation_commitment_and_sparsity(sparcode_data, monkeypatch):
    import recbole_t2diff.model.interaction as interaction_module

    batch = first_batch(sparcode_data[1])
    model = trained_sparcode(sparcode_data, softmax_negatives=None, vq_beta=2.0, sparsity_weight=0.5, ce_checkpoint=True, **QUIET)
    model.train()
    with torch.no_grad():
        tokens = model.query_tokens(batch)
        quantized = model.quantizer.lookup(model.quantizer.assign(tokens))
        values = model.row_scores(model.query_side(quantized).flatten(0, 1), model.item_side())
        values = values.view(len(tokens), model.n_query_tokens, -1)
        not_target = torch.ones(values.shape[0], values.shape[2], dtype=torch.bool)
        not_target[torch.arange(len(tokens)), batch["item_id"]] = False
        unscored = values.permute(0, 2, 1)[not_target].mean()  # over every non-target (row, item, token)
    checkpointed = []
    real_checkpoint = interaction_module.checkpoint
    monkeypatch.setattr(
        interaction_module, "checkpoint", lambda function, *args, **kwargs: checkpointed.append(1) or real_checkpoint(function, *args, **kwargs)
    )
    losses = model.calculate_loss(batch)
    assert len(losses) == 3 and checkpointed, "ce_checkpoint: the full-CE blocks are recomputed in backward"
    torch.testing.assert_close(losses[1], 2.0 * F.mse_loss(tokens, quantized), rtol=1e-4, atol=0)
    torch.testing.assert_close(losses[2], 0.5 * unscored, rtol=1e-4, atol=0)  # scores are ~1e-2: relative only

    for knobs, terms in [({"sparsity_weight": 0.0}, 2), ({"sparsity_weight": 0.5, "quantize": False}, 2)]:
        assert len(trained_sparcode(sparcode_data, steps=1, **knobs).train().calculate_loss(batch)) == terms
    alone = trained_sparcode(sparcode_data, steps=1, quantize=False).train().calculate_loss(batch)
    assert isinstance(alone, torch.Tensor) and alone.dim() == 0


def test_sampled_softmax_masks_accidental_hits(sparcode_data, monkeypatch):
    model = trained_sparcode(sparcode_data, relu_leak=0.0, **QUIET)
    batch = first_batch(sparcode_data[1])
    target = batch["item_id"]
    other = int((target % (model.n_items - 1))[0]) + 1  # an item that is not the first row's target
    assert other != int(target[0])
    forced = torch.tensor([int(target[0])] * 3 + [other])
    drawn = []
    monkeypatch.setattr(torch, "randint", lambda *args, **kwargs: drawn.append(args) or forced)
    model.train()
    with torch.no_grad():
        query_side = model.query_side(model.query_values(batch))
        loss, unscored = model.rec_loss(query_side, batch)
        y = model.full_sort_predict(batch)
        negative_values = model.activate(model.interact(query_side[:, :, None], model.item_side(forced)[None, None]))
    assert drawn == [(1, model.n_items, (model.softmax_negatives,))]  # real items only: id 0 is padding
    logits = torch.stack([y[torch.arange(len(target)), target]] + [y[:, i] for i in forced.tolist()], dim=1)
    hits = forced[None] == target[:, None]
    logits[:, 1:] = logits[:, 1:].masked_fill(hits, -1e9)
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.zeros_like(target)))
    # The sparsity term averages the negatives that are not hits, over every token.
    assert hits.any() and (~hits).any()
    torch.testing.assert_close(unscored, negative_values.permute(0, 2, 1)[~hits].mean(), rtol=1e-5, atol=0)


def test_a_single_kept_negative_is_its_own_sparsity_term(sparcode_data, monkeypatch):
    model = make_model(sparcode_data, n_query_tokens=1, softmax_negatives=3, score_relu=False)  # no value clipped to 0
    batch = copy_batch(first_batch(sparcode_data[1]))
    batch.interaction = {key: value[:1] for key, value in batch.interaction.items()}  # one row, one token
    target = int(batch["item_id"][0])
    other = target % (model.n_items - 1) + 1
    monkeypatch.setattr(torch, "randint", lambda *args, **kwargs: torch.tensor([target, target, other]))
    with torch.no_grad():
        query_side = model.query_side(model.query_values(batch))
        _, unscored = model.rec_loss(query_side, batch)
        kept = model.activate(model.interact(query_side[:, 0], model.item_side(torch.tensor([other]))))
    assert kept.abs().sum() > 0
    torch.testing.assert_close(unscored, kept.sum())


def test_the_full_ce_sparsity_term_averages_the_non_target_pairs(sparcode_data, monkeypatch):
    model = make_model(sparcode_data, softmax_negatives=None)
    batch = first_batch(sparcode_data[1])
    rows, k, n = len(batch), model.n_query_tokens, model.n_items
    target = batch["item_id"]
    values = torch.rand(rows, k, n)
    values[torch.arange(rows), :, target] = 100.0  # the targets far above the rest: counting them shows
    monkeypatch.setattr(model, "row_scores", lambda *args: values.view(rows * k, n))
    _, unscored = model.rec_loss(model.query_side(model.query_tokens(batch)), batch)
    not_target = torch.ones(rows, n, dtype=torch.bool)
    not_target[torch.arange(rows), target] = False
    torch.testing.assert_close(unscored, values.permute(0, 2, 1)[not_target].mean())


def test_bpr_reads_the_sampled_negative(sparcode_data):
    model = trained_sparcode(
        sparcode_data, relu_leak=0.0, **QUIET, loss_type="BPR", softmax_negatives=None, train_neg_sample_args={"distribution": "uniform", "sample_num": 1}
    )
    batch = with_negatives(first_batch(sparcode_data[1]), model.n_items)
    model.train()
    batch.interaction["neg_item_id"] = torch.full_like(batch["item_id"], 1)
    with torch.no_grad():
        first = model.rec_loss(model.query_side(model.query_values(batch)), batch)[0]
        batch.interaction["neg_item_id"] = torch.full_like(batch["item_id"], 2)
        second = model.rec_loss(model.query_side(model.query_values(batch)), batch)[0]
        y = model.full_sort_predict(batch)
    target = batch["item_id"]
    torch.testing.assert_close(second, -F.logsigmoid(y[torch.arange(len(target)), target] - y[:, 2]).mean())
    assert first != second


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"softmax_negatives": None},
        {"loss_type": "BPR", "softmax_negatives": None, "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1}},
        {"sparsity_weight": 0.01, "score_bias": -0.5, "relu_leak": 0.1},
        {"quantize": False},
        {"interaction": "dot", "quantize": False, "score_relu": False},
    ],
)
def test_each_loss_trains(sparcode_data, overrides):
    """Training steps on one batch lower its recommendation loss (fixed negatives, no dropout)."""
    model = trained_sparcode(sparcode_data, steps=1, **QUIET, **overrides)
    batch = with_negatives(first_batch(sparcode_data[1]), model.n_items)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()

    def loss():
        torch.manual_seed(1)
        losses = model.calculate_loss(batch)
        return losses if isinstance(losses, tuple) else (losses,)

    first = loss()[0].item()
    for _ in range(15):
        optimizer.zero_grad()
        sum(loss()).backward()
        optimizer.step()
    assert loss()[0].item() < first


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"token_size": 9}, "n_codebooks=2: it must divide token_size=9"),
        ({"codebook_size": 1}, "codebook_size=1"),
        ({"n_codebooks": 8, "codebook_size": 1024, "token_size": 8}, "below 2^62"),
        ({"n_query_tokens": 0}, "n_query_tokens=0"),
        ({"n_heads": 3}, "n_heads=3: it must divide embedding_size=8"),
        ({"interaction": "dot", "n_item_tokens": 2}, "n_item_tokens=2"),
        ({"score_mode": "index", "quantize": False}, "score_mode=index"),
        ({"mlp_dropout": 1.0}, "mlp_dropout=1.0"),
        ({"relu_leak": -0.1}, "relu_leak=-0.1"),
        ({"ema_decay": 1.0}, "ema_decay=1.0"),
        ({"sparsity_weight": -1}, "sparsity_weight=-1"),
        ({"index_threshold": -0.5}, "index_threshold=-0.5"),
        ({"tokenizer": "gru"}, "tokenizer=gru"),
        ({"index_keys": "some"}, "index_keys=some"),
        ({"loss_type": "BPR", "softmax_negatives": None}, "BPR needs sampled negatives"),
        ({"loss_type": "BPR", "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1}}, "softmax_negatives=10"),
        ({"nproc": 2}, "nproc=2"),
        ({"score_bias": "low"}, "score_bias=low"),
    ],
)
def test_bad_settings_raise_one_line(tiny_path, workdir, overrides, message):
    with pytest.raises(UsageError) as raised:
        tiny_config(tiny_path, model="SparCode", **{**TINY_SPARCODE, **overrides})
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_relu_leak_acts_on_training_positives_only(sparcode_data):
    model = make_model(sparcode_data, relu_leak=0.1, score_bias=0.5)
    scores = torch.tensor([-2.5, 0.5])
    torch.testing.assert_close(model.activate(scores, leaky=True), torch.tensor([-0.2, 1.0]))
    torch.testing.assert_close(model.activate(scores), torch.tensor([0.0, 1.0]))


# ---- reductions -----------------------------------------------------------------------------------


def test_dot_interaction_is_a_two_tower_model(sparcode_data):
    model = trained_sparcode(sparcode_data, interaction="dot", quantize=False, score_relu=False)
    batch = valid_batch(sparcode_data)
    with torch.no_grad():
        user = model.query_values(batch).sum(1)
        torch.testing.assert_close(scores(model, batch), user @ model.item_vectors().t())


@pytest.mark.parametrize(
    "overrides,unlike",
    [
        ({"interaction": "dot", "score_relu": True}, "score_relu: true"),
        ({"interaction": "mlp", "score_relu": False}, "interaction: mlp"),
        ({"interaction": "mlp", "score_relu": True}, "interaction: mlp and score_relu: true"),
    ],
)
def test_only_the_two_tower_reduction_has_user_and_item_towers(sparcode_data, overrides, unlike):
    from recbole_t2diff.export import item_matrix, user_matrix

    model = make_model(sparcode_data, **overrides)
    for call in (lambda: item_matrix(model), lambda: user_matrix(model, sparcode_data[3])):
        with pytest.raises(UsageError, match=f"SparCode with {unlike} does not score by the inner product") as raised:
            call()
        assert "sparse_index" in str(raised.value) and "\n" not in str(raised.value)
    dot = make_model(sparcode_data, interaction="dot", score_relu=False)
    users, _ = user_matrix(dot, sparcode_data[3])
    assert users.shape[1] == item_matrix(dot).shape[1] == 8


# ---- checkpoints and the runner -------------------------------------------------------------------


def test_checkpoint_restores_the_codebooks_and_the_metrics(tiny_path, workdir):
    trainers = []
    result = run("SparCode", "tiny", config_dict={"data_path": tiny_path, **TINY_MODEL, **TINY_SPARCODE}, on_trainer=trainers.append)
    trained_quantizer = trainers[0].model.quantizer  # the best epoch's weights, reloaded by run() before testing
    reloaded = load_data_and_model(result["saved_model_file"])[1].quantizer
    assert bool(reloaded.initialised)
    for name, tensor in trained_quantizer.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    assert dict(evaluate_checkpoint(result["saved_model_file"], "test")) == dict(result["test_result"])
    index_metrics = evaluate_checkpoint(result["saved_model_file"], "test", overrides={"score_mode": "index"})
    assert dict(index_metrics) == dict(result["test_result"])
    again = run("SparCode", "tiny", config_dict={"data_path": tiny_path, **TINY_MODEL, **TINY_SPARCODE})
    assert dict(again["test_result"]) == dict(result["test_result"])
    # Scores are a sum over query tokens of an MLP, not one inner product: no two-tower export, even
    # when the token count equals the token width so the matrices' second sizes agree.
    square = run("SparCode", "tiny", config_dict={"data_path": tiny_path, **TINY_MODEL, **TINY_SPARCODE, "n_query_tokens": 8, "epochs": 1})
    for checkpoint in (result["saved_model_file"], square["saved_model_file"]):
        with pytest.raises(UsageError, match="SparCode with interaction: mlp and score_relu: true does not score by the inner product .* no two-tower export"):
            export_embeddings(checkpoint, str(workdir / "export"))


@pytest.mark.spawns
@pytest.mark.slow
def test_runner_trains_sparcode_on_ml100k(tmp_path):
    args = [
        "--model=SparCode",
        "--dataset=ml-100k",
        "--epochs=1",
        "--MAX_ITEM_LIST_LENGTH=20",
        "--train_batch_size=2048",
        "--show_progress=False",
        "--embedding_size=16",
        "--token_size=16",
        "--n_layers=1",
        "--inner_size=32",
        "--mlp_hidden=[16,16]",
        "--n_query_tokens=2",
        "--codebook_size=8",
        "--softmax_negatives=20",
    ]
    env = {**os.environ, "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, os.path.join(REPO, "run_recbole.py"), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = re.search(r"test result.*?ndcg@10 : ([0-9.]+)", result.stdout + result.stderr)
    assert logged, (result.stdout + result.stderr)[-3000:]
    checkpoint = next((tmp_path / "saved").glob("SparCode-*.pth"))
    code = (
        "from recbole_t2diff import evaluate_checkpoint; "
        f"print('NDCG', evaluate_checkpoint({str(checkpoint)!r}, overrides={{'score_mode': 'index'}})['ndcg@10'])"
    )
    index = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert index.returncode == 0, index.stderr[-3000:]
    assert float(re.search(r"NDCG ([0-9.]+)", index.stdout).group(1)) == float(logged.group(1))


def rec_loss_gradients(model, batch, by_key):
    """Gradients of the sampled-softmax loss (the sparsity term added) w.r.t. the tokens and every parameter, its
    negatives scored per distinct code key (``by_key``) or per token; the same negatives either way."""
    model.zero_grad()
    tokens = model.query_tokens(batch).detach().requires_grad_()
    codes = model.quantizer.assign(tokens)
    query = tokens + (model.quantizer.lookup(codes) - tokens).detach()
    keys = model.quantizer.keys(codes)
    torch.manual_seed(7)
    loss, unscored = model.rec_loss(model.query_side(query), batch, keys if by_key else None)
    (loss + unscored).backward()
    named = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), tokens.grad, named, keys


@pytest.mark.parametrize("mlp_hidden", [[16, 16], [16], [16, 8, 4]])
def test_negatives_scored_once_per_code_key_give_per_token_values_and_gradients(sparcode_data, mlp_hidden):
    # Tokens of one code share a value, so their negatives' scores are computed once (SharedRowScores), yet each
    # token must still get its own gradient: the straight-through estimator hands it to the tokenizer.
    model = trained_sparcode(sparcode_data, mlp_hidden=mlp_hidden, score_bias=0.5, **QUIET).train()
    batch = first_batch(sparcode_data[1])
    loss, token_grad, grads, keys = rec_loss_gradients(model, batch, by_key=True)
    reference_loss, reference_token_grad, reference, _ = rec_loss_gradients(model, batch, by_key=False)
    assert len(torch.unique(keys)) < keys.numel()  # some tokens share a code: the case being tested
    assert model.shares_rows() and sorted(grads) == sorted(reference)
    torch.testing.assert_close(loss, reference_loss)
    assert token_grad.abs().sum() > 0
    torch.testing.assert_close(token_grad, reference_token_grad, rtol=1e-4, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-6, msg=name)


def test_negatives_are_scored_per_token_where_tokens_of_one_code_can_differ(sparcode_data):
    # Dropout in the interaction MLP draws a mask per token; continuous tokens have no code.
    assert not trained_sparcode(sparcode_data, steps=1, mlp_dropout=0.1).shares_rows()
    assert not trained_sparcode(sparcode_data, steps=1, quantize=False).shares_rows()
    assert not trained_sparcode(sparcode_data, steps=1, interaction="dot", score_relu=False).shares_rows()
