"""T2Diff's x̂ generators (generator.py, docs/T2DIFF.md §6-§10), value by value: the drift U-Net's x̂ put back
together from the reconstructed row, its diffusion loss, the running scale and the reverse chain; which loss trains which part
(stop-gradients); the gate, the copy-last control, x̂'s cross-entropy and sampled evaluation; the next-item denoiser with guidance.
The maths of the schedules and samplers is in test_diffusion.py, the denoiser networks in test_unet.py.
"""

import pytest
import torch
import torch.nn.functional as F

from recbole_t2diff.errors import UsageError

from helpers import TINY_MODEL, first_batch, make_model, record_calls


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


# ---- the diffusion loss and the running scale of the drift ------------------------------------------


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
        rows = {
            "all": torch.ones_like(mask),
            "valid": torch.cat([mask[:, 1:], torch.ones_like(mask[:, :1])], dim=1),
            "last": torch.zeros_like(mask).index_fill(1, torch.tensor([mask.size(1) - 1]), True),
        }[positions]
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
    # x̂ reads one row of the last estimate: only the last call asks the U-Net for that row alone
    assert [call[3] for call in steps] == [{"rows": None}] * (calls - 1) + [{"rows": 1}]
    assert torch.isfinite(x_hat).all()
    if sampler == "ddim" and calls > 1:  # ddim_eta = 1 draws fresh noise between steps, unlike the deterministic chain
        history = torch.randn(2, 12, 8)
        deterministic = make_model(tiny_data, sampler=sampler, infer_steps=infer_steps, ddim_eta=0.0)
        assert not torch.allclose(chain_x_hat(model, history), chain_x_hat(deterministic, history))


def test_switching_the_sampler_keeps_ddim_deterministic_unless_told(tiny_data):
    model = make_model(tiny_data, ddim_eta=0.5)
    assert model.ddim_eta == 0.5
    model.set_sampler("ddim", 2)
    assert (model.sampler, model.infer_steps, model.ddim_eta) == ("ddim", 2, 0.0)
    model.set_sampler("ddpm")
    assert model.infer_steps == model.n_steps


# ---- which loss trains which part ------------------------------------------------------------------


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


@pytest.mark.parametrize("train_xhat", ["one_step", "chain"])
def test_the_tower_trains_on_the_one_step_estimate_or_on_the_inference_chain(tiny_data, train_xhat):
    _, train, _, _ = tiny_data
    model = make_model(tiny_data, train_xhat=train_xhat, infer_steps=2)
    model.train()
    calls, denoise = [], model.denoiser.forward
    model.denoiser.forward = lambda z, condition, s, **options: calls.append(s.clone()) or denoise(z, condition, s, **options)
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


# ---- the gate, the copy-last control, x̂'s cross-entropy, sampled evaluation -----------------------------


def test_a_gated_x_hat_starts_as_the_copied_last_item_and_the_tower_loss_trains_the_gate(tiny_data):
    _, train, _, _ = tiny_data
    model = make_model(tiny_data, x_hat_gate=True)
    batch = first_batch(train)
    history, mask = model.history(batch)
    x_hat = torch.randn_like(history[:, -1])
    assert model.x_hat_gate.item() == 0.0
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


SIGNAL = {"denoiser_next_slot": True, "diff_loss_positions": "last", "step_conditioning": "film", "diffusion_scale": "rms"}


def test_xhat_ce_is_a_softmax_of_xhat_over_the_item_table_with_padding_excluded(tiny_data):
    _, train, _, _ = tiny_data
    batch = first_batch(train)
    model = make_model(tiny_data, xhat_loss="ce", lambda_xhat=2.0, **SIGNAL)
    model.train()
    estimates = []
    generated_item = model.generated_item
    model.generated_item = lambda history, z0_last: estimates.append(generated_item(history, z0_last)) or estimates[-1]
    torch.manual_seed(3)
    tower, regression, xhat_ce = model.calculate_loss(batch)
    logits = model.xhat_logit_scale.exp() * estimates[0] @ model.tokens(torch.arange(model.n_items)).t()
    logits[:, 0] = -1e9
    torch.testing.assert_close(xhat_ce, 2.0 * F.cross_entropy(logits, batch[model.POS_ITEM_ID]))
    model.zero_grad()
    xhat_ce.backward()
    # it trains the denoiser and, through the table, the item embeddings; never the tower's attention
    assert model.denoiser.slot.grad.abs().sum() > 0 and model.item_embedding.weight.grad.abs().sum() > 0
    assert model.xhat_logit_scale.grad != 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.session_encoder.parameters())


def test_copy_last_feeds_x_l_as_x_hat_without_a_denoiser(tiny_data):
    _, train, valid, _ = tiny_data
    model = make_model(tiny_data, x_hat_source="copy_last")
    assert not hasattr(model, "denoiser") and not any("denoiser" in n for n, _ in model.named_parameters())
    seen = []
    user_vector = model.user_vector
    model.user_vector = lambda history, mask, x_hat, *rest: seen.append((history, x_hat)) or user_vector(history, mask, x_hat, *rest)
    model.train()
    loss = model.calculate_loss(first_batch(train))
    assert loss.dim() == 0  # one loss: nothing to train but the tower
    model.eval()
    with torch.no_grad():
        model.full_sort_predict(first_batch(valid))
    for history, x_hat in seen:
        torch.testing.assert_close(x_hat, history[:, -1])
    assert not seen[0][1].requires_grad  # like a generated x̂ under stop_grad


def test_copy_last_needs_the_x_hat_token(tiny_data):
    with pytest.raises(UsageError, match="x_hat_source=copy_last with use_diffusion=False"):
        make_model(tiny_data, x_hat_source="copy_last", use_diffusion=False)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("xhat_loss", "bce", "xhat_loss=bce: use one of none, ce"),
        ("train_xhat", "chains", "train_xhat=chains: use one of one_step, chain"),
        ("step_conditioning", "add", "step_conditioning=add: use one of input, film"),
        ("lambda_xhat", -1, "lambda_xhat=-1: it must be >= 0"),
        ("infer_steps", 9, "infer_steps=9 with sampler=ddim: it must lie in 1..n_steps=4"),
    ],
)
def test_bad_diffusion_knobs_say_which_setting_is_wrong(tiny_data, key, value, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        make_model(tiny_data, **{key: value})


def test_ddpm_sampler_with_a_step_count_names_the_ddpm_chain(tiny_data):
    with pytest.raises(UsageError, match="infer_steps=2 with sampler=ddpm: the ddpm chain always runs all n_steps=4"):
        make_model(tiny_data, sampler="ddpm", infer_steps=2)


def test_predict_gives_every_row_of_a_user_the_same_x_hat(tiny_data):
    """Sampled evaluation (uni100 ...) scores a user's candidates against one chain, not one chain per row."""
    _, _, valid, _ = tiny_data
    model = make_model(tiny_data, **SIGNAL)
    batch = first_batch(valid)[torch.tensor([0, 0, 1, 0, 1])]
    items = torch.tensor([3, 7, 3, 3, 9])
    batch.interaction[model.ITEM_ID] = items
    model.eval()
    with torch.no_grad():
        scores = model.predict(batch)
        model.eval()
        users = model.forward(first_batch(valid)[torch.tensor([0, 1])])
    assert scores[0] == scores[3]  # the same user and item: the same score
    item_vectors = model.item_vectors(items)
    # one user vector per user, with that user's own chain (users are distinct rows in a full-sort batch)
    torch.testing.assert_close(scores, (users[torch.tensor([0, 0, 1, 0, 1])] * item_vectors).sum(-1))


def test_sampled_evaluation_runs_and_repeats(tiny_path, workdir):
    from recbole_t2diff.quick_start import run

    settings = {
        "data_path": tiny_path,
        "epochs": 1,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "uni100"},
        "show_progress": False,
        "embedding_size": 8,
        "n_heads": 2,
        "session_len": 3,
        "MAX_ITEM_LIST_LENGTH": 8,
        "n_steps": 4,
        "unet_levels": 2,
        "unet_mult": [1, 2],
        "session_ffn_hidden": [8],
        **SIGNAL,
    }
    first = run("T2Diff", "tiny", config_dict=settings, verbose=False)
    second = run("T2Diff", "tiny", config_dict=settings, verbose=False)
    assert first["test_result"] == second["test_result"]
    assert 0 < first["test_result"]["ndcg@10"] < 1


# ---- x_hat_source: next_item, a denoiser of the next item's token alone, conditioned on the tower's encoding -------


def generator_and_tower_grads(model, loss):
    model.zero_grad()
    loss.backward(retain_graph=True)
    generator = [p.grad for n, p in model.named_parameters() if n.startswith(("denoiser", "condition_projection"))]
    tower = [p.grad for n, p in model.named_parameters() if not n.startswith(("denoiser", "condition_projection"))]
    nonzero = lambda gs: any(g is not None and g.abs().sum() > 0 for g in gs)  # noqa: E731
    return nonzero(generator), nonzero(tower)


def test_the_diffusion_loss_trains_the_generator_and_the_tower_loss_the_tower(tiny_data):
    model = make_model(tiny_data, x_hat_source="next_item", train_xhat="chain").train()
    assert not hasattr(model.denoiser, "unet")  # no U-Net: a small MLP over one token
    tower_loss, diffusion_loss = model.calculate_loss(first_batch(tiny_data[1]))
    assert generator_and_tower_grads(model, diffusion_loss) == (True, False)  # the condition's projection included
    assert generator_and_tower_grads(model, tower_loss) == (False, True)


def test_the_denoiser_reads_the_tower_encoding_of_the_history_and_drops_it_at_the_set_rate(tiny_data):
    model = make_model(tiny_data, x_hat_source="next_item", train_xhat="chain", condition_dropout=0.5).train()
    batch = first_batch(tiny_data[1])
    seen, forward = [], model.denoiser.forward
    model.denoiser.forward = lambda x_s, c, s, dropped=None: seen.append((c, dropped)) or forward(x_s, c, s, dropped)
    torch.manual_seed(3)
    model.calculate_loss(batch)
    condition, dropped = seen[0]
    history, mask = model.history(batch)
    tokens, in_session = model.tower_inputs(batch, history, mask)
    model.eval()  # no dropout: the same encoding as in training, which has none here
    torch.testing.assert_close(condition, model.condition_projection(model.user_vector(tokens, mask, None, in_session)))
    assert 0.3 < float(dropped.float().mean()) < 0.7
    model.train()
    model.condition_dropout = 0.0
    seen.clear()
    model.calculate_loss(batch)
    assert not bool(seen[0][1].any())


@pytest.mark.parametrize("weight", [0.0, 2.0])
def test_guidance_mixes_the_conditional_and_the_unconditional_estimate(tiny_data, weight):
    model = make_model(tiny_data, x_hat_source="next_item", train_xhat="chain", guidance_weight=weight, infer_steps=1).eval()
    batch = first_batch(tiny_data[1])
    d = model.embedding_size
    conditional, unconditional = torch.full((d,), 0.5), torch.full((d,), -0.25)

    def fake(x_s, condition, s, dropped=None):
        free = torch.zeros(len(x_s), dtype=torch.bool) if dropped is None else dropped
        return torch.where(free[:, None], unconditional, conditional).expand(len(x_s), d)

    model.denoiser.forward = fake
    with torch.no_grad():
        history, mask = model.history(batch)
        tokens, in_session = model.tower_inputs(batch, history, mask)
        x_hat = model.inference_x_hat(history, model.condition(tokens, mask, in_session))
    # one DDIM step from s = T lands on the estimate itself (the scale is 1 before training measures one)
    torch.testing.assert_close(x_hat, ((1 + weight) * conditional - weight * unconditional).expand_as(x_hat))


def test_a_next_item_t2diff_trains_and_reports_its_x_hat(tiny_path, workdir):
    from recbole_t2diff.quick_start import run

    result = run(
        "T2Diff",
        "tiny",
        config_dict={
            "data_path": tiny_path,
            **TINY_MODEL,
            "epochs": 1,
            "x_hat_source": "next_item",
            "train_xhat": "chain",
            "guidance_weight": 1.0,
            "infer_steps": 2,
            "diffusion_scale": "rms",
        },
        saved=False,
    )
    assert result["xhat_quality"]["xhat_rel_error"] > 0 and 0 <= result["test_result"]["ndcg@10"] <= 1


@pytest.mark.parametrize(
    "knobs, message",
    [
        ({"guidance_weight": -1}, "guidance_weight=-1: it must be >= 0"),
        ({"condition_dropout": 1.0}, "condition_dropout=1.0: it must lie in [0, 1)"),
    ],
)
def test_bad_guidance_knobs_are_refused_in_one_line(tiny_data, knobs, message):
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace(")", r"\)")):
        make_model(tiny_data, x_hat_source="next_item", train_xhat="chain", **knobs)


def test_the_one_step_estimate_is_refused_for_the_next_item_it_would_leak(tiny_data):
    """At a small step the one-step estimate of the next item's token is nearly the token: the tower would read the target."""
    with pytest.raises(UsageError, match="x_hat_source=next_item with train_xhat=one_step: .* set train_xhat: chain"):
        make_model(tiny_data, x_hat_source="next_item")


def test_x_hat_in_the_score_starts_at_zero_and_the_tower_loss_trains_it(tiny_data):
    model = make_model(tiny_data, x_hat_in_score=True, x_hat_source="copy_last").train()
    batch = first_batch(tiny_data[1])
    history, mask = model.history(batch)
    tokens, in_session = model.tower_inputs(batch, history, mask)
    assert model.score_projection.weight.abs().max().item() == 0  # the plain user vector at the start
    with torch.no_grad():
        model.score_projection.weight.normal_()
    model.eval()
    with torch.no_grad():
        user = model.user_vector(tokens, mask, history[:, -1], in_session)
        projection, model.score_projection = model.score_projection, None
        without = model.user_vector(tokens, mask, history[:, -1], in_session)
    torch.testing.assert_close(user, without + projection(history[:, -1]))  # e_u + P·x̂, x̂ the copied x_L here
    model = make_model(tiny_data, x_hat_in_score=True, x_hat_source="copy_last", stop_grad=False).train()
    model.calculate_loss(batch).backward()
    assert float(model.score_projection.weight.grad.abs().sum()) > 0


def test_the_x_hat_cross_entropy_can_be_put_on_the_served_chain(tiny_data):
    model = make_model(tiny_data, x_hat_source="next_item", train_xhat="chain", xhat_loss="ce", xhat_loss_on="served").train()
    batch = first_batch(tiny_data[1])
    served = []
    generate = model.generate
    model.generate = lambda condition, generator=None: served.append(generate(condition, generator)) or served[-1]
    tower_loss, diffusion_loss, xhat_loss = model.calculate_loss(batch)
    assert len(served) == 1 and served[0].requires_grad  # one chain, with gradients into the denoiser
    expected = model.lambda_xhat * model.xhat_cross_entropy(served[0], batch[model.POS_ITEM_ID])
    torch.testing.assert_close(xhat_loss, expected)
    model.zero_grad()
    xhat_loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.denoiser.parameters())


@pytest.mark.parametrize(
    "knobs, message",
    [
        ({"xhat_loss_on": "served", "xhat_loss": "none", "train_xhat": "chain"}, "xhat_loss_on=served with xhat_loss=none"),
        ({"xhat_loss_on": "served", "xhat_loss": "ce", "train_xhat": "one_step"}, "xhat_loss_on=served with xhat_loss=ce, train_xhat=one_step"),
        ({"x_hat_in_score": True, "use_diffusion": False}, "x_hat_in_score=True with use_diffusion=False"),
    ],
)
def test_ranking_aligned_knobs_refuse_what_cannot_work(tiny_data, knobs, message):
    with pytest.raises(UsageError, match=message):
        make_model(tiny_data, **knobs)
