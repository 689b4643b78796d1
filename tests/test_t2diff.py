"""T2Diff's wiring (t2diff.py, docs/T2DIFF.md §3, §9-15): re-alignment, padding and the target never reaching a score,
the seeded evaluation chain, input tokens (the clip, categories), the user tower's rows, the item tower and the tower's losses,
every architecture knob reaching its part, every ablation training, and the presets.
"""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from recbole_t2diff.errors import UsageError
from recbole_t2diff.model.attention import TargetAttention
from recbole_t2diff.model.t2diff import T2Diff, realign

from helpers import TINY_MODEL, first_batch, make_model, random_ranking_ndcg, record_calls, scores


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_realign_puts_the_most_recent_item_last(data):
    max_len = data.draw(st.integers(1, 12))
    rows = data.draw(st.lists(st.lists(st.integers(1, 99), min_size=1, max_size=max_len), min_size=1, max_size=6))
    seq = torch.tensor([row + [0] * (max_len - len(row)) for row in rows])
    lengths = torch.tensor([len(row) for row in rows])
    ids, mask = realign(seq, lengths)
    for i, row in enumerate(rows):
        pad = max_len - len(row)
        assert ids[i].tolist() == [0] * pad + row
        assert mask[i].tolist() == [False] * pad + [True] * len(row)


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_realign_never_reads_past_the_length(data):
    max_len = data.draw(st.integers(2, 10))
    length = data.draw(st.integers(1, max_len))
    seq = torch.tensor([data.draw(st.lists(st.integers(1, 9), min_size=max_len, max_size=max_len))])
    garbage = seq.clone()
    garbage[0, length:] = 77
    a, _ = realign(seq, torch.tensor([length]))
    b, _ = realign(garbage, torch.tensor([length]))
    assert torch.equal(a, b)


def test_padding_never_leaks_into_scores(tiny_data):
    """Garbage after item_length, and any value of the padding embedding, change no score."""
    _, _, valid, _ = tiny_data
    batch = first_batch(valid)
    lengths = batch["item_length"]
    assert (lengths < batch["item_id_list"].size(1)).any(), "the batch must contain padded sequences"
    model = make_model(tiny_data)
    before = scores(model, batch)
    seq = batch["item_id_list"].clone()
    positions = torch.arange(seq.size(1))[None, :] >= lengths[:, None]
    seq[positions] = 5
    altered = batch.copy() if hasattr(batch, "copy") else batch
    altered.interaction["item_id_list"] = seq
    with torch.no_grad():
        model.item_embedding.weight[0] = 3.0
    after = scores(model, altered)
    torch.testing.assert_close(before[:, 1:], after[:, 1:])


def test_scoring_never_reads_the_target(tiny_data):
    _, _, valid, _ = tiny_data
    batch = first_batch(valid)
    model = make_model(tiny_data)
    before = scores(model, batch)
    batch.interaction["item_id"] = torch.ones_like(batch["item_id"])
    torch.testing.assert_close(before, scores(model, batch))


def test_full_sort_predict_equals_predict_on_every_item(tiny_data):
    _, _, valid, _ = tiny_data
    batch = first_batch(valid)
    model = make_model(tiny_data)
    full = scores(model, batch)
    for item in range(1, model.n_items):
        batch.interaction["item_id"] = torch.full_like(batch["item_id"], item)
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model.predict(batch), full[:, item], rtol=1e-5, atol=1e-5)


def test_evaluation_noise_is_seeded_per_evaluation(tiny_data):
    _, _, valid, _ = tiny_data
    batch = first_batch(valid)
    model = make_model(tiny_data)
    first = scores(model, batch)
    with torch.no_grad():
        unseeded = model.full_sort_predict(batch)  # same evaluation, next draw of the chain
    assert not torch.allclose(first, unseeded), "the reverse chain must actually be random"
    torch.testing.assert_close(first, scores(model, batch))
    other_seed = make_model(tiny_data, eval_seed=123)
    other_seed.load_state_dict(model.state_dict())
    assert not torch.allclose(first, scores(other_seed, batch))


ABLATIONS_AND_VARIANTS = [
    {},
    {"use_diffusion": False},
    {"use_drift": False},
    {"use_target_attention": False},
    {"beta_schedule": "linear"},
    {"beta_schedule": "log"},
    {"sampler": "ddpm", "infer_steps": None},
    {"sampler": "ddpm", "infer_steps": None, "reverse_coef": "official"},
    {"step_emb": "sinusoidal_mlp"},
    {"unet_padding": "same", "unet_out_proj": True},
    {"diff_loss": "mse", "diff_loss_positions": "valid"},
    {"diff_loss_positions": "last"},
    {"category_field": "genre"},
    {"emb_max_norm": 1.5, "mask_pads": False},
    {"use_user_ffn": True, "infer_samples": 3},
    {"dropout_prob": 0.3},
    {"softmax_negatives": 10},
    {"sampler": "ddim", "infer_steps": 3},
    {"sampler": "ddim", "infer_steps": 3, "ddim_eta": 1.0},
]


@pytest.mark.parametrize("knobs", ABLATIONS_AND_VARIANTS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
@pytest.mark.slow
def test_every_variant_trains_and_scores(tiny_data, knobs):
    _, train, valid, _ = tiny_data
    model = make_model(tiny_data, **knobs)
    batch = first_batch(train)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)

    def loss_value():
        torch.manual_seed(1)  # same diffusion draws before and after training
        loss = model.calculate_loss(batch)
        return sum(loss) if isinstance(loss, tuple) else loss

    model.train()
    start = loss_value().item()
    for _ in range(15):
        optimizer.zero_grad()
        loss_value().backward()
        optimizer.step()
    assert loss_value().item() < start
    out = scores(model, first_batch(valid))
    assert out.shape == (len(first_batch(valid)), model.n_items) and torch.isfinite(out).all()


def test_without_diffusion_there_is_no_unet_and_one_loss(tiny_data):
    _, train, _, _ = tiny_data
    model = make_model(tiny_data, use_diffusion=False)
    assert not hasattr(model, "denoiser")
    assert torch.is_tensor(model.calculate_loss(first_batch(train)))


# ---- input tokens ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cap,short,long", [(1.5, 0.5, 3.0), (0.8, 0.5, 0.9)])
def test_emb_max_norm_shrinks_long_tokens_to_the_cap_and_leaves_short_ones_alone(tiny_data, cap, short, long):
    model = make_model(tiny_data, emb_max_norm=cap)
    direction = torch.nn.functional.normalize(torch.randn(2, model.item_embedding.embedding_dim), dim=-1)
    with torch.no_grad():
        model.item_embedding.weight[1] = short * direction[0]
        model.item_embedding.weight[2] = long * direction[1]
    ids = torch.tensor([[1, 2]])
    clipped, raw = model.tokens(ids), model.tokens(ids, clip=False)
    torch.testing.assert_close(clipped[0, 0], short * direction[0])
    torch.testing.assert_close(clipped[0, 1], cap * direction[1])
    torch.testing.assert_close(raw[0], torch.stack([short * direction[0], long * direction[1]]))


def test_a_token_with_categories_is_its_id_embedding_then_the_mean_of_its_real_categories(tiny_data):
    model = make_model(tiny_data, category_field="genre", category_dim=3)
    assert (model.item_embedding.embedding_dim, model.category_embedding.embedding_dim) == (5, 3)  # d = 8
    halves = make_model(tiny_data, category_field="genre")  # category_dim: ~ gives the categories half the width
    assert (halves.item_embedding.embedding_dim, halves.category_embedding.embedding_dim) == (4, 4)
    categories = model.item_categories  # [n_items, G], 0 = no category
    ids = torch.arange(1, model.n_items)
    assert (categories[ids] == 0).any() and (categories[ids] == 1).any(), "padded slots and category 1 must both occur"
    expected = []
    for item in ids.tolist():
        real = categories[item][categories[item] > 0]
        expected.append(torch.cat([model.item_embedding.weight[item], model.category_embedding(real).mean(0)]))
    torch.testing.assert_close(model.tokens(ids[None])[0], torch.stack(expected))


@pytest.mark.parametrize("category_field", [None, "genre"])
def test_every_real_item_and_category_learns_and_padding_never_does(tiny_data, category_field):
    """The full softmax reaches every item's token (and through it every category that occurs); id 0 is padding."""
    _, train, _, _ = tiny_data
    model = make_model(tiny_data, category_field=category_field)
    model.train()
    loss = model.calculate_loss(first_batch(train))
    sum(loss if isinstance(loss, tuple) else [loss]).backward()
    for table, used in [(model.item_embedding, torch.arange(1, model.n_items))] + (
        [(model.category_embedding, model.item_categories[1:].unique())] if category_field else []
    ):
        assert (table.weight.grad[0] == 0).all()
        assert (table.weight.grad[used[used > 0]] != 0).any(dim=1).all()


def test_a_single_token_category_field_becomes_one_column_per_item():
    from recbole.data.interaction import Interaction

    class Items:  # a `token` field (one category per item) loads as a 1-D column, a `token_seq` as 2-D
        def __init__(self, column):
            self.column = column

        def get_item_feature(self):
            return Interaction({"brand": self.column})

    single = T2Diff._item_categories(Items(torch.tensor([0, 3, 1], dtype=torch.int32)), "brand")
    assert single.dtype == torch.long and single.tolist() == [[0], [3], [1]]
    several = T2Diff._item_categories(Items(torch.tensor([[0, 0], [3, 2], [1, 0]])), "brand")
    assert several.tolist() == [[0, 0], [3, 2], [1, 0]]
    with pytest.raises(UsageError, match="category_field 'genre' is not loaded"):
        T2Diff._item_categories(Items(torch.tensor([1])), "genre")


# ---- the user tower: which rows feed which attention ------------------------------------------------


@pytest.mark.parametrize("use_user_ffn", [False, True])
def test_session_is_the_last_rows_plus_x_hat_and_target_attention_reads_only_the_older_rows(tiny_data, use_user_ffn):
    model = make_model(tiny_data, use_user_ffn=use_user_ffn)
    model.eval()
    k = model.session_len
    history, x_hat = torch.randn(2, 12, 8), torch.randn(2, 8)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :7] = False  # a user with 5 items: one older item behind a full session
    session_calls, target_calls = record_calls(model.session_encoder), record_calls(model.target_attention)
    user = model.user_vector(history, mask, x_hat)

    ((session, session_mask),) = session_calls
    torch.testing.assert_close(session, torch.cat([history[:, -k:], x_hat[:, None]], dim=1))
    assert session_mask.tolist() == [[True] * (k + 1)] * 2
    ((query, older, older_mask),) = target_calls
    torch.testing.assert_close(older, history[:, :-k])
    assert torch.equal(older_mask, mask[:, :-k])
    h_s = model.session_encoder(session, session_mask)
    torch.testing.assert_close(query, h_s)
    expected = torch.cat([model.target_attention(h_s, older, older_mask), h_s], dim=-1)
    torch.testing.assert_close(user, model.user_ffn(expected) if use_user_ffn else expected)


def test_a_time_gap_session_masks_its_rows_in_the_session_and_leaves_the_rest_to_target_attention(tiny_data):
    model = make_model(tiny_data)
    model.eval()
    k = model.session_len
    history, x_hat = torch.randn(1, 12, 8), torch.randn(1, 8)
    mask = torch.ones(1, 12, dtype=torch.bool)
    in_session = torch.zeros(1, 12, dtype=torch.bool)
    in_session[0, -2:] = True  # a gap before the last two items: a session shorter than session_len
    session_calls, target_calls = record_calls(model.session_encoder), record_calls(model.target_attention)
    model.user_vector(history, mask, x_hat, in_session)
    ((session, session_mask),) = session_calls
    torch.testing.assert_close(session, torch.cat([history[:, -k:], x_hat[:, None]], dim=1))
    assert session_mask.tolist() == [[False] * (k - 2) + [True] * 3]
    ((_, older, older_mask),) = target_calls
    torch.testing.assert_close(older, history)  # the whole history, the session's rows masked out
    assert older_mask.tolist() == [[True] * 10 + [False] * 2]


def test_without_target_attention_the_older_part_is_the_mean_of_the_older_real_rows(tiny_data):
    model = make_model(tiny_data, use_target_attention=False)
    model.eval()
    k = model.session_len
    history = torch.randn(3, 12, 8)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, :7] = False  # one older item
    mask[2, :9] = False  # none: the older part is 0
    user = model.user_vector(history, mask, None)
    expected = torch.stack([history[0, :-k].mean(0), history[1, 7], torch.zeros(8)])
    torch.testing.assert_close(user[:, :8], expected)


def test_the_target_attention_score_is_linear_elu_layernorm_linear_without_biases(tiny_data):
    model = make_model(tiny_data, layer_norm_eps=1e-6, att_hidden=12)
    first, act, norm, last = model.target_attention.score
    assert isinstance(act, torch.nn.ELU) and isinstance(norm, torch.nn.LayerNorm) and norm.eps == 1e-6
    assert (first.in_features, first.out_features, last.in_features, last.out_features) == (4 * model.embedding_size, 12, 12, 1)
    assert first.bias is None and last.bias is None
    assert TargetAttention(8).score[2].eps == 1e-8 and TargetAttention(8).score[0].out_features == 8  # defaults: as T2Diff's


# ---- the item tower and the tower's losses ------------------------------------------------------------


def test_item_tower_is_computed_from_item_tokens_only(tiny_data):
    """Two-tower property: item vectors are a function of the item alone, computed once for all items."""
    model = make_model(tiny_data)
    everything = model.item_vectors()
    assert everything.shape == (model.n_items, 2 * model.embedding_size)
    some = torch.tensor([3, 1, 7])
    torch.testing.assert_close(model.item_vectors(some), everything[some])


@pytest.mark.parametrize("category_field", [None, "genre"])
def test_without_gradients_every_items_vector_is_computed_once_until_a_weight_it_reads_changes(tiny_data, category_field):
    model = make_model(tiny_data, category_field=category_field)
    tower = record_calls(model.item_tower)

    def fresh():
        with torch.enable_grad():
            return model.item_vectors()

    with torch.no_grad():
        first = model.item_vectors()
        assert model.item_vectors() is first and len(tower) == 1  # served again, not recomputed
        torch.testing.assert_close(first, fresh().detach())
        next(model.session_encoder.parameters()).add_(1.0)  # a user-tower weight: the item vectors stand
        assert model.item_vectors() is first
    # an optimiser step on the item side, a loaded state, a change of the category table: each is seen
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model.item_vectors().pow(2).sum().backward()
    optimizer.step()
    changes = [lambda: None, lambda: model.load_state_dict(make_model(tiny_data, category_field=category_field).state_dict())]
    if category_field:
        changes.append(lambda: model.item_categories.copy_(model.item_categories.roll(1, dims=0)))
    for change in changes:
        with torch.no_grad():
            before = model.item_vectors()
            change()
            after = model.item_vectors()
        assert not torch.equal(before, after) or change is changes[0], "a change on the item side was not seen"
        torch.testing.assert_close(after, fresh().detach())
    assert fresh().requires_grad  # with gradients, always built afresh in the graph


def test_the_item_tower_reads_unclipped_tokens(tiny_data):
    model = make_model(tiny_data, emb_max_norm=0.01)  # far below the initial token norms: every user-side token is clipped
    ids = torch.arange(1, model.n_items)
    raw, clipped = model.tokens(ids, clip=False), model.tokens(ids)
    assert not torch.allclose(raw, clipped)
    torch.testing.assert_close(model.item_vectors(ids), model.item_tower(raw))


def test_sampled_softmax_masks_accidental_hits(tiny_data):
    _, train, _, _ = tiny_data
    model = make_model(tiny_data, softmax_negatives=500)  # far more draws than items: hits are certain
    batch = first_batch(train)
    # Users that score their own target far above every other item: with the hits masked only the
    # positive stands out (loss ~0); unmasked, each of a row's ~17 hits ties with it (loss ~log 18).
    with torch.no_grad():
        loss = model.tower_loss(50 * model.item_vectors(batch[model.POS_ITEM_ID]), batch)
    assert loss < 1e-3


def test_sampled_negatives_are_drawn_from_every_real_item_and_never_the_padding(tiny_data):
    model = make_model(tiny_data, softmax_negatives=500)
    drawn, item_vectors = [], model.item_vectors
    model.item_vectors = lambda ids=None: drawn.append(ids) or item_vectors(ids)
    targets, user = torch.tensor([1, 2]), torch.randn(2, 16)
    loss = model.tower_loss(user, {model.POS_ITEM_ID: targets})
    negatives = torch.cat([ids for ids in drawn if ids is not None and not torch.equal(ids, targets)])
    assert len(negatives) == 500 and set(negatives.tolist()) == set(range(1, model.n_items))
    # ... and the loss is the softmax of the positive against them, a row's own target left out
    items = model.item_vectors()
    expected = [
        torch.logsumexp(torch.cat([user[row] @ items[[target]].t(), user[row] @ items[negatives[negatives != target]].t()]), 0) - user[row] @ items[target]
        for row, target in enumerate(targets.tolist())
    ]
    torch.testing.assert_close(loss, torch.stack(expected).mean())


def test_bpr_is_the_log_sigmoid_of_the_positive_minus_the_negative_score(tiny_data):
    model = make_model(tiny_data, loss_type="BPR", train_neg_sample_args={"distribution": "uniform", "sample_num": 1})
    user = torch.randn(3, 16)
    positive, negative = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    items = model.item_vectors()
    expected = -torch.nn.functional.logsigmoid((user * items[positive]).sum(-1) - (user * items[negative]).sum(-1)).mean()
    loss = model.tower_loss(user, {model.POS_ITEM_ID: positive, model.NEG_ITEM_ID: negative})
    torch.testing.assert_close(loss, expected)


def test_bpr_trains_with_recboles_negatives(tiny_path, workdir):
    from recbole_t2diff.quick_start import run

    result = run(
        "T2Diff",
        "tiny",
        config_dict={
            "data_path": tiny_path,
            **TINY_MODEL,
            "loss_type": "BPR",
            "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1},
        },
    )
    # It learned the data's order (BPR scored 0.29-0.36 over seeds 1-5), and with the right sign.
    assert result["test_result"]["ndcg@10"] > random_ranking_ndcg(30) + 0.05


# ---- the knobs reach their parts, the presets build ------------------------------------------------------


def test_every_architecture_knob_reaches_its_part(tiny_data):
    """The layout of docs/T2DIFF.md §6-§12, built from non-default knobs (d = 8): a knob read under the wrong key or dropped
    on the way to its module would otherwise leave the module at its own default."""
    from recbole_t2diff.model.diffusion import GaussianDiffusion

    model = make_model(
        tiny_data,
        beta_schedule="linear",
        beta_a=0.03,
        beta_b=0.02,
        reverse_coef="official",
        unet_levels=2,
        unet_out_proj=True,
        session_ffn_hidden=[5, 6],
        mask_diag=False,
        mask_pads=False,
        layer_norm_eps=1e-6,
        use_user_ffn=True,
        xhat_loss="ce",
        initializer_range=0.05,
    )
    schedule = GaussianDiffusion(model.n_steps, "linear", 0.03, 0.02, "official")
    for name in ("betas", "alphas_cumprod", "coef_x0", "coef_zs", "sigma"):
        torch.testing.assert_close(getattr(model.diffusion, name), getattr(schedule, name), rtol=0, atol=0)
    assert model.denoiser.unet.levels == 2 and model.denoiser.unet.out_proj is not None

    session = model.session_encoder
    assert (session.mask_diag, session.mask_pads, session.attention_norm.eps) == (False, False, 1e-6)
    assert [(step[0].in_features, step[0].out_features) for step in session.ffn] == [(8, 5), (5, 6), (6, 8)]
    assert [[type(m) for m in tower] for tower in (model.user_ffn, model.item_tower)] == [[torch.nn.Linear, torch.nn.ELU, torch.nn.LayerNorm]] * 2
    assert (model.user_ffn[0].in_features, model.user_ffn[0].out_features, model.user_ffn[0].bias is not None) == (16, 16, True)
    assert (model.item_tower[0].in_features, model.item_tower[0].out_features, model.item_tower[0].bias) == (8, 16, None)
    assert model.user_ffn[2].eps == model.item_tower[2].eps == 1e-6
    # x̂'s logit scale starts where a token's product with itself is 1: d·σ² = 8·0.05² = 0.02, so 50.
    assert model.xhat_logit_scale.exp().item() == pytest.approx(50.0)

    plain = make_model(tiny_data, session_ffn_hidden=None)  # ~: no hidden layer; and no x̂ objective, so no logit scale
    assert [(step[0].in_features, step[0].out_features) for step in plain.session_encoder.ffn] == [(8, 8)]
    assert "xhat_logit_scale" not in plain.state_dict() and plain.user_ffn is None


@pytest.mark.parametrize(
    "preset, expected",
    [
        (
            "T2Diff-paper.yaml",
            {
                "sampler": "ddpm",
                "infer_steps": None,
                "diff_loss": "mse",
                "use_user_ffn": True,
                "denoiser_next_slot": False,
                "xhat_loss": "none",
                "unet_levels": 4,
            },
        ),
        (
            "T2Diff-official.yaml",
            {
                "sampler": "ddpm",
                "infer_steps": None,
                "reverse_coef": "official",
                "embedding_size": 4,
                "category_field": "genre",
                "lambda_diff": 0.1,
                "mask_pads": False,
                "train_batch_size": 512,
            },
        ),
    ],
)
def test_presets_load_and_build(tiny_path, workdir, preset, expected):
    from recbole_t2diff.config import Config, properties_dir
    from recbole_t2diff.quick_start import build_model, prepare

    config = Config(model="T2Diff", dataset="tiny", config_file_list=[str(properties_dir() / "presets" / preset)], config_dict={"data_path": tiny_path})
    for key, value in expected.items():
        assert config[key] == value, key
    _, train, _, _ = prepare(config)
    model = build_model(config, train)
    assert model.sampler == "ddpm" and model.infer_steps == model.n_steps  # the full chain, not one DDIM step


def test_the_fast_preset_is_the_copy_control_with_positions_and_no_unet(tiny_path, workdir):
    from recbole_t2diff.config import Config, properties_dir
    from recbole_t2diff.quick_start import build_model, prepare

    config = Config(
        model="T2Diff", dataset="tiny", config_file_list=[str(properties_dir() / "presets" / "T2Diff-fast.yaml")], config_dict={"data_path": tiny_path}
    )
    _, train, _, _ = prepare(config)
    model = build_model(config, train)
    assert model.x_hat_source == "copy_last" and not model.denoises and not hasattr(model, "denoiser")
    assert model.position_embedding is not None and model.time_lag == "none"  # the tiny data's time is an order index
