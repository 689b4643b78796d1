"""x_hat_source: next_item, the DreamRec-style generator: a denoiser of the next item's token alone,
conditioned on the tower's encoding of the history, with classifier-free guidance."""
import pytest
import torch

from recbole_t2diff.errors import UsageError

from conftest import first_batch, make_model


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
    from conftest import TINY_MODEL
    from recbole_t2diff.quick_start import run

    result = run("T2Diff", "tiny", config_dict={"data_path": tiny_path, **TINY_MODEL, "epochs": 1, "x_hat_source": "next_item",
                                                 "train_xhat": "chain", "guidance_weight": 1.0, "infer_steps": 2, "diffusion_scale": "rms"}, saved=False)
    assert result["xhat_quality"]["xhat_rel_error"] > 0 and 0 <= result["test_result"]["ndcg@10"] <= 1


@pytest.mark.parametrize("knobs, message", [
    ({"guidance_weight": -1}, "guidance_weight=-1: it must be >= 0"),
    ({"condition_dropout": 1.0}, "condition_dropout=1.0: it must lie in [0, 1)"),
])
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
    assert float(model.score_projection.weight.abs().max()) == 0  # the plain user vector at the start
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


@pytest.mark.parametrize("knobs, message", [
    ({"xhat_loss_on": "served", "xhat_loss": "none", "train_xhat": "chain"}, "xhat_loss_on=served with xhat_loss=none"),
    ({"xhat_loss_on": "served", "xhat_loss": "ce", "train_xhat": "one_step"}, "xhat_loss_on=served with xhat_loss=ce, train_xhat=one_step"),
    ({"x_hat_in_score": True, "use_diffusion": False}, "x_hat_in_score=True with use_diffusion=False"),
])
def test_ranking_aligned_knobs_refuse_what_cannot_work(tiny_data, knobs, message):
    with pytest.raises(UsageError, match=message):
        make_model(tiny_data, **knobs)
