"""SparCode (docs/SPARCODE.md §15): layout, split-layer algebra, quantizer maths, losses, the sparse index, the runner."""
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from recbole.data.interaction import Interaction

from recbole_t2diff.errors import UsageError
from recbole_t2diff.export import export_embeddings
from recbole_t2diff.model.quantizer import ProductQuantizer
from recbole_t2diff.quick_start import evaluate_checkpoint, load_data_and_model, make_trainer, prepare, run
from recbole_t2diff.sparse_index import SparseIndex, top_items

from conftest import REPO, TINY_MODEL, RunsCommand, first_batch, make_model, scratch_run, tiny_config

# The tiny preset of docs/SPARCODE.md §15: d = d_t = 8, one layer, MLP [16, 16], K_u = 2, N = 8 (64 keys), L = 12.
TINY_SPARCODE = {
    "token_size": 8, "n_layers": 1, "inner_size": 16, "dnn_hidden": [16], "mlp_hidden": [16, 16],
    "n_query_tokens": 2, "codebook_size": 8, "softmax_negatives": 10,
}
QUIET = {"hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0, "mlp_dropout": 0.0}  # no dropout: losses recomputable


@pytest.fixture(scope="module")
def sparcode_data(tiny_path, tmp_path_factory):
    with scratch_run(tmp_path_factory.mktemp("sparcode")):
        config = tiny_config(tiny_path, model="SparCode", **TINY_SPARCODE)
        _, train, valid, test = prepare(config)
    return config, train, valid, test


def copy_batch(batch):
    """A shallow copy whose fields can be replaced without touching the loader's batch."""
    return Interaction(dict(batch.interaction))


def with_negatives(batch, n_items):
    """The batch with a BPR negative per row (the tiny loaders are built for CE and sample none)."""
    batch = copy_batch(batch)
    batch.interaction["neg_item_id"] = batch["item_id"] % (n_items - 1) + 1
    return batch


def trained(sparcode_data, steps=3, **overrides):
    """A tiny SparCode after a few training batches, so its codebooks are seeded and have moved."""
    model = make_model(sparcode_data, **overrides)
    model.train()
    batches = iter(sparcode_data[1])
    for _ in range(steps):
        losses = model.calculate_loss(with_negatives(next(batches), model.n_items))
        sum(losses if isinstance(losses, tuple) else [losses]).backward()
    return model.eval()


def scores(model, batch):
    model.eval()
    with torch.no_grad():
        return model.full_sort_predict(batch)


def valid_batch(sparcode_data):
    return first_batch(sparcode_data[2])


# ---- layout ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer", ["sasrec", "dnn"])
def test_padding_and_garbage_after_the_length_change_no_score(sparcode_data, tokenizer):
    batch = valid_batch(sparcode_data)
    lengths = batch["item_length"]
    assert (lengths < batch["item_id_list"].size(1)).any(), "the batch must contain padded sequences"
    model = trained(sparcode_data, tokenizer=tokenizer)
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
    model = trained(sparcode_data)
    before = scores(model, batch)
    altered = copy_batch(batch)
    altered.interaction["item_id"] = torch.ones_like(batch["item_id"])
    torch.testing.assert_close(before, scores(model, altered))


def test_the_sasrec_tokenizer_is_recboles_sasrec(sparcode_data, tiny_path):
    from recbole.model.sequential_recommender.sasrec import SASRec

    model = trained(sparcode_data, n_heads=4, hidden_act="relu", layer_norm_eps=1e-5)  # no default left to fall back on
    batch = valid_batch(sparcode_data)
    config = sparcode_data[0]
    keys = ("n_layers", "n_heads", "inner_size", "hidden_dropout_prob", "attn_dropout_prob", "hidden_act", "layer_norm_eps")
    sasrec_config = tiny_config(tiny_path, model="SASRec", hidden_size=config["embedding_size"], **{k: config[k] for k in keys})
    sasrec_config["n_heads"], sasrec_config["hidden_act"], sasrec_config["layer_norm_eps"] = 4, "relu", 1e-5
    sasrec = SASRec(sasrec_config, sparcode_data[1].dataset)
    weights = {("LayerNorm" + name[len("input_norm"):] if name.startswith("input_norm") else name): value
               for name, value in model.state_dict().items()}
    sasrec.load_state_dict({name: weights[name] for name in sasrec.state_dict()})
    sasrec.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.history_vector(batch), sasrec(batch["item_id_list"], batch["item_length"]))


@pytest.mark.parametrize("n_layers", [1, 2])
def test_the_last_layer_at_the_read_position_is_the_full_stack_read_there(sparcode_data, monkeypatch, n_layers):
    batch = valid_batch(sparcode_data)
    assert len(set(batch["item_length"].tolist())) > 1, "read positions must differ across the batch"
    full = trained(sparcode_data, n_layers=n_layers, n_heads=2, last_layer_read_only=False, **QUIET)
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


def test_the_dnn_tokenizer_pools_the_real_items_of_each_history(sparcode_data):
    model, batch = trained(sparcode_data, tokenizer="dnn"), copy_batch(valid_batch(sparcode_data))
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
    model = make_model(sparcode_data, tokenizer="dnn", dnn_hidden=[16, 12], mlp_hidden=[16, 12, 10], n_item_tokens=2,
                       ema_decay=0.5, ema_eps=0.1, dead_code_threshold=0.2)
    d, d_t = model.embedding_size, model.token_size
    shapes = lambda stack: [(layer.in_features, layer.out_features) for layer in stack if isinstance(layer, nn.Linear)]
    assert shapes(model.dnn) == [(d, 16), (16, 12), (12, d)]
    assert (model.query_layer.in_features, model.query_layer.out_features, model.query_layer.bias) == (d_t, 16, None)
    assert (model.item_layer.in_features, model.item_layer.out_features) == (2 * d_t, 16)
    assert shapes(model.mlp_tail) == [(16, 12), (12, 10), (10, 1)]
    assert (model.quantizer.decay, model.quantizer.eps, model.quantizer.dead_code_threshold) == (0.5, 0.1, 0.2)
    assert model.dead_positives.dtype == torch.long  # exact counts


def test_sasrec_knobs_reach_the_encoder(sparcode_data):
    model = make_model(sparcode_data, n_heads=4, attn_dropout_prob=0.2, hidden_dropout_prob=0.3, hidden_act="relu",
                       layer_norm_eps=1e-5)
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
    model, batch = trained(sparcode_data), valid_batch(sparcode_data)
    with torch.no_grad():
        torch.testing.assert_close(model(batch), model.query_values(batch))


def test_tokens_work_for_histories_of_one_item(sparcode_data):
    batch = copy_batch(valid_batch(sparcode_data))
    batch.interaction["item_length"] = torch.ones_like(batch["item_length"])
    for tokenizer in ("sasrec", "dnn"):
        assert torch.isfinite(scores(trained(sparcode_data, tokenizer=tokenizer), batch)).all()


# ---- algebra --------------------------------------------------------------------------------------


def test_split_first_layer_equals_the_concatenated_mlp(sparcode_data):
    model = trained(sparcode_data, mlp_dropout=0.0)
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
    model = trained(sparcode_data, **overrides)
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
    model = trained(sparcode_data)
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
    monkeypatch.setattr(interaction_module, "checkpoint",
                        lambda function, *args, **kwargs: checkpointed.append(kwargs) or real_checkpoint(function, *args, **kwargs))
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


# ---- quantizer ------------------------------------------------------------------------------------


def seeded_quantizer(**kwargs):
    torch.manual_seed(0)
    quantizer = ProductQuantizer(8, 2, 16, **kwargs)
    quantizer.seed(torch.randn(64, 8))
    return quantizer


def test_assignment_is_the_brute_force_nearest_codeword_and_keys_round_trip():
    quantizer = seeded_quantizer()
    tokens = torch.randn(3, 50, 8)
    codes = quantizer.assign(tokens)
    for m in range(2):
        parts = tokens.reshape(-1, 2, 4)[:, m]
        brute = torch.cdist(parts, quantizer.codewords[m]).argmin(-1)
        assert torch.equal(codes.reshape(-1, 2)[:, m], brute)
    keys = quantizer.keys(codes)
    assert keys.min() >= 0 and keys.max() < 16**2
    assert torch.equal(quantizer.codes(keys), codes)
    torch.testing.assert_close(quantizer.lookup(codes)[..., :4], quantizer.codewords[0][codes[..., 0]])


def test_straight_through_passes_the_gradient_at_the_codeword_to_the_token():
    quantizer = seeded_quantizer()
    tokens = torch.randn(10, 8, requires_grad=True)
    codewords = quantizer.lookup(quantizer.assign(tokens))
    query = tokens + (codewords - tokens).detach()
    (query**3).sum().backward()
    torch.testing.assert_close(tokens.grad, 3 * codewords.detach() ** 2)


def test_the_recommendation_loss_reaches_the_tokenizer_through_the_codes(sparcode_data):
    model = trained(sparcode_data, vq_beta=0.0)  # no commitment term: only straight-through can carry a gradient
    model.train()
    model.zero_grad()
    model.calculate_loss(first_batch(sparcode_data[1]))[0].backward()
    assert model.query_heads.weight.grad.abs().sum() > 0
    assert model.trm_encoder.layer[0].feed_forward.dense_1.weight.grad.abs().sum() > 0


def test_codebooks_are_buffers_not_parameters(sparcode_data):
    model = make_model(sparcode_data)
    names = {name for name, _ in model.named_parameters()}
    assert not any(name.startswith("quantizer") for name in names)
    assert {"quantizer.codewords", "quantizer.counts", "quantizer.sums", "quantizer.initialised"} <= set(model.state_dict())
    assert "quantizer.radix" not in model.state_dict()  # derived from the sizes; checkpoints carry only the learned state
    assert (model.quantizer.initialised.dtype, model.quantizer.restarts.dtype, model.quantizer.radix.dtype) == (
        torch.bool, torch.long, torch.long)


def test_the_quantizers_defaults_are_the_property_files():
    knobs = yaml.safe_load(open(os.path.join(REPO, "properties", "model", "SparCode.yaml")))
    quantizer = ProductQuantizer(8, 2, 4)
    assert (quantizer.decay, quantizer.eps, quantizer.dead_code_threshold) == (
        knobs["ema_decay"], knobs["ema_eps"], knobs["dead_code_threshold"])


def test_restarted_codes_spread_over_the_batch_vectors():
    # 2 vectors for 5 dead codes: tiled 3 times, 5 of the 6 copies drawn, so each vector gets 2 or 3 codes.
    for seed in range(20):
        torch.manual_seed(seed)
        quantizer, vectors = ProductQuantizer(8, 2, 5), torch.randn(2, 4)
        quantizer._restart(0, torch.ones(5, dtype=torch.bool), vectors, mean_count=1.0)
        nearest = (quantizer.codewords[0][:, None] - vectors[None]).abs().amax(-1).argmin(-1)
        assert sorted(torch.bincount(nearest, minlength=2).tolist()) in ([2, 3], [3, 2]), seed


@pytest.mark.parametrize("n_vectors", [2, 5])
def test_a_restart_with_fewer_batch_vectors_than_dead_codes_tiles_them_with_small_noise(n_vectors):
    torch.manual_seed(0)
    quantizer = ProductQuantizer(8, 2, 5)
    vectors = torch.randn(n_vectors, 4)
    quantizer._restart(0, torch.ones(5, dtype=torch.bool), vectors, mean_count=3.0)
    codewords = quantizer.codewords[0]
    offsets = codewords[:, None] - vectors[None]  # [codes, vectors, sub_dim]
    nearest = offsets.abs().amax(-1).argmin(-1)
    offset = offsets[torch.arange(5), nearest]
    if n_vectors == 5:  # as many vectors as codes: each code takes one vector exactly
        assert offset.abs().max() == 0 and sorted(nearest.tolist()) == [0, 1, 2, 3, 4]
    else:  # 2 vectors tiled 3 times: codes sit within [0, 0.01/sqrt(sub_dim)) above a vector, no two alike
        assert (offset >= 0).all() and (offset < 0.01 / 2).all() and offset.abs().max() > 0
        assert len({tuple(c.tolist()) for c in codewords}) == 5
    assert (quantizer.counts[0] == 3.0).all() and torch.equal(quantizer.sums[0], codewords * 3.0)
    assert (quantizer.codewords[1] == 0).all(), "other codebooks untouched"


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


def test_with_no_decay_a_codeword_is_the_mean_of_its_vectors():
    quantizer = seeded_quantizer(decay=0.0, eps=1e-9, dead_code_threshold=0.0)
    tokens = torch.randn(200, 8)
    codes = quantizer.assign(tokens)
    quantizer.update(tokens, codes)
    for m in range(2):
        for code in codes[:, m].unique():
            members = tokens.reshape(-1, 2, 4)[codes[:, m] == code, m]
            torch.testing.assert_close(quantizer.codewords[m, code], members.mean(0), rtol=1e-4, atol=1e-5)


def test_restart_touches_only_dead_codes_and_puts_them_on_batch_vectors():
    # Seeded counts are the mean count 4; after one step with decay 0.5 an unused code has 2 < 0.6 x 4.
    quantizer = seeded_quantizer(decay=0.5, dead_code_threshold=0.6)
    tokens = torch.randn(64, 8)
    tokens[:, :4] = quantizer.codewords[0, 3] + 0.001 * torch.randn(64, 4)  # codebook 0: every vector on code 3
    codes = quantizer.assign(tokens)
    before = quantizer.codewords.clone()
    quantizer.update(tokens, codes)
    parts = tokens[:, :4]
    for code in range(16):
        if code != 3:
            assert (quantizer.codewords[0, code] - parts).abs().amax(-1).min() < 1e-6, "a restarted code sits on a batch vector"
            assert quantizer.counts[0, code] == 64 / 16
    # The one live code followed its EMA: (0.5·4·c + 0.5·Σ vectors) / (0.5·4 + 0.5·64).
    expected_live = (2 * before[0, 3] + 0.5 * parts.sum(0)) / 34
    torch.testing.assert_close(quantizer.codewords[0, 3], expected_live, rtol=1e-3, atol=1e-4)
    unused_in_codebook_1 = int((torch.bincount(codes[:, 1], minlength=16) == 0).sum())
    assert quantizer.restarts == 15 + unused_in_codebook_1


def test_codes_left_unused_restart_after_the_patience_not_after_the_ema_decays():
    """64 vectors a step for 16 codes, threshold 0.01: a code used at 1 % of the mean rate is assigned once
    in 16 / (0.01·64) = 25 steps; the EMA count (decay 0.99) would take ~458 steps to fall below 1 %."""
    quantizer = seeded_quantizer(decay=0.99, dead_code_threshold=0.01)
    assert quantizer.patience(64) == 25 and quantizer.patience(10**6) == 1
    generator = torch.Generator().manual_seed(1)
    on_code_3 = torch.cat([quantizer.codewords[0, 3], quantizer.codewords[1, 3]])
    for step in range(1, 26):
        tokens = on_code_3 + 0.001 * torch.randn(64, 8, generator=generator)  # every vector on code 3 in both codebooks
        if step == 10:
            tokens[0] = torch.cat([quantizer.codewords[0, 7], quantizer.codewords[1, 7]])  # code 7 used once
        before = quantizer.codewords.clone()
        quantizer.update(tokens, quantizer.assign(tokens))
        if step < 25:
            assert quantizer.restarts == 0, f"restarted at step {step}, before any code was idle for 25 steps"
    restarted = (quantizer.codewords - before).abs().amax(-1) > 1e-3
    assert quantizer.restarts == 28 and restarted.sum() == 28
    for m in range(2):
        assert not restarted[m, 3] and not restarted[m, 7], "a code used within the patience is kept"
    assert (quantizer.idle[restarted] == 0).all() and (quantizer.idle[:, 7] == 15).all()


def test_code_stats_measure_usage_perplexity_keys_and_quantization_error(sparcode_data):
    model = trained(sparcode_data)
    valid = sparcode_data[2]
    before = {name: tensor.clone() for name, tensor in model.named_buffers()}
    model.train()
    stats = model.code_stats(valid)
    assert model.training, "the caller's mode is restored"
    for name, tensor in model.named_buffers():
        assert torch.equal(before[name], tensor), name
    model.eval()
    with torch.no_grad():
        tokens = torch.cat([model.query_tokens(batch[0]) for batch in valid])
        codes = model.quantizer.assign(tokens).reshape(-1, 2)
    assert stats["tokens"] == len(codes) and stats["restarts"] == int(model.quantizer.restarts)
    for m in range(2):
        counts = torch.bincount(codes[:, m], minlength=8).double()
        shares = counts[counts > 0] / counts.sum()
        assert stats["usage"][m] == pytest.approx((counts > 0).double().mean().item())
        assert stats["perplexity"][m] == pytest.approx(torch.exp(-(shares * shares.log()).sum()).item())
    assert stats["distinct_keys"] == len(torch.unique(model.quantizer.keys(codes)))
    error = (tokens - model.quantizer.lookup(model.quantizer.assign(tokens))).pow(2).sum() / tokens.pow(2).sum()
    assert stats["relative_error"] == pytest.approx(error.item(), rel=1e-5) and 0 < stats["relative_error"] < 1
    with pytest.raises(UsageError, match="quantize: true"):
        make_model(sparcode_data, quantize=False).code_stats(valid)


def test_each_epoch_logs_its_code_usage_and_restarts(sparcode_data, caplog):
    model = make_model(sparcode_data)
    model.train()
    batches = iter(sparcode_data[1])
    tallied = []
    for _ in range(2):
        batch = next(batches)
        model.calculate_loss(batch)
        tallied.append(len(batch) * model.n_query_tokens)
    assert model.epoch_codes.tokens == sum(tallied)
    restarts = int(model.quantizer.restarts)
    with caplog.at_level("INFO"):
        model.eval()
    line = next(line for line in caplog.text.splitlines() if "SparCode codes in training" in line)
    assert re.search(r"usage \d+%/\d+% of 8 codes per codebook, perplexity [0-9.]+/[0-9.]+, \d+ distinct keys, "
                     rf"relative quantization error [0-9.]+, {restarts} restarts", line), line
    assert model.epoch_codes.tokens == 0, "the next epoch starts a new tally"
    caplog.clear()
    with caplog.at_level("INFO"):
        model.train()
        model.eval()
    assert "SparCode codes" not in caplog.text, "an epoch without training batches logs nothing"


def test_the_quantizer_learns_from_bfloat16_tokens_in_float32():
    quantizer = ProductQuantizer(8, 2, 16)
    tokens = torch.randn(64, 8).to(torch.bfloat16)
    quantizer.seed(tokens)
    quantizer.update(tokens, quantizer.assign(tokens))
    assert quantizer.codewords.dtype == quantizer.sums.dtype == torch.float32
    assert torch.equal(quantizer.assign(tokens), quantizer.assign(tokens.float()))


@pytest.mark.parametrize("how", ["bf16_autocast", "enable_amp"])
def test_bfloat16_training_keeps_the_codebooks_and_losses_float32(sparcode_data, how):
    """bf16_autocast, or RecBole's enable_amp wrapping the whole calculate_loss (which used to crash
    in ProductQuantizer.seed, writing bfloat16 tokens into the float32 codewords)."""
    batch = first_batch(sparcode_data[1])
    reference = make_model(sparcode_data, **QUIET)
    model = make_model(sparcode_data, bf16_autocast=how == "bf16_autocast", **QUIET)
    assert model.bf16_autocast == (how == "bf16_autocast") and not reference.bf16_autocast
    outer = torch.autocast("cpu", dtype=torch.bfloat16) if how == "enable_amp" else contextlib.nullcontext()
    reference.train(), model.train()
    torch.manual_seed(3)
    expected = reference.calculate_loss(batch)
    with outer:
        torch.manual_seed(3)
        losses = model.calculate_loss(batch)
    sum(losses).backward()
    assert all(loss.dtype == torch.float32 for loss in losses)
    assert all(buffer.dtype == torch.float32 for name, buffer in model.quantizer.named_buffers() if buffer.is_floating_point())
    torch.testing.assert_close(model.quantizer.codewords, reference.quantizer.codewords, rtol=0.02, atol=0.02)
    for loss, reference_loss in zip(losses, expected):
        torch.testing.assert_close(loss, reference_loss, rtol=0.05, atol=1e-3)
    assert losses[0] != expected[0], "bfloat16 arithmetic ran: the loss is not the float32 one to the last bit"


def test_seeding_leaves_no_zero_codeword_after_the_first_step(sparcode_data):
    model = trained(sparcode_data, steps=1)
    assert bool(model.quantizer.initialised)
    assert (model.quantizer.codewords.norm(dim=-1) > 0).all()


def test_scoring_changes_no_buffer_even_in_training_mode(sparcode_data):
    model = trained(sparcode_data)
    batch = valid_batch(sparcode_data)
    before = {name: tensor.clone() for name, tensor in model.named_buffers()}
    model.train()
    with torch.no_grad():
        model.full_sort_predict(batch)
        model.predict(batch)
    for name, tensor in model.named_buffers():
        assert torch.equal(before[name], tensor), name


# ---- losses ---------------------------------------------------------------------------------------


def test_full_ce_is_cross_entropy_of_the_full_sort_logits(sparcode_data):
    model = trained(sparcode_data, softmax_negatives=None, relu_leak=0.0, **QUIET)
    batch = first_batch(sparcode_data[1])
    logits = scores(model, batch)
    model.train()
    rec_loss = model.calculate_loss(batch)[0]
    torch.testing.assert_close(rec_loss, F.cross_entropy(logits, batch["item_id"]))


def test_the_loss_terms_are_recommendation_commitment_and_sparsity(sparcode_data, monkeypatch):
    import recbole_t2diff.model.interaction as interaction_module

    batch = first_batch(sparcode_data[1])
    model = trained(sparcode_data, softmax_negatives=None, vq_beta=2.0, sparsity_weight=0.5, ce_checkpoint=True, **QUIET)
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
    monkeypatch.setattr(interaction_module, "checkpoint",
                        lambda function, *args, **kwargs: checkpointed.append(1) or real_checkpoint(function, *args, **kwargs))
    losses = model.calculate_loss(batch)
    assert len(losses) == 3 and checkpointed, "ce_checkpoint: the full-CE blocks are recomputed in backward"
    torch.testing.assert_close(losses[1], 2.0 * F.mse_loss(tokens, quantized), rtol=1e-4, atol=0)
    torch.testing.assert_close(losses[2], 0.5 * unscored, rtol=1e-4, atol=0)  # scores are ~1e-2: relative only

    for knobs, terms in [({"sparsity_weight": 0.0}, 2), ({"sparsity_weight": 0.5, "quantize": False}, 2)]:
        assert len(trained(sparcode_data, steps=1, **knobs).train().calculate_loss(batch)) == terms
    alone = trained(sparcode_data, steps=1, quantize=False).train().calculate_loss(batch)
    assert isinstance(alone, torch.Tensor) and alone.dim() == 0


def test_sampled_softmax_masks_accidental_hits(sparcode_data, monkeypatch):
    model = trained(sparcode_data, relu_leak=0.0, **QUIET)
    batch = first_batch(sparcode_data[1])
    target = batch["item_id"]
    other = int((target % (model.n_items - 1)) [0]) + 1  # an item that is not the first row's target
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
    model = trained(sparcode_data, relu_leak=0.0, **QUIET,
                    loss_type="BPR", softmax_negatives=None, train_neg_sample_args={"distribution": "uniform", "sample_num": 1})
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


@pytest.mark.parametrize("overrides", [
    {},
    {"softmax_negatives": None},
    {"loss_type": "BPR", "softmax_negatives": None, "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1}},
    {"sparsity_weight": 0.01, "score_bias": -0.5, "relu_leak": 0.1},
    {"quantize": False},
    {"interaction": "dot", "quantize": False, "score_relu": False},
])
def test_each_loss_trains(sparcode_data, overrides):
    """Training steps on one batch lower its recommendation loss (fixed negatives, no dropout)."""
    model = trained(sparcode_data, steps=1, **QUIET, **overrides)
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


@pytest.mark.parametrize("overrides,message", [
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
])
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
    model = trained(sparcode_data, interaction="dot", quantize=False, score_relu=False)
    batch = valid_batch(sparcode_data)
    with torch.no_grad():
        user = model.query_values(batch).sum(1)
        torch.testing.assert_close(scores(model, batch), user @ model.item_vectors().t())


@pytest.mark.parametrize("overrides,unlike", [
    ({"interaction": "dot", "score_relu": True}, "score_relu: true"),
    ({"interaction": "mlp", "score_relu": False}, "interaction: mlp"),
    ({"interaction": "mlp", "score_relu": True}, "interaction: mlp and score_relu: true"),
])
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


# ---- the sparse index -----------------------------------------------------------------------------


def exact_rows(model, keys):
    with torch.no_grad():
        rows = model.code_scores(model.quantizer.lookup(model.quantizer.codes(keys)))
    rows[:, 0] = 0
    return rows


def test_index_at_threshold_zero_reproduces_exact_scores(sparcode_data):
    model = trained(sparcode_data)
    batch = valid_batch(sparcode_data)
    index = SparseIndex.build(model)
    assert index.n_rows == 64 and 0 < index.nnz < 64 * 30, "the ReLU must make the index sparse but not empty"
    exact = scores(model, batch)
    torch.testing.assert_close(index.scores(model, batch)[:, 1:], exact[:, 1:])
    # A key used twice by the same query adds its list twice.
    twice, _ = index.accumulate(model, torch.tensor([[5, 5], [5, 9]]))
    torch.testing.assert_close(twice, torch.stack([2 * exact_rows(model, torch.tensor([5]))[0], exact_rows(model, torch.tensor([5, 9])).sum(0)]))


def test_threshold_and_posting_cap_prune_as_documented(sparcode_data):
    model = trained(sparcode_data)
    keys = torch.arange(64)
    rows = exact_rows(model, keys)
    stored = rows[rows > 0].sort().values
    tau = float(stored[len(stored) // 2: len(stored) // 2 + 2].mean())  # between two stored values: no entry sits on it
    thresholded = SparseIndex.build(model, threshold=tau)
    got, _ = thresholded.accumulate(model, keys[:, None])
    torch.testing.assert_close(got, rows * (rows > tau))
    capped = SparseIndex.build(model, max_postings=3)
    assert capped.posting_lengths().max() <= 3
    full = SparseIndex.build(model)  # pruning the τ = 0 index gives what a fresh build gives
    for fresh, derived in ((thresholded, full.pruned(model, threshold=tau)), (capped, full.pruned(model, max_postings=3))):
        for name in ("indptr", "indices", "values"):
            assert np.array_equal(getattr(fresh, name), getattr(derived, name)), name
        assert fresh.meta == derived.meta
    got, _ = capped.accumulate(model, keys[:, None])
    best = torch.sort(rows[:, 1:], dim=1, descending=True, stable=True)
    for key in range(64):
        kept = best.indices[key, :3][best.values[key, :3] > 0] + 1
        assert set(torch.nonzero(got[key]).flatten().tolist()) == set(kept.tolist())


def test_index_size_save_load_and_stale_weights(sparcode_data, tmp_path):
    model = trained(sparcode_data)
    for dtype in ("float32", "float16"):
        index = SparseIndex.build(model, keys="used", dtype=dtype)
        assert index.nbytes() == index.predicted_bytes()
        loaded = SparseIndex.load(index.save(str(tmp_path / dtype)))
        for name in ("indptr", "indices", "values", "keys"):
            assert (getattr(loaded, name) == getattr(index, name)).all() and getattr(loaded, name).dtype == getattr(index, name).dtype
        assert loaded.meta == index.meta
    batch = valid_batch(sparcode_data)
    loaded.scores(model, batch)
    with torch.no_grad():
        model.mlp_tail[-1].bias.add_(0.1)
    with pytest.raises(UsageError, match="stale"):
        loaded.scores(model, batch)


def test_missed_keys_are_computed_or_dropped(sparcode_data):
    model = trained(sparcode_data)
    index = SparseIndex.build(model, keys="used")
    stored = set(index.keys.tolist())
    missing = next(key for key in range(64) if key not in stored)
    present = int(index.keys[0])
    queries = torch.tensor([[present, missing], [present, present]])
    computed, misses = index.accumulate(model, queries)
    assert misses == 1
    index.meta["miss"] = "empty"
    dropped, _ = index.accumulate(model, queries)
    torch.testing.assert_close(computed[1], dropped[1])
    torch.testing.assert_close(computed[0] - dropped[0], exact_rows(model, torch.tensor([missing]))[0])
    index.meta["miss"] = "compute"  # scores() of histories whose keys miss: computed with the model
    index.query_keys = lambda model, interaction: queries
    torch.testing.assert_close(index.scores(model, valid_batch(sparcode_data)), computed)


def test_top_items_are_the_best_scores_ties_by_ascending_id_and_never_padding():
    scores = torch.tensor([[9.0, 0.5, 2.0, 2.0, 0.0, 1.0], [9.0, 0.0, 0.0, 3.0, 0.0, 0.0]])  # column 0: padding
    assert top_items(scores, 3).tolist() == [[2, 3, 5], [3, 1, 2]]
    assert top_items(scores, 5).tolist() == [[2, 3, 5, 1, 4], [3, 1, 2, 4, 5]]
    ties = torch.ones(2, 301)  # wide enough that an unstable sort (torch's from ~100 columns) would shuffle the ties
    assert top_items(ties, 50).tolist() == [list(range(1, 51))] * 2


def test_search_returns_the_index_scores_best_first(sparcode_data):
    model, batch = trained(sparcode_data), valid_batch(sparcode_data)
    index = SparseIndex.build(model)
    full = index.scores(model, batch)
    found, items = index.search(model, batch)
    assert items.shape == (len(full), 10) and (items > 0).all()
    torch.testing.assert_close(found, full.gather(1, items))
    assert torch.equal(found, full[:, 1:].sort(dim=1, descending=True).values[:, :10])
    assert index.search(model, batch, k=3)[1].tolist() == items[:, :3].tolist()


def test_pruning_keeps_the_dtype_the_keys_and_only_entries_above_the_threshold(sparcode_data):
    model = trained(sparcode_data)
    half = SparseIndex.build(model, keys="used", dtype="float16")
    on_an_entry = float(np.median(half.values.astype(np.float32)))  # a stored value: "> threshold" drops it
    pruned = half.pruned(model, threshold=on_an_entry)
    assert pruned.values.dtype == np.float16 and pruned.meta["dtype"] == "float16" and pruned.indptr.dtype == np.int64
    assert np.array_equal(pruned.keys, half.keys) and pruned.nnz == int((half.values.astype(np.float32) > on_an_entry).sum())
    assert half.pruned(model, dtype="float32").values.dtype == np.float32
    # Both rules at once, as a fresh build applies them (in float32: float16 rounding can tie two values a build still tells apart).
    both = SparseIndex.build(model, keys="used", threshold=on_an_entry, max_postings=2)
    derived = SparseIndex.build(model, keys="used").pruned(model, threshold=on_an_entry, max_postings=2)
    for name in ("indptr", "indices", "values", "keys"):
        assert np.array_equal(getattr(both, name), getattr(derived, name)) and getattr(both, name).dtype == getattr(derived, name).dtype, name
    assert both.meta == derived.meta and 0 < derived.nnz < pruned.nnz
    # A threshold a hair below a stored value is that value in float32, as the build compares: pruning agrees.
    full = SparseIndex.build(model)
    below = float(np.nextafter(np.float64(full.values[0]), -np.inf))
    assert below < float(full.values[0]) and np.array_equal(full.pruned(model, threshold=below).values, SparseIndex.build(model, threshold=below).values)


def test_an_index_of_all_keys_saves_into_an_existing_folder_and_loads_without_keys(sparcode_data, tmp_path):
    model = trained(sparcode_data)
    index = SparseIndex.build(model)
    assert index.keys is None and index.nbytes() == index.predicted_bytes() == index.nnz * 8 + 8 * (64 + 1)
    loaded = SparseIndex.load(index.save(str(tmp_path)))  # the folder exists already
    assert loaded.keys is None and np.array_equal(loaded.values, index.values) and loaded.meta == index.meta


def test_an_index_file_with_pickled_objects_is_refused_without_unpickling(sparcode_data, tmp_path):
    model = trained(sparcode_data)
    folder = SparseIndex.build(model).save(str(tmp_path / "index"))
    marker = tmp_path / "marker"
    arrays = dict(np.load(os.path.join(folder, "index.npz")))
    np.savez(os.path.join(folder, "index.npz"), **{**arrays, "values": np.array([RunsCommand(marker)], dtype=object)})
    with pytest.raises(UsageError, match="pickled objects") as raised:
        SparseIndex.load(folder)
    assert "\n" not in str(raised.value) and not marker.exists()


@pytest.mark.parametrize("settings,message", [
    ({"keys": "bogus"}, "keys='bogus': use all"),
    ({"miss": "bogus"}, "miss='bogus': use compute"),
    ({"threshold": -1}, "threshold=-1: give a number >= 0"),
    ({"threshold": float("nan")}, "threshold=nan"),
    ({"threshold": "0.1"}, "threshold='0.1'"),
    ({"max_postings": 0}, "max_postings=0: give an integer >= 1, or None"),
    ({"max_postings": 2.5}, "max_postings=2.5"),
    ({"max_postings": True}, "max_postings=True"),
    ({"dtype": "int8"}, "dtype='int8': use one of float32, float16"),
    ({"block_keys": 0}, "block_keys=0"),
])
def test_bad_index_settings_are_refused_in_one_line(sparcode_data, settings, message):
    model = trained(sparcode_data, steps=1)
    calls = [lambda: SparseIndex.build(model, **settings)]
    if "block_keys" not in settings and "keys" not in settings and "miss" not in settings:
        full = SparseIndex.build(model)
        calls.append(lambda: full.pruned(model, **settings))
    for call in calls:
        with pytest.raises(UsageError) as raised:
            call()
        assert f"invalid sparse index setting {message}" in str(raised.value) and "\n" not in str(raised.value)
    SparseIndex.build(model, threshold=0, max_postings=1, block_keys=1)  # the edges themselves are accepted


def test_an_index_refuses_a_model_without_codes(sparcode_data, tiny_data):
    sparcode = trained(sparcode_data, steps=1)
    index = SparseIndex.build(sparcode)
    t2diff = make_model(tiny_data)
    for call in (lambda: SparseIndex.build(t2diff), lambda: index.scores(t2diff, valid_batch(sparcode_data)),
                 lambda: index.pruned(t2diff, threshold=0.1)):
        with pytest.raises(UsageError, match="belongs to a SparCode model, not T2Diff") as raised:
            call()
        assert "\n" not in str(raised.value)
    with pytest.raises(UsageError, match="quantize: true"):
        SparseIndex.build(make_model(sparcode_data, quantize=False))


def damage(folder, what):
    """Break a saved index one way; returns the path to load."""
    meta_path, npz_path = os.path.join(folder, "meta.json"), os.path.join(folder, "index.npz")
    meta = json.load(open(meta_path))
    arrays = dict(np.load(npz_path))
    if what == "missing folder":
        return os.path.join(folder, "absent")
    if what == "a checkpoint file":
        torch.save({"state_dict": {}}, os.path.join(folder, "T2Diff-1.pth"))
        return os.path.join(folder, "T2Diff-1.pth")
    if what == "no meta.json":
        os.remove(meta_path)
    elif what == "meta not JSON":
        open(meta_path, "w").write("{not json")
    elif what == "meta a list":
        json.dump([meta], open(meta_path, "w"))
    elif what == "meta without a field":
        json.dump({k: v for k, v in meta.items() if k != "n_items"}, open(meta_path, "w"))
    elif what == "meta with a bad setting":
        json.dump({**meta, "dtype": "int8"}, open(meta_path, "w"))
    elif what == "meta with a count of items as text":
        json.dump({**meta, "n_items": "31"}, open(meta_path, "w"))
    elif what == "meta with a fingerprint as a number":
        json.dump({**meta, "fingerprint": 7}, open(meta_path, "w"))
    elif what == "garbage array":
        with zipfile.ZipFile(npz_path, "w") as archive:
            for name in ("indptr", "indices", "values", "keys"):
                archive.writestr(f"{name}.npy", b"not an array")
    elif what == "array cut short":
        with zipfile.ZipFile(npz_path, "w") as archive:
            for name, array in arrays.items():
                stored = io.BytesIO()
                np.save(stored, array)
                archive.writestr(f"{name}.npy", stored.getvalue()[:-8] if name == "values" else stored.getvalue())
    elif what == "meta of another format":
        json.dump({**meta, "format": 99}, open(meta_path, "w"))
    elif what == "no index.npz":
        os.remove(npz_path)
    elif what.startswith("truncated"):
        raw = open(npz_path, "rb").read()
        open(npz_path, "wb").write(raw[: {"truncated": len(raw) // 2, "truncated to nothing": 0}[what]])
    elif what == "flipped byte":
        raw = bytearray(open(npz_path, "rb").read())
        raw[len(raw) // 3] ^= 0xFF
        open(npz_path, "wb").write(bytes(raw))
    elif what == "no keys array":
        np.savez(npz_path, **{k: v for k, v in arrays.items() if k != "keys"})
    elif what == "no values array":
        np.savez(npz_path, **{k: v for k, v in arrays.items() if k != "values"})
    elif what == "short indptr":
        np.savez(npz_path, **{**arrays, "indptr": arrays["indptr"][:-1]})
    elif what == "item out of range":
        np.savez(npz_path, **{**arrays, "indices": arrays["indices"] + 1000})
    elif what == "values of another dtype":
        np.savez(npz_path, **{**arrays, "values": arrays["values"].astype(np.float64)})
    elif what == "fewer values":
        np.savez(npz_path, **{**arrays, "values": arrays["values"][:-1]})
    elif what == "unsorted keys":
        np.savez(npz_path, **{**arrays, "keys": arrays["keys"][::-1].copy()})
    return folder


@pytest.mark.parametrize("what,message", [
    ("missing folder", "does not exist: give the folder SparseIndex.save wrote"),
    ("a checkpoint file", "is a file: give the folder SparseIndex.save wrote"),
    ("no meta.json", "is not an index's meta.json (no such file)"),
    ("meta not JSON", "is not an index's meta.json (not JSON"),
    ("meta a list", "(a JSON list, not an object)"),
    ("meta without a field", "(no n_items)"),
    ("meta with a bad setting", "dtype='int8'"),
    ("meta with a count of items as text", "(n_items not a positive integer)"),
    ("meta with a fingerprint as a number", "fingerprint not a string"),
    ("garbage array", "indptr is no array"),
    ("array cut short", "cannot be read (EOF: reading array data"),
    ("meta of another format", "has format 99"),
    ("no index.npz", "has meta.json but no index.npz"),
    ("truncated", "it is truncated or damaged"),
    ("truncated to nothing", "it is truncated or damaged"),
    ("flipped byte", "it is truncated or damaged"),
    ("no keys array", "lacks the array(s) keys"),
    ("no values array", "lacks the array(s) values"),
    ("short indptr", "indptr has"),
    ("item out of range", "item indices outside"),
    ("values of another dtype", "values is float64"),
    ("fewer values", "item indices but"),
    ("unsorted keys", "keys are not sorted"),
])
def test_loading_anything_but_a_saved_index_is_refused_in_one_line(sparcode_data, tmp_path, what, message):
    model = trained(sparcode_data, steps=1)
    folder = SparseIndex.build(model, keys="used").save(str(tmp_path / "index"))
    with pytest.raises(UsageError) as raised:
        SparseIndex.load(damage(folder, what))
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_index_scoring_hashes_the_weights_once_per_batch(sparcode_data, monkeypatch):
    from recbole_t2diff import sparse_index

    model, batch = trained(sparcode_data), valid_batch(sparcode_data)
    model.score_mode = "index"
    hashed = []
    real = sparse_index.fingerprint
    monkeypatch.setattr(sparse_index, "fingerprint", lambda *args: hashed.append(1) or real(*args))
    first = scores(model, batch)  # builds the index: one hash, stored with it
    assert len(hashed) == 1
    for _ in range(2):
        torch.testing.assert_close(scores(model, batch), first)
    assert len(hashed) == 3, "one staleness check per scored batch"
    torch.testing.assert_close(model.sparse_index.scores(model, batch), first)
    assert len(hashed) == 4


def test_the_index_is_stale_once_any_part_its_rows_depend_on_changes(sparcode_data):
    """Codebooks, item side, interaction network and bias make the rows; the tokenizer only picks keys."""
    model, batch = trained(sparcode_data), valid_batch(sparcode_data)
    index = SparseIndex.build(model)
    for part in ("quantizer", "item_embedding", "item_heads", "query_layer", "item_layer", "mlp_tail", "trm_encoder"):
        name, tensor = next((n, t) for n, t in model.state_dict().items() if n.split(".")[0] == part and t.is_floating_point())
        original = tensor.clone()
        with torch.no_grad():
            tensor.add_(0.5)
        if part == "trm_encoder":
            index.check(model)
        else:
            with pytest.raises(UsageError, match="stale"):
                index.check(model)
        with torch.no_grad():
            tensor.copy_(original)
    index.check(model)
    model.score_bias += 0.5
    with pytest.raises(UsageError, match="stale"):
        index.scores(model, batch)


def test_posting_caps_keep_the_largest_scores_ties_by_ascending_id():
    from recbole_t2diff.sparse_index import _prune

    rows = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5], [0.0, 3.0, 0.0, 1.0, 1.0]])
    indptr, items, values = _prune(rows, 0.0, 2)
    assert indptr.tolist() == [0, 2, 4] and items.tolist() == [1, 2, 1, 3] and values.tolist() == [2.0, 2.0, 3.0, 1.0]
    wide = torch.ones(2, 300)  # ties across a row wide enough for an unstable sort to shuffle them
    assert _prune(wide, 0.0, 5)[1].tolist() == [0, 1, 2, 3, 4] * 2
    indptr, items, _ = _prune(rows, 0.0, 5)  # a cap at the row length keeps every positive entry
    assert indptr.tolist() == [0, 5, 8] and items.tolist() == [0, 1, 2, 3, 4, 1, 3, 4]


def test_score_mode_index_gives_recbole_the_exact_metrics(sparcode_data):
    config, _, _, test = sparcode_data
    model = trained(sparcode_data)
    trainer = make_trainer(config, model)
    exact = trainer.evaluate(test, load_best_model=False, show_progress=False)
    model.score_mode = "index"
    assert dict(trainer.evaluate(test, load_best_model=False, show_progress=False)) == dict(exact)
    built = model.sparse_index
    trainer.evaluate(test, load_best_model=False, show_progress=False)
    assert model.sparse_index is built, "an index of unchanged weights is reused"
    model.index_settings = {**model.index_settings, "max_postings": 2, "keys": "used"}  # as the index_* knobs set them
    capped = model.index()
    assert capped is not built and capped.meta["max_postings"] == 2 and capped.meta["keys"] == "used"
    assert capped.posting_lengths().max() <= 2 < built.posting_lengths().max()


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
    square = run("SparCode", "tiny", config_dict={"data_path": tiny_path, **TINY_MODEL, **TINY_SPARCODE, "n_query_tokens": 8,
                                                  "epochs": 1})
    for checkpoint in (result["saved_model_file"], square["saved_model_file"]):
        with pytest.raises(UsageError, match="SparCode with interaction: mlp and score_relu: true does not score by the inner product .* no two-tower export"):
            export_embeddings(checkpoint, str(workdir / "export"))


@pytest.mark.spawns
@pytest.mark.slow
def test_runner_trains_sparcode_on_ml100k(tmp_path):
    args = ["--model=SparCode", "--dataset=ml-100k", "--epochs=1", "--MAX_ITEM_LIST_LENGTH=20", "--train_batch_size=2048",
            "--show_progress=False", "--embedding_size=16", "--token_size=16", "--n_layers=1", "--inner_size=32",
            "--mlp_hidden=[16,16]", "--n_query_tokens=2", "--codebook_size=8", "--softmax_negatives=20"]
    env = {**os.environ, "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, os.path.join(REPO, "run_recbole.py"), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = re.search(r"test result.*?ndcg@10 : ([0-9.]+)", result.stdout + result.stderr)
    assert logged, (result.stdout + result.stderr)[-3000:]
    checkpoint = next((tmp_path / "saved").glob("SparCode-*.pth"))
    code = ("from recbole_t2diff import evaluate_checkpoint; "
            f"print('NDCG', evaluate_checkpoint({str(checkpoint)!r}, overrides={{'score_mode': 'index'}})['ndcg@10'])")
    index = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert index.returncode == 0, index.stderr[-3000:]
    assert float(re.search(r"NDCG ([0-9.]+)", index.stdout).group(1)) == float(logged.group(1))
