"""T2Diff's wiring: re-alignment, masks, stop-gradients, scoring paths, ablations (docs/T2DIFF.md §3, §9-15)."""
import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from recbole_t2diff.errors import UsageError
from recbole_t2diff.model.attention import SessionEncoder, TargetAttention
from recbole_t2diff.model.t2diff import realign

from conftest import first_batch, make_model, random_ranking_ndcg


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


def scores(model, batch):
    model.eval()  # re-seeds the chain: equal inputs give equal scores
    with torch.no_grad():
        return model.full_sort_predict(batch)


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


def grads(model, loss):
    model.zero_grad()
    loss.backward(retain_graph=True)
    unet = [p.grad for p in model.denoiser.parameters()]
    tower = [p.grad for n, p in model.named_parameters() if not n.startswith("denoiser")]
    nonzero = lambda gs: any(g is not None and g.abs().sum() > 0 for g in gs)  # noqa: E731
    return nonzero(unet), nonzero(tower)


def test_stop_gradients_split_the_two_losses(tiny_data):
    _, train, _, _ = tiny_data
    model = make_model(tiny_data)
    model.train()
    tower_loss, diffusion_loss = model.calculate_loss(first_batch(train))
    assert grads(model, tower_loss) == (False, True)  # the U-Net learns from the diffusion loss only
    assert grads(model, diffusion_loss) == (True, False)  # ... which trains nothing else


def test_without_stop_gradients_the_tower_loss_reaches_the_unet(tiny_data):
    _, train, _, _ = tiny_data
    model = make_model(tiny_data, stop_grad=False)
    tower_loss, diffusion_loss = model.calculate_loss(first_batch(train))
    assert grads(model, tower_loss) == (True, True)
    assert grads(model, diffusion_loss) == (True, True)


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


def test_session_encoder_ignores_padded_tokens():
    torch.manual_seed(0)
    encoder = SessionEncoder(8, n_heads=2, ffn_hidden=[8])
    tokens = torch.randn(3, 5, 8)
    mask = torch.tensor([[False, False, True, True, True], [False] * 4 + [True], [True] * 5])
    changed = tokens.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 8)
    torch.testing.assert_close(encoder(tokens, mask), encoder(changed, mask))


def test_target_attention_ignores_padding_and_is_zero_without_history():
    torch.manual_seed(0)
    attention = TargetAttention(8)
    query, history = torch.randn(2, 8), torch.randn(2, 6, 8)
    mask = torch.tensor([[False, False, False, True, True, True], [False] * 6])
    out = attention(query, history, mask)
    changed = history.clone()
    changed[~mask] = 9.0
    torch.testing.assert_close(out, attention(query, changed, mask))
    assert torch.equal(out[1], torch.zeros(8))
    real = history[:1, 3:]  # the first user's real rows: the softmax runs over these only
    q = query[:1].unsqueeze(1).expand_as(real)
    logits = attention.score(torch.cat([q, real, q - real, q * real], dim=-1)).squeeze(-1)
    torch.testing.assert_close(out[:1], (logits.softmax(-1).unsqueeze(-1) * real).sum(1))


def test_item_tower_is_computed_from_item_tokens_only(tiny_data):
    """Two-tower property: item vectors are a function of the item alone, computed once for all items."""
    model = make_model(tiny_data)
    everything = model.item_vectors()
    assert everything.shape == (model.n_items, 2 * model.embedding_size)
    some = torch.tensor([3, 1, 7])
    torch.testing.assert_close(model.item_vectors(some), everything[some])


def test_sampled_softmax_masks_accidental_hits(tiny_data):
    _, train, _, _ = tiny_data
    model = make_model(tiny_data, softmax_negatives=500)  # far more draws than items: hits are certain
    batch = first_batch(train)
    # Users that score their own target far above every other item: with the hits masked only the
    # positive stands out (loss ~0); unmasked, each of a row's ~17 hits ties with it (loss ~log 18).
    with torch.no_grad():
        loss = model.tower_loss(50 * model.item_vectors(batch[model.POS_ITEM_ID]), batch)
    assert loss < 1e-3


def test_bpr_trains_with_recboles_negatives(tiny_path, workdir):
    from recbole_t2diff.quick_start import run

    from conftest import TINY_MODEL

    result = run("T2Diff", "tiny", config_dict={
        "data_path": tiny_path, **TINY_MODEL, "loss_type": "BPR",
        "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1},
    })
    # It learned the data's order (BPR scored 0.29-0.36 over seeds 1-5), and with the right sign.
    assert result["test_result"]["ndcg@10"] > random_ranking_ndcg(30) + 0.05


def test_target_attention_equals_the_concatenated_form():
    """The per-user factorisation computes exactly the DIN scorer on [h_s, x, h_s - x, h_s ⊙ x]."""
    torch.manual_seed(0)
    attention = TargetAttention(8, mask_pads=False)
    query, history = torch.randn(3, 8), torch.randn(3, 5, 8)
    q = query.unsqueeze(1).expand_as(history)
    logits = attention.score(torch.cat([q, history, q - history, q * history], dim=-1)).squeeze(-1)
    expected = (logits.softmax(-1).unsqueeze(-1) * history).sum(1)
    torch.testing.assert_close(attention(query, history, torch.ones(3, 5, dtype=torch.bool)), expected)


@pytest.mark.parametrize("train_xhat", ["one_step", "chain"])
def test_the_tower_trains_on_the_one_step_estimate_or_on_the_inference_chain(tiny_data, train_xhat):
    _, train, _, _ = tiny_data
    model = make_model(tiny_data, train_xhat=train_xhat, infer_steps=2)
    model.train()
    calls, denoise = [], model.denoiser.forward
    model.denoiser.forward = lambda z, condition, s: calls.append(s.clone()) or denoise(z, condition, s)
    seen = []
    user_vector = model.user_vector
    model.user_vector = lambda history, mask, x_hat, *rest: seen.append(x_hat) or user_vector(history, mask, x_hat, *rest)
    tower_loss, diffusion_loss = model.calculate_loss(first_batch(train))
    if train_xhat == "one_step":  # the paper: x̂ comes from the pass behind the diffusion loss
        assert len(calls) == 1
    else:  # then the inference sampler (DDIM, 2 steps from s = T), without gradients
        assert len(calls) == 3 and calls[1].eq(model.n_steps).all() and calls[2].lt(model.n_steps).all()
        assert not seen[0].requires_grad
    assert grads(model, tower_loss) == (False, True) and grads(model, diffusion_loss) == (True, False)


def test_without_stop_gradients_the_tower_loss_reaches_the_unet_through_the_chain(tiny_data):
    """train_xhat: chain with stop_grad: False trains the denoiser on the x̂ it serves (a no_grad chain reached nothing)."""
    _, train, _, _ = tiny_data
    model = make_model(tiny_data, train_xhat="chain", stop_grad=False, infer_steps=2)
    model.train()
    seen = []
    user_vector = model.user_vector
    model.user_vector = lambda history, mask, x_hat, *rest: seen.append(x_hat) or user_vector(history, mask, x_hat, *rest)
    tower_loss, diffusion_loss = model.calculate_loss(first_batch(train))
    assert seen[0].requires_grad
    assert grads(model, tower_loss) == (True, True)


@pytest.mark.parametrize("diffusion_scale", ["rms", "none"])
def test_diffusion_runs_in_units_of_the_drifts_running_rms(tiny_data, diffusion_scale):
    _, train, _, _ = tiny_data
    model = make_model(tiny_data, diffusion_scale=diffusion_scale)
    model.train()
    clean, add_noise = [], model.diffusion.add_noise
    model.diffusion.add_noise = lambda z0, s, noise: clean.append(z0) or add_noise(z0, s, noise)
    batch = first_batch(train)
    model.calculate_loss(batch)
    history, mask = model.history(batch)
    drift = model.next_sequence(history, model.tokens(batch[model.POS_ITEM_ID]))
    raw_rms = drift[mask].pow(2).mean().sqrt()
    diffused_rms = clean[0][mask].pow(2).mean().sqrt()
    if diffusion_scale == "rms":  # the first batch sets the scale; the denoiser sees a unit-RMS drift
        assert torch.allclose(model.drift_rms, raw_rms) and torch.allclose(diffused_rms, torch.tensor(1.0))
        model.eval()  # evaluation reads the scale and never moves it
        model.full_sort_predict(batch)
        assert torch.allclose(model.drift_rms, raw_rms)
    else:  # the paper's raw drift: d=64 tokens at init are ~0.02 per coordinate
        assert not hasattr(model, "drift_rms") and torch.allclose(diffused_rms, raw_rms) and raw_rms < 0.1


def test_a_gated_x_hat_starts_as_the_copied_last_item_and_the_tower_loss_trains_the_gate(tiny_data):
    _, train, _, _ = tiny_data
    model = make_model(tiny_data, x_hat_gate=True)
    batch = first_batch(train)
    history, mask = model.history(batch)
    x_hat = torch.randn_like(history[:, -1])
    assert float(model.x_hat_gate) == 0.0
    torch.testing.assert_close(model.session_x_hat(history, x_hat), history[:, -1])  # the copy-last control at the start
    with torch.no_grad():
        model.x_hat_gate.fill_(0.25)
    torch.testing.assert_close(model.session_x_hat(history, x_hat), history[:, -1] + 0.25 * (x_hat - history[:, -1]))
    seen = []
    user_vector = model.user_vector
    model.user_vector = lambda history, mask, x_hat, *rest: seen.append(x_hat) or user_vector(history, mask, x_hat, *rest)
    model.train()
    tower_loss, _ = model.calculate_loss(batch)
    tower_loss.backward()
    assert float(model.x_hat_gate.grad.abs()) > 0  # training sets how much of x̂ the tower takes
    with torch.no_grad():
        model.eval()  # re-seeds the chain's noise: the forward's chain and this one draw the same
        model.forward(batch)
        model.eval()
        served = model.inference_x_hat(history)
    torch.testing.assert_close(seen[-1], history[:, -1] + 0.25 * (served - history[:, -1]))  # inference serves the gated x̂ too


def test_no_gate_by_default_and_the_gate_needs_a_generated_x_hat(tiny_data):
    assert make_model(tiny_data).x_hat_gate is None
    with pytest.raises(UsageError, match="x_hat_gate=True: .* needs use_diffusion: True and x_hat_source: diffusion"):
        make_model(tiny_data, x_hat_gate=True, x_hat_source="copy_last")
