"""The knobs that let the diffusion module carry signal (issue: x̂ ≈ x_L), and the copy-last control."""
import pytest
import torch
import torch.nn.functional as F

from recbole_t2diff.errors import UsageError
from recbole_t2diff.model.unet import Denoiser

from conftest import first_batch, make_model

SIGNAL = {"denoiser_next_slot": True, "diff_loss_positions": "last", "step_conditioning": "film", "diffusion_scale": "rms"}


def test_next_slot_puts_the_next_items_drift_on_a_learned_query_row():
    torch.manual_seed(0)
    denoiser = Denoiser(4, n_steps=10, levels=2, mult=[1, 2], next_slot=True)
    with torch.no_grad():
        denoiser.slot.copy_(torch.arange(1.0, 5.0))
    seen = []
    unet = denoiser.unet.forward
    denoiser.unet.forward = lambda u, *rest: seen.append(u) or unet(u, *rest)
    z_s, condition = torch.randn(3, 6, 4), torch.randn(3, 6, 4)
    out = denoiser(z_s, condition, torch.tensor([1, 5, 10]))
    u = seen[0] - denoiser.step_scale * denoiser.steps[torch.tensor([1, 5, 10])][:, None, :]
    assert out.shape == (3, 6, 4) and u.shape == (3, 7, 8)
    # drift j sits on the row of the item it leads to; the last row's condition is the query, not x_L
    torch.testing.assert_close(u[:, 1:, :4], z_s)
    torch.testing.assert_close(u[:, 0, :4], torch.zeros(3, 4))
    torch.testing.assert_close(u[:, :6, 4:], condition)
    torch.testing.assert_close(u[:, 6, 4:], torch.arange(1.0, 5.0).expand(3, 4))


def test_the_official_layout_reads_the_last_drift_off_a_mirrored_edge():
    """Why the slot exists: without it the U-Net's input ends at x_L, so a neighbour-difference filter reads 0 there."""
    torch.manual_seed(0)
    plain = Denoiser(4, n_steps=10, levels=2, mult=[1, 2])
    seen = []
    unet = plain.unet.forward
    plain.unet.forward = lambda u, *rest: seen.append(u) or unet(u, *rest)
    condition = torch.randn(2, 6, 4)
    plain(torch.randn(2, 6, 4), condition, torch.tensor([3, 3]))
    assert seen[0].shape == (2, 6, 8)
    torch.testing.assert_close(seen[0][:, -1, 4:] - plain.step_scale * plain.steps[3][4:], condition[:, -1])


@pytest.mark.parametrize("step_emb", ["official", "sinusoidal_mlp"])
def test_film_conditions_every_level_on_the_step_and_starts_as_the_plain_unet(step_emb):
    torch.manual_seed(0)
    film = Denoiser(4, n_steps=10, levels=2, mult=[1, 2], step_emb=step_emb, step_conditioning="film")
    z_s, condition = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    # zero-initialised FiLM maps: at first the step changes nothing and no step is added to the input
    plain = film.unet(torch.cat([z_s, condition], -1), torch.zeros(2, 8))
    torch.testing.assert_close(film(z_s, condition, torch.tensor([2, 2])), plain)
    torch.testing.assert_close(film(z_s, condition, torch.tensor([9, 9])), plain)
    for layer in [*film.unet.film_down, *film.unet.film_merge]:
        torch.nn.init.normal_(layer.weight, std=0.5)
    early, late = film(z_s, condition, torch.tensor([1, 1])), film(z_s, condition, torch.tensor([9, 9]))
    assert (early - late).abs().mean() > 0.05
    # every level is modulated: zeroing one level's map changes the output
    for layer in [film.unet.film_down[1], film.unet.film_merge[0]]:
        saved = layer.weight.detach().clone()
        with torch.no_grad():
            layer.weight.zero_()
        assert not torch.allclose(film(z_s, condition, torch.tensor([9, 9])), late)
        with torch.no_grad():
            layer.weight.copy_(saved)


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


@pytest.mark.parametrize("key, value, message", [
    ("xhat_loss", "bce", "xhat_loss=bce: use one of none, ce"),
    ("train_xhat", "chains", "train_xhat=chains: use one of one_step, chain"),
    ("step_conditioning", "add", "step_conditioning=add: use one of input, film"),
    ("lambda_xhat", -1, "lambda_xhat=-1: it must be >= 0"),
    ("infer_steps", 9, "infer_steps=9 with sampler=ddim: it must lie in 1..n_steps=4"),
])
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

    settings = {"data_path": tiny_path, "epochs": 1, "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "uni100"},
                "show_progress": False, "embedding_size": 8, "n_heads": 2, "session_len": 3, "MAX_ITEM_LIST_LENGTH": 8,
                "n_steps": 4, "unet_levels": 2, "unet_mult": [1, 2], "session_ffn_hidden": [8], **SIGNAL}
    first = run("T2Diff", "tiny", config_dict=settings, verbose=False)
    second = run("T2Diff", "tiny", config_dict=settings, verbose=False)
    assert first["test_result"] == second["test_result"]
    assert 0 < first["test_result"]["ndcg@10"] < 1


@pytest.mark.parametrize("preset, expected", [
    ("T2Diff-paper.yaml", {"sampler": "ddpm", "infer_steps": None, "diff_loss": "mse", "use_user_ffn": True,
                           "denoiser_next_slot": False, "xhat_loss": "none", "unet_levels": 4}),
    ("T2Diff-official.yaml", {"sampler": "ddpm", "infer_steps": None, "reverse_coef": "official", "embedding_size": 4,
                              "category_field": "genre", "lambda_diff": 0.1, "mask_pads": False, "train_batch_size": 512}),
])
def test_presets_load_and_build(tiny_path, workdir, preset, expected):
    from recbole_t2diff.config import Config, properties_dir
    from recbole_t2diff.quick_start import build_model, prepare

    config = Config(model="T2Diff", dataset="tiny", config_file_list=[str(properties_dir() / "presets" / preset)],
                    config_dict={"data_path": tiny_path})
    for key, value in expected.items():
        assert config[key] == value, key
    _, train, _, _ = prepare(config)
    model = build_model(config, train)
    assert model.sampler == "ddpm" and model.infer_steps == model.n_steps  # the full chain, not one DDIM step


def test_the_fast_preset_is_the_copy_control_with_positions_and_no_unet(tiny_path, workdir):
    from recbole_t2diff.config import Config, properties_dir
    from recbole_t2diff.quick_start import build_model, prepare

    config = Config(model="T2Diff", dataset="tiny", config_file_list=[str(properties_dir() / "presets" / "T2Diff-fast.yaml")],
                    config_dict={"data_path": tiny_path})
    _, train, _, _ = prepare(config)
    model = build_model(config, train)
    assert model.x_hat_source == "copy_last" and not model.denoises and not hasattr(model, "denoiser")
    assert model.position_embedding is not None and model.time_lag == "none"  # the tiny data's time is an order index
