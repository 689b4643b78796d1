"""T2Diff's forward logic value by value (issue 16): each test fails on one plausible silent bug.

The maths of the schedules and samplers lives in test_diffusion.py; here the question is whether
the user tower wires them together as docs/T2DIFF.md says: which rows feed which attention, how x̂ is
put back together, how the running scale moves, what the token clip and the sampled softmax do.
"""
import pytest
import torch

from recbole_t2diff.errors import UsageError
from recbole_t2diff.model.attention import SessionEncoder, TargetAttention, masked_mean
from recbole_t2diff.model.t2diff import T2Diff

from conftest import first_batch, make_model


# ---- x̂: from the last reconstructed row back to an item token -----------------------------------

@pytest.mark.parametrize("use_drift", [True, False])
def test_generated_item_adds_the_last_history_token_back_in_drift_mode(tiny_data, use_drift):
    model = make_model(tiny_data, use_drift=use_drift)
    history, z0_last = torch.randn(3, 5, 8), torch.randn(3, 8)
    expected = history[:, -1] + z0_last if use_drift else z0_last
    torch.testing.assert_close(model.generated_item(history, z0_last), expected, rtol=0, atol=0)


def capture_x_hat(model):
    """Record the x̂ every call of ``user_vector`` receives."""
    seen, user_vector = [], model.user_vector
    model.user_vector = lambda history, mask, x_hat, *rest: seen.append(x_hat) or user_vector(history, mask, x_hat, *rest)
    return seen


@pytest.mark.parametrize("use_drift,diffusion_scale", [(True, "none"), (False, "none"), (True, "rms")])
def test_a_perfect_denoiser_makes_the_training_x_hat_the_true_next_item(tiny_data, use_drift, diffusion_scale):
    """Whatever is diffused (drift or next tokens, in token units or in drift-RMS units), a denoiser that
    returns the clean ẑ_0 gives x̂ = x_next."""
    _, train, _, _ = tiny_data
    model = make_model(tiny_data, use_drift=use_drift, diffusion_scale=diffusion_scale)
    model.train()
    model.one_step_estimate = lambda z0, condition, s, noise: z0
    seen = capture_x_hat(model)
    batch = first_batch(train)
    model.calculate_loss(batch)
    torch.testing.assert_close(seen[0], model.tokens(batch[model.POS_ITEM_ID]))
    assert diffusion_scale == "none" or abs(float(model.scale()) - 1) > 0.5, "a unit of ~1 would not test the rescaling"


@pytest.mark.parametrize("use_drift", [True, False])
def test_a_denoiser_predicting_zero_serves_the_last_item_in_drift_mode(tiny_data, use_drift):
    """Inference: ẑ_0 = 0 means "no drift", so x̂ = x_L with drift utilisation and 0 without."""
    _, _, valid, _ = tiny_data
    model = make_model(tiny_data, use_drift=use_drift, sampler="ddim", infer_steps=2)
    model.eval()
    model.denoiser.forward = lambda z_s, *args, **kwargs: torch.zeros_like(z_s)
    seen = capture_x_hat(model)
    batch = first_batch(valid)
    with torch.no_grad():
        model.full_sort_predict(batch)
        history, _ = model.history(batch)
    torch.testing.assert_close(seen[0], history[:, -1] if use_drift else torch.zeros_like(history[:, -1]))


# ---- several reverse chains per user -------------------------------------------------------------

def chain_x_hat(model, history):
    model.eval()  # resets the evaluation generator, ...
    torch.manual_seed(0)  # ... and the global one: the chains draw the same noise for the same shape
    with torch.no_grad():
        return model.sample_generated_item(history)


def test_infer_samples_averages_each_users_own_chains(tiny_data):
    """x̂ with n chains per user equals the mean of n single chains run on n copies of that user."""
    n = 4
    averaged = make_model(tiny_data, infer_samples=n)
    single = make_model(tiny_data, infer_samples=1)  # the same weights (make_model seeds)
    torch.manual_seed(3)
    history = torch.randn(3, 12, 8) * torch.tensor([1.0, 5.0, -3.0])[:, None, None]  # three distinct users
    chains = chain_x_hat(single, history.repeat_interleave(n, dim=0)).view(3, n, -1)
    assert chains.std(dim=1).min() > 1e-3, "the chains of one user must differ, or averaging is not tested"
    torch.testing.assert_close(chain_x_hat(averaged, history), chains.mean(1))


# ---- the diffusion loss --------------------------------------------------------------------------

@pytest.mark.parametrize("diff_loss,positions", [("l2norm", "all"), ("mse", "valid"), ("l2norm", "last"), ("mse", "all")])
def test_the_diffusion_loss_regresses_the_true_drift_at_uniform_steps_on_the_chosen_rows(tiny_data, diff_loss, positions):
    model = make_model(tiny_data, diffusion_scale="rms", diff_loss=diff_loss, diff_loss_positions=positions, lambda_diff=0.7)
    model.drift_rms.fill_(0.5)
    model.eval()  # the running scale stays 0.5
    batch = first_batch(tiny_data[1])
    history, mask = model.history(batch)
    target = batch["item_id"]
    torch.manual_seed(3)
    _, losses = model.diffusion_training(history, mask, target)
    torch.manual_seed(3)  # the same draws, in the same order: the steps, then the noise
    steps = torch.randint(1, model.n_steps + 1, (len(target),))
    drift = torch.cat([history[:, 1:], model.tokens(target)[:, None]], dim=1) - history
    noise = torch.randn_like(drift)
    with torch.no_grad():
        estimate = model.one_step_estimate(drift / 0.5, history / 0.5, steps, noise)
        error = estimate - drift / 0.5
        per_row = error.norm(dim=-1) if diff_loss == "l2norm" else error.pow(2).mean(-1)
        rows = {"all": torch.ones_like(mask), "valid": torch.cat([mask[:, 1:], torch.ones_like(mask[:, :1])], dim=1),
                "last": torch.zeros_like(mask).index_fill(1, torch.tensor([mask.size(1) - 1]), True)}[positions]
        if positions == "valid":
            assert not rows.all(), "the batch must hold padded rows for 'valid' to differ from 'all'"
        expected = 0.7 * (per_row * rows).sum() / rows.sum()
    torch.testing.assert_close(losses[0], expected)


@pytest.mark.parametrize("stop_grad", [True, False])
def test_stop_grad_decides_whether_the_diffusion_loss_reaches_the_history(tiny_data, stop_grad):
    model = make_model(tiny_data, stop_grad=stop_grad)
    model.train()
    batch = first_batch(tiny_data[1])
    history, mask = model.history(batch)
    history = history.detach().requires_grad_(True)  # so the table's gradient can only come through the next item
    x_hat, losses = model.diffusion_training(history, mask, batch["item_id"])
    losses[0].backward()
    grad = lambda tensor: tensor.grad is not None and bool(tensor.grad.abs().sum() > 0)
    assert grad(history) != stop_grad and grad(model.item_embedding.weight) != stop_grad
    assert x_hat.requires_grad != stop_grad


# ---- the running scale of the drift --------------------------------------------------------------

def test_drift_rms_is_set_by_the_first_batch_then_moves_by_one_percent(tiny_data):
    model = make_model(tiny_data, diffusion_scale="rms")
    assert float(model.scale()) == 1.0  # untrained: the unit scale
    mask = torch.tensor([[False, True, True], [True, True, True]])

    def drift(value):  # RMS = value over the real rows; padding rows must not count
        z0 = torch.full((2, 3, 8), float(value))
        z0[~mask] = 100.0
        return z0

    model.train()  # drifts below 1, as real ones are: only an unset scale reads as 1
    assert float(model.scale(drift(0.2), mask)) == pytest.approx(0.2)
    assert float(model.scale(drift(0.4), mask)) == pytest.approx(0.99 * 0.2 + 0.01 * 0.4)
    assert float(model.scale(drift(0.4), mask)) == pytest.approx(0.99 * 0.202 + 0.01 * 0.4)
    model.eval()  # evaluation reads the scale and never moves it
    assert float(model.scale(drift(50.0), mask)) == pytest.approx(0.99 * 0.202 + 0.01 * 0.4)
    assert float(model.drift_rms) == pytest.approx(0.99 * 0.202 + 0.01 * 0.4)


# ---- input tokens --------------------------------------------------------------------------------

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
            [(model.category_embedding, model.item_categories[1:].unique())] if category_field else []):
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


# ---- mixed attention: which rows feed which part -------------------------------------------------

def record_calls(module):
    """Record the arguments of every call of ``module`` (its forward still runs)."""
    calls, forward = [], module.forward
    module.forward = lambda *args: calls.append(args) or forward(*args)
    return calls


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

    (session, session_mask), = session_calls
    torch.testing.assert_close(session, torch.cat([history[:, -k:], x_hat[:, None]], dim=1))
    assert session_mask.tolist() == [[True] * (k + 1)] * 2
    (query, older, older_mask), = target_calls
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
    (session, session_mask), = session_calls
    torch.testing.assert_close(session, torch.cat([history[:, -k:], x_hat[:, None]], dim=1))
    assert session_mask.tolist() == [[False] * (k - 2) + [True] * 3]
    (_, older, older_mask), = target_calls
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


def reference_session_encoder(encoder, tokens, pooled, admissible, heads=2):
    """A post-LN Transformer layer written out per head, with an explicit [B, K, K] admissible-key
    pattern, mean-pooled over the ``pooled`` [B, K] rows."""
    outputs = []
    for head in torch.eye(heads).repeat_interleave(tokens.size(-1) // heads, dim=1):  # one head's coordinates
        q, k, v = (layer(tokens)[..., head.bool()] for layer in (encoder.query, encoder.key, encoder.value))
        logits = q @ k.transpose(-1, -2) / q.size(-1) ** 0.5
        outputs.append(logits.masked_fill(~admissible, -1e9).softmax(-1) @ v)
    hidden = encoder.attention_norm(tokens + encoder.out(torch.cat(outputs, dim=-1)))
    hidden = encoder.ffn_norm(hidden + encoder.ffn(hidden))
    return masked_mean(hidden, pooled)


@pytest.mark.parametrize("mask_pads", [True, False])
@pytest.mark.parametrize("mask_diag", [True, False])
def test_session_attention_pattern_with_the_diagonal_mask_on_and_off(mask_diag, mask_pads):
    torch.manual_seed(0)
    encoder = SessionEncoder(8, n_heads=2, ffn_hidden=[8], mask_diag=mask_diag, mask_pads=mask_pads)
    tokens = torch.randn(2, 4, 8)
    mask = torch.tensor([[True] * 4, [False, False, True, True]])
    keys = mask[:, None, :].expand(2, 4, 4) if mask_pads else torch.ones(2, 4, 4, dtype=torch.bool)
    pooled = mask if mask_pads else torch.ones_like(mask)  # off: the official code pools the pads too
    off_diagonal = ~torch.eye(4, dtype=torch.bool)
    expected = reference_session_encoder(encoder, tokens, pooled, keys & off_diagonal if mask_diag else keys)
    torch.testing.assert_close(encoder(tokens, mask), expected)
    other = reference_session_encoder(encoder, tokens, pooled, keys if mask_diag else keys & off_diagonal)
    assert not torch.allclose(expected, other), "the two patterns must give different vectors here"


def test_a_lonely_token_attends_to_itself_under_the_diagonal_mask():
    torch.manual_seed(0)
    encoder = SessionEncoder(8, n_heads=2, ffn_hidden=[8], mask_diag=True)
    tokens = torch.randn(1, 3, 8)
    mask = torch.tensor([[False, False, True]])  # one real item and no x̂: nothing else to attend to
    admissible = torch.tensor([[False, False, True]] * 3)
    admissible[2, 2] = True
    torch.testing.assert_close(encoder(tokens, mask), reference_session_encoder(encoder, tokens, mask, admissible))


def test_the_session_layer_is_bias_free_attention_then_linear_elu_layernorm_per_ffn_width():
    """The layer of docs/T2DIFF.md §11 (official code): bias-free q/k/v/out, and each FFN step Linear (no bias), ELU, LayerNorm."""
    default = SessionEncoder(6)
    assert (default.n_heads, default.mask_diag, default.mask_pads) == (2, True, True)
    assert default.attention_norm.eps == default.ffn_norm.eps == 1e-8
    encoder = SessionEncoder(6, ffn_hidden=(5, 4), eps=1e-6)
    for projection in (encoder.query, encoder.key, encoder.value, encoder.out):
        assert projection.bias is None and projection.weight.shape == (6, 6)
    assert encoder.attention_norm.eps == encoder.ffn_norm.eps == 1e-6
    assert [[type(m) for m in step] for step in encoder.ffn] == [[torch.nn.Linear, torch.nn.ELU, torch.nn.LayerNorm]] * 3
    assert [(step[0].in_features, step[0].out_features, step[0].bias, step[2].normalized_shape, step[2].eps)
            for step in encoder.ffn] == [(6, 5, None, (5,), 1e-6), (5, 4, None, (4,), 1e-6), (4, 6, None, (6,), 1e-6)]


def test_target_attention_weights_are_a_softmax_over_the_real_older_rows_only():
    torch.manual_seed(0)
    attention = TargetAttention(8)
    query, history = torch.randn(2, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[False, True, False, True, True], [False] * 5])  # the second user has no older history
    real = history[:1, mask[0]]
    q = query[:1].unsqueeze(1).expand_as(real)
    logits = attention.score(torch.cat([q, real, q - real, q * real], dim=-1)).squeeze(-1)
    expected = torch.cat([(logits.softmax(-1).unsqueeze(-1) * real).sum(1), torch.zeros(1, 8)])
    torch.testing.assert_close(attention(query, history, mask), expected, rtol=1e-5, atol=1e-6)


# ---- the reverse chain at inference --------------------------------------------------------------

def test_the_chain_runs_in_diffusion_units_and_x_hat_comes_back_in_token_units(tiny_data):
    """A denoiser that returns its (scaled) condition predicts the drift x_L/scale; x̂ = x_L + scale·x_L/scale."""
    model = make_model(tiny_data, diffusion_scale="rms")
    model.eval()
    model.drift_rms.fill_(2.0)
    model.denoiser.forward = lambda z_s, condition, *args, **kwargs: condition
    history = torch.randn(3, 12, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.sample_generated_item(history), 2 * history[:, -1])


@pytest.mark.parametrize("sampler,infer_steps,calls", [("ddim", 1, 1), ("ddim", 3, 3), ("ddpm", None, 4)])
def test_each_sampler_makes_its_number_of_denoiser_calls(tiny_data, sampler, infer_steps, calls):
    model = make_model(tiny_data, sampler=sampler, infer_steps=infer_steps, ddim_eta=1.0)  # n_steps = 4
    model.eval()
    steps = record_calls(model.denoiser)
    with torch.no_grad():
        x_hat = model.sample_generated_item(torch.randn(2, 12, 8))
    assert len(steps) == calls and [int(call[2][0]) for call in steps][0] == model.n_steps  # from pure noise
    assert torch.isfinite(x_hat).all()
    if sampler == "ddim" and calls > 1:  # ddim_eta = 1 draws fresh noise between steps, unlike the deterministic chain
        history = torch.randn(2, 12, 8)
        deterministic = make_model(tiny_data, sampler=sampler, infer_steps=infer_steps, ddim_eta=0.0)
        assert not torch.allclose(chain_x_hat(model, history), chain_x_hat(deterministic, history))


# ---- the tower's losses --------------------------------------------------------------------------

def test_bpr_is_the_log_sigmoid_of_the_positive_minus_the_negative_score(tiny_data):
    model = make_model(tiny_data, loss_type="BPR", train_neg_sample_args={"distribution": "uniform", "sample_num": 1})
    user = torch.randn(3, 16)
    positive, negative = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    items = model.item_vectors()
    expected = -torch.nn.functional.logsigmoid((user * items[positive]).sum(-1) - (user * items[negative]).sum(-1)).mean()
    loss = model.tower_loss(user, {model.POS_ITEM_ID: positive, model.NEG_ITEM_ID: negative})
    torch.testing.assert_close(loss, expected)


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
    expected = [torch.logsumexp(torch.cat([user[row] @ items[[target]].t(), user[row] @ items[negatives[negatives != target]].t()]), 0)
                - user[row] @ items[target] for row, target in enumerate(targets.tolist())]
    torch.testing.assert_close(loss, torch.stack(expected).mean())


def test_the_item_tower_reads_unclipped_tokens(tiny_data):
    model = make_model(tiny_data, emb_max_norm=0.01)  # far below the initial token norms: every user-side token is clipped
    ids = torch.arange(1, model.n_items)
    raw, clipped = model.tokens(ids, clip=False), model.tokens(ids)
    assert not torch.allclose(raw, clipped)
    torch.testing.assert_close(model.item_vectors(ids), model.item_tower(raw))


def test_the_target_attention_score_is_linear_elu_layernorm_linear_without_biases(tiny_data):
    model = make_model(tiny_data, layer_norm_eps=1e-6, att_hidden=12)
    first, act, norm, last = model.target_attention.score
    assert isinstance(act, torch.nn.ELU) and isinstance(norm, torch.nn.LayerNorm) and norm.eps == 1e-6
    assert (first.in_features, first.out_features, last.in_features, last.out_features) == (4 * model.embedding_size, 12, 12, 1)
    assert first.bias is None and last.bias is None
    assert TargetAttention(8).score[2].eps == 1e-8 and TargetAttention(8).score[0].out_features == 8  # defaults: as T2Diff's


def test_switching_the_sampler_keeps_ddim_deterministic_unless_told(tiny_data):
    model = make_model(tiny_data, ddim_eta=0.5)
    assert model.ddim_eta == 0.5
    model.set_sampler("ddim", 2)
    assert (model.sampler, model.infer_steps, model.ddim_eta) == ("ddim", 2, 0.0)
    model.set_sampler("ddpm")
    assert model.infer_steps == model.n_steps


# ---- the knobs reach their parts -----------------------------------------------------------------

def test_every_architecture_knob_reaches_its_part(tiny_data):
    """The layout of docs/T2DIFF.md §6-§12, built from non-default knobs (d = 8): a knob read under the wrong key or dropped
    on the way to its module would otherwise leave the module at its own default."""
    from recbole_t2diff.model.diffusion import GaussianDiffusion

    model = make_model(tiny_data, beta_schedule="linear", beta_a=0.03, beta_b=0.02, reverse_coef="official", unet_levels=2,
                       unet_out_proj=True, session_ffn_hidden=[5, 6], mask_diag=False, mask_pads=False, layer_norm_eps=1e-6,
                       use_user_ffn=True, xhat_loss="ce", initializer_range=0.05)
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
