"""Sessions cut by time gaps and the time-lag feature (session_split: time_gap, time_lag: bucket)."""

import os

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from recbole_t2diff.errors import UsageError

from helpers import TINY_MODEL, first_batch, make_model, scratch_run, write_tiny_dataset


GAP = 1800.0


def write_timed_dataset(folder, name="timed", n_users=30, n_items=25, seed=1):
    """Users with clock timestamps (seconds): bursts of items minutes apart, bursts hours apart."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    rows = []
    for user in range(1, n_users + 1):
        t = 1_000_000.0 + float(rng.integers(0, 10_000))
        item = int(rng.integers(1, n_items + 1))
        for _ in range(int(rng.integers(5, 25))):
            rows.append(f"{user}\t{item}\t{t}")
            t += float(rng.integers(60, 600)) if rng.random() < 0.7 else float(rng.integers(7200, 90_000))
            item = item % n_items + 1 if rng.random() < 0.8 else int(rng.integers(1, n_items + 1))
    with open(os.path.join(folder, name, f"{name}.inter"), "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n" + "\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def timed_data(tmp_path_factory):
    from recbole_t2diff.config import Config
    from recbole_t2diff.quick_start import prepare

    path = write_timed_dataset(str(tmp_path_factory.mktemp("timed")))
    with scratch_run(tmp_path_factory.mktemp("run")):
        config = Config(model="T2Diff", dataset="timed", config_dict={"data_path": path, **TINY_MODEL, "session_gap": GAP})
        _, train, valid, test = prepare(config)
    return config, train, valid, test, path


def brute_force_session(times, length, k, gap):
    """Right-aligned session mask by walking back from the last item."""
    max_len = len(times)
    mask = [False] * max_len
    real = times[:length]
    j = length - 1
    while j >= 0 and length - j <= k:
        mask[max_len - length + j] = True
        if j == 0 or real[j] - real[j - 1] >= gap:
            break
        j -= 1
    return mask


@pytest.fixture(scope="module")
def time_gap_model(timed_data):
    config, train, *_ = timed_data
    return make_model((config, train, None, None), session_split="time_gap", time_lag="none")


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_time_gap_sessions_match_a_walk_back_from_the_last_item(time_gap_model, data):
    model = time_gap_model
    max_len, k = model.max_seq_length, model.session_len
    rows, times, lengths = [], [], []
    for _ in range(data.draw(st.integers(1, 5))):
        length = data.draw(st.integers(1, max_len))
        steps = data.draw(st.lists(st.sampled_from([10.0, 600.0, GAP - 1, GAP, 5000.0]), min_size=length - 1, max_size=length - 1))
        row = list(np.cumsum([1000.0] + steps))
        times.append(row + [0.0] * (max_len - length))
        lengths.append(length)
        rows.append(brute_force_session(times[-1], length, k, GAP))
    lengths = torch.tensor(lengths)
    interaction = {model.TIME_SEQ: torch.tensor(times), model.ITEM_SEQ_LEN: lengths}
    mask = torch.arange(max_len)[None, :] >= max_len - lengths[:, None]
    _, in_session = model.tower_inputs(interaction, torch.zeros(len(lengths), max_len, model.embedding_size), mask)
    assert in_session.tolist() == rows


def test_a_time_gap_session_spanning_the_last_k_equals_the_last_k_path(timed_data):
    config, train, *_ = timed_data
    model = make_model((config, train, None, None), session_split="time_gap", time_lag="none")
    model.eval()
    batch = first_batch(train)
    history, mask = model.history(batch)
    last_k = torch.zeros_like(mask)
    last_k[:, -model.session_len :] = True
    x_hat = torch.randn(len(mask), model.embedding_size)
    torch.testing.assert_close(model.user_vector(history, mask, x_hat, last_k & mask), model.user_vector(history, mask, x_hat))


def test_target_attention_reads_exactly_the_rows_before_the_session(timed_data):
    config, train, *_ = timed_data
    model = make_model((config, train, None, None), session_split="time_gap", time_lag="none")
    batch = first_batch(train)
    history, mask = model.history(batch)
    _, in_session = model.tower_inputs(batch, history, mask)
    assert (in_session.sum(1) < mask[:, -model.session_len :].sum(1)).any(), "some session must be cut by a gap"
    seen = []
    attention = model.target_attention.forward
    model.target_attention.forward = lambda query, rows, rows_mask: seen.append(rows_mask) or attention(query, rows, rows_mask)
    model.forward(batch)
    assert torch.equal(seen[0], mask & ~in_session)


def test_the_time_lag_reads_the_request_time_but_never_the_target_item(timed_data):
    config, train, valid, _, _ = timed_data
    model = make_model((config, train, None, None), time_lag="bucket", session_split="time_gap")
    with torch.no_grad():
        model.lag_embedding.weight[1:].normal_()  # make every bucket visible in the scores
    batch = first_batch(valid)

    def scores(interaction):
        model.eval()
        with torch.no_grad():
            return model.full_sort_predict(interaction)

    before = scores(batch)
    other_item = batch.copy() if hasattr(batch, "copy") else batch
    other_item.interaction[model.ITEM_ID] = batch[model.ITEM_ID].flip(0)
    torch.testing.assert_close(scores(other_item), before)
    later = other_item
    later.interaction[model.TIME] = batch[model.TIME] + 10 * 86400.0
    assert not torch.allclose(scores(later), before)


def test_padding_rows_get_no_time_lag(timed_data):
    config, train, *_ = timed_data
    model = make_model((config, train, None, None), time_lag="bucket")
    with torch.no_grad():
        model.lag_embedding.weight[1:].normal_()
    batch = first_batch(train)
    history, mask = model.history(batch)
    assert (~mask).any()
    tokens, _ = model.tower_inputs(batch, history, mask)
    assert tokens[~mask].abs().sum() == 0 and (tokens[mask] != history[mask]).any()


def test_time_lag_auto_takes_the_lag_on_clock_time_and_goes_without_on_an_order_index(timed_data, tiny_data):
    timed = timed_data[:4]
    assert timed[0]["time_lag"] == "auto"  # the property file's default
    on_clock = make_model(timed)
    assert on_clock.time_lag == "bucket" and on_clock.lag_embedding is not None
    on_index = make_model(tiny_data)  # tiny's timestamps are 0, 1, 2, ... per user
    assert on_index.time_lag == "none" and on_index.lag_embedding is None
    forced_off = make_model(timed, time_lag="none")
    assert forced_off.time_lag == "none" and forced_off.lag_embedding is None


@pytest.mark.parametrize("knob", [{"session_split": "time_gap"}, {"time_lag": "bucket"}])
def test_time_knobs_refuse_a_timestamp_that_only_counts_interactions(tiny_data, knob):
    ((name, value),) = knob.items()
    with pytest.raises(UsageError, match=f"^{name}: {value} needs clock time, but 'timestamp' only counts each user's interactions"):
        make_model(tiny_data, **knob)


def test_an_order_index_is_recognised_when_no_history_fills_the_window(tmp_path):
    """Only steps between two real items count: with a window longer than every user, each row starts with padding."""
    from recbole_t2diff.config import Config
    from recbole_t2diff.quick_start import build_model, prepare

    path = write_tiny_dataset(str(tmp_path / "data"))
    with scratch_run(tmp_path):
        config = Config(model="T2Diff", dataset="tiny", config_dict={"data_path": path, **TINY_MODEL, "MAX_ITEM_LIST_LENGTH": 500, "time_lag": "bucket"})
        _, train, _, _ = prepare(config)
        assert not bool((train.dataset.inter_feat["item_length"] == 500).any())
        with pytest.raises(UsageError, match="only counts each user's interactions"):
            build_model(config, train)


def test_time_knobs_refuse_normalised_timestamps(timed_data, tmp_path):
    from recbole_t2diff.config import Config
    from recbole_t2diff.quick_start import build_model, prepare

    *_, path = timed_data
    with scratch_run(tmp_path):
        config = Config(model="T2Diff", dataset="timed", config_dict={"data_path": path, **TINY_MODEL, "normalize_all": True, "time_lag": "bucket"})
        _, train, _, _ = prepare(config)
        with pytest.raises(UsageError, match=r"lies in \[0, 1\] \(normalised\): set normalize_all: False"):
            build_model(config, train)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"session_split": "gap"}, "session_split=gap: use one of last_k, time_gap"),
        ({"session_split": "time_gap", "session_gap": 0}, "session_gap=0: give the gap"),
        ({"session_split": "time_gap", "mask_pads": False}, "session_split=time_gap with mask_pads=False"),
        ({"time_lag": "log"}, "time_lag=log: use one of auto, none, bucket"),
    ],
)
def test_bad_time_knobs_say_what_to_do(tiny_data, settings, message):
    with pytest.raises(UsageError, match=message):
        make_model(tiny_data, **settings)


def test_a_run_with_both_time_knobs_trains_and_repeats(timed_data, workdir):
    from recbole_t2diff.quick_start import run

    *_, path = timed_data
    settings = {"data_path": path, **TINY_MODEL, "epochs": 1, "session_split": "time_gap", "session_gap": GAP, "time_lag": "bucket"}
    first = run("T2Diff", "timed", config_dict=settings, verbose=False)
    second = run("T2Diff", "timed", config_dict=settings, verbose=False)
    assert first["test_result"] == second["test_result"]


@pytest.mark.parametrize("stop_grad", [True, False])
def test_training_scores_the_time_gap_session_with_the_copied_last_item(timed_data, stop_grad):
    config, train, *_ = timed_data
    model = make_model((config, train, None, None), session_split="time_gap", time_lag="none", x_hat_source="copy_last", stop_grad=stop_grad)
    model.train()
    batch = first_batch(train)
    seen, user_vector = [], model.user_vector
    model.user_vector = lambda tokens, mask, x_hat, in_session=None: seen.append(x_hat) or user_vector(tokens, mask, x_hat, in_session)
    torch.manual_seed(0)
    loss = model.calculate_loss(batch)
    del model.user_vector
    assert seen[0].requires_grad != stop_grad, "stop_grad detaches the copied x̂"
    torch.manual_seed(0)  # the same dropout draws
    history, mask = model.history(batch)
    tokens, in_session = model.tower_inputs(batch, history, mask)
    assert (in_session != mask).any(), "the batch must hold time-gap sessions shorter than the last k"
    expected = model.tower_loss(model.user_vector(tokens, mask, history[:, -1], in_session), batch)
    torch.testing.assert_close(loss, expected)


def test_the_time_lag_bucket_is_one_plus_log2_of_one_plus_the_minutes(timed_data):
    from recbole_t2diff.model.t2diff import LAG_BUCKETS

    config, train, *_ = timed_data
    model = make_model((config, train, None, None), time_lag="bucket")
    batch = first_batch(train)
    lengths = batch["item_length"]
    row = int(torch.nonzero(lengths >= 6)[0])
    request = float(batch["timestamp"][row])
    # 10^10 s is 2^27 minutes, past the last bucket's start (2^22 min): capped there. The last: logged after the request.
    lags_seconds = torch.tensor([59.0, 0.0, 60.0, 180.0, 10**10, -120.0])
    times = batch["timestamp_list"].clone()
    times[row, :6] = request - lags_seconds
    batch.interaction["timestamp_list"] = times
    captured = []
    lag_embedding = model.lag_embedding
    lag_embedding.register_forward_hook(lambda module, args, out: captured.append(args[0]))
    history, mask = model.history(batch)
    lagged, _ = model.tower_inputs(batch, history, mask)
    buckets = captured[0][row][mask[row]][:6]  # right-aligned: the first 6 real rows of this user
    assert buckets.tolist() == [1, 1, 2, 3, LAG_BUCKETS, 1]
    assert (lag_embedding.num_embeddings, lag_embedding.padding_idx) == (LAG_BUCKETS + 1, 0)  # bucket 0: padding rows only
    torch.testing.assert_close(lagged, history + lag_embedding(captured[0]) * mask.unsqueeze(-1))
