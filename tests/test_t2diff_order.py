"""Order in T2Diff's user tower (position_embedding): without it the mixed attention cannot tell a
session from its permutation; with it every history row carries its distance from the request."""

import pytest
import torch

from recbole_t2diff.errors import UsageError

from helpers import first_batch, make_model


def session_reversed(history, mask, k):
    """Each user's right-aligned history with the real rows of its session (the last ``k``) in reversed order."""
    out = history.clone()
    width = history.size(1)
    for row in range(len(history)):
        real = mask[row].nonzero().squeeze(1)
        real = real[real >= width - k]
        out[row, real] = history[row, real.flip(0)]
    return out


def user_vectors(model, batch, history, mask, x_hat=None):
    """e_u with x̂ the copied last item of ``history`` unless ``x_hat`` is given."""
    tokens, in_session = model.tower_inputs(batch, history, mask)
    return model.user_vector(tokens, mask, history[:, -1] if x_hat is None else x_hat, in_session)


@pytest.mark.parametrize("position_embedding, order_matters", [("none", False), ("learned", True)])
def test_the_user_vector_sees_the_order_of_the_history_only_with_positions(tiny_data, position_embedding, order_matters):
    model = make_model(tiny_data, position_embedding=position_embedding, time_lag="none").eval()
    batch = first_batch(tiny_data[1])
    with torch.no_grad():
        history, mask = model.history(batch)
        users = mask[:, -model.session_len :].sum(1) >= 3  # a reversal of 3 or more items moves some item away from its place
        before = user_vectors(model, batch, history, mask)[users]
        after = user_vectors(model, batch, session_reversed(history, mask, model.session_len), mask, history[:, -1])[users]
    # The x̂ token (the copied last item, as before) is kept, so only the session's order differs.
    moved = (before - after).abs().amax(1)
    if order_matters:
        assert bool((moved > 1e-3).all())
    else:
        assert float(moved.max()) < 1e-5


def test_each_row_is_embedded_by_its_distance_from_the_most_recent_item(tiny_data):
    model = make_model(tiny_data, position_embedding="learned", time_lag="none")
    batch = first_batch(tiny_data[1])
    captured = []
    model.position_embedding.register_forward_hook(lambda module, args, out: captured.append(args[0]))
    history, mask = model.history(batch)
    with torch.no_grad():
        model.position_embedding.weight.normal_()
    positioned, _ = model.tower_inputs(batch, history, mask)
    length = history.size(1)
    assert captured[0].tolist() == list(range(length - 1, -1, -1))  # the most recent item, last, is at distance 0
    assert model.position_embedding.num_embeddings == length  # MAX_ITEM_LIST_LENGTH rows
    torch.testing.assert_close(positioned, history + model.position_embedding(captured[0]) * mask.unsqueeze(-1))
    assert bool((positioned[~mask] == 0).all())  # padding rows stay exactly 0


def test_positions_reach_the_session_and_the_target_attention(tiny_data):
    """Both attentions read the positioned tokens: changing the embedding of a session row or of an older row moves e_u's halves."""
    model = make_model(tiny_data, position_embedding="learned", time_lag="none").eval()
    batch = first_batch(tiny_data[1])
    k, d = model.session_len, model.embedding_size
    with torch.no_grad():
        history, mask = model.history(batch)
        users = mask[:, 0]  # a full window: older history and a full session
        base = user_vectors(model, batch, history, mask)[users]
        model.position_embedding.weight[0] += 1.0  # the most recent item: in the session
        session_moved = user_vectors(model, batch, history, mask)[users]
        model.position_embedding.weight[0] -= 1.0
        model.position_embedding.weight[k + 5] += 1.0  # an older item: in the target attention only
        older_moved = user_vectors(model, batch, history, mask)[users]
    assert bool(users.any())
    assert float((session_moved - base)[:, d:].abs().max()) > 1e-3  # h_s
    assert float((older_moved - base)[:, d:].abs().max()) < 1e-6  # the session does not see older rows
    assert float((older_moved - base)[:, :d].abs().max()) > 1e-3  # h_l


def test_no_position_table_by_default(tiny_data):
    model = make_model(tiny_data)
    assert model.position_embedding is None
    assert not any("position" in name for name in model.state_dict())


def test_an_unknown_position_embedding_is_refused_in_one_line(tiny_data):
    with pytest.raises(UsageError, match="position_embedding=sinusoid: use one of none, learned"):
        make_model(tiny_data, position_embedding="sinusoid")
