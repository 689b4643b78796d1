"""SparCode's product quantizer (quantizer.py, docs/SPARCODE.md §5): nearest-codeword assignment and keys,
straight-through gradients, EMA codebooks as buffers, dead-code restarts, code statistics, bfloat16 training.
"""

import contextlib
import os
import re

import pytest
import torch
import yaml

from recbole_t2diff.errors import UsageError
from recbole_t2diff.model.quantizer import ProductQuantizer

from helpers import QUIET, REPO, first_batch, make_model, trained_sparcode, valid_batch


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
    model = trained_sparcode(sparcode_data, vq_beta=0.0)  # no commitment term: only straight-through can carry a gradient
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
    assert (model.quantizer.initialised.dtype, model.quantizer.restarts.dtype, model.quantizer.radix.dtype) == (torch.bool, torch.long, torch.long)


def test_the_quantizers_defaults_are_the_property_files():
    knobs = yaml.safe_load(open(os.path.join(REPO, "properties", "model", "SparCode.yaml")))
    quantizer = ProductQuantizer(8, 2, 4)
    assert (quantizer.decay, quantizer.eps, quantizer.dead_code_threshold) == (knobs["ema_decay"], knobs["ema_eps"], knobs["dead_code_threshold"])


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
    model = trained_sparcode(sparcode_data)
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
    assert re.search(
        r"usage \d+%/\d+% of 8 codes per codebook, perplexity [0-9.]+/[0-9.]+, \d+ distinct keys, "
        rf"relative quantization error [0-9.]+, {restarts} restarts",
        line,
    ), line
    assert model.epoch_codes.tokens == 0, "the next epoch starts a new tally"
    caplog.clear()
    with caplog.at_level("INFO"):
        model.train()
        model.eval()
    assert "SparCode codes" not in caplog.text, "an epoch without training batches logs nothing"


def test_the_first_epoch_after_a_reload_logs_its_own_restarts(sparcode_data, caplog):
    # A resumed run loads the quantizer's restart count, every restart before the interruption: the first epoch's
    # line counted all of them as its own (9,926 in one converged run's log).
    trained = make_model(sparcode_data)
    trained.quantizer.restarts.fill_(1000)
    model = make_model(sparcode_data)
    model.load_state_dict(trained.state_dict())
    model.train()
    model.calculate_loss(next(iter(sparcode_data[1])))
    epoch_restarts = int(model.quantizer.restarts) - 1000
    with caplog.at_level("INFO"):
        model.eval()
    line = next(line for line in caplog.text.splitlines() if "SparCode codes in training" in line)
    assert line.endswith(f", {epoch_restarts} restarts"), line


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
    model = trained_sparcode(sparcode_data, steps=1)
    assert bool(model.quantizer.initialised)
    assert (model.quantizer.codewords.norm(dim=-1) > 0).all()


def test_scoring_changes_no_buffer_even_in_training_mode(sparcode_data):
    model = trained_sparcode(sparcode_data)
    batch = valid_batch(sparcode_data)
    before = {name: tensor.clone() for name, tensor in model.named_buffers()}
    model.train()
    with torch.no_grad():
        model.full_sort_predict(batch)
        model.predict(batch)
    for name, tensor in model.named_buffers():
        assert torch.equal(before[name], tensor), name
