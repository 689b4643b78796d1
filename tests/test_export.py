"""Two-tower export (export.py): the exported vectors reproduce the model's scores and RecBole's metrics for the
split and the overrides asked for, for T2Diff, built-in models and SparCode's dot reduction."""

import json

import numpy as np
import pytest
import torch

from recbole_t2diff.ann import build_index, exact_top_k, recall_ndcg, search
from recbole_t2diff.export import export_embeddings, user_matrix
from recbole_t2diff.quick_start import evaluate_checkpoint, load_data_and_model, run

from helpers import TINY_MODEL, scratch_run


def test_exported_vectors_reproduce_full_sort_scores(trained_t2diff, tmp_path):
    paths, items, users, targets = export_embeddings(trained_t2diff["saved_model_file"], str(tmp_path))
    _, model, _, _, _, test = load_data_and_model(trained_t2diff["saved_model_file"])
    model.eval()
    interaction = next(iter(test))[0]
    with torch.no_grad():
        full = model.full_sort_predict(interaction).numpy()
    np.testing.assert_allclose(users[: len(full)] @ items.T, full, rtol=1e-4, atol=1e-4)
    ids = json.load(open(paths["ids"]))
    assert len(ids["item_tokens"]) == len(items) and ids["item_tokens"][0] == "[PAD]"
    assert np.array_equal(np.load(paths["targets"]), targets) and targets.min() >= 1


def test_exported_metrics_match_recboles_evaluation(trained_t2diff, tmp_path):
    _, items, users, targets = export_embeddings(trained_t2diff["saved_model_file"], str(tmp_path))
    recall, ndcg = recall_ndcg(exact_top_k(items, users, 10), targets, 10)
    assert recall == pytest.approx(trained_t2diff["test_result"]["recall@10"], abs=1e-4)
    assert ndcg == pytest.approx(trained_t2diff["test_result"]["ndcg@10"], abs=1e-4)


def test_export_applies_its_overrides(trained_t2diff, tmp_path):
    """The inference knobs passed to the export reach the exported user vectors."""
    overrides = {"sampler": "ddpm", "infer_steps": None}  # the checkpoint's default is ddim with one step
    _, items, users, _ = export_embeddings(trained_t2diff["saved_model_file"], str(tmp_path / "ddpm"), overrides=overrides)
    _, _, default_users, _ = export_embeddings(trained_t2diff["saved_model_file"], str(tmp_path / "default"))
    _, model, _, _, _, test = load_data_and_model(trained_t2diff["saved_model_file"], overrides)
    expected, _ = user_matrix(model, test)
    np.testing.assert_allclose(users, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(users, default_users, atol=1e-4)  # the sampler changes x̂, hence the user tower
    recall, ndcg = recall_ndcg(exact_top_k(items, users, 10), np.load(tmp_path / "ddpm" / "targets.npy"), 10)
    metrics = evaluate_checkpoint(trained_t2diff["saved_model_file"], "test", overrides)
    assert (recall, ndcg) == (pytest.approx(metrics["recall@10"], abs=1e-4), pytest.approx(metrics["ndcg@10"], abs=1e-4))


def split_targets(loader):
    """The target item of every sequence of a leave-one-out split, in loader order."""
    return torch.cat([batch[0]["item_id"] for batch in loader]).numpy()


def test_export_of_the_valid_split_holds_the_valid_users(trained_t2diff, tmp_path, workdir):
    paths, items, users, targets = export_embeddings(trained_t2diff["saved_model_file"], str(tmp_path), split="valid")
    _, model, _, _, valid, test = load_data_and_model(trained_t2diff["saved_model_file"])
    assert np.array_equal(targets, split_targets(valid))
    assert not np.array_equal(targets, split_targets(test)), "valid and test targets must differ, or the split is not tested"
    model.eval()
    with torch.no_grad():
        first_batch = model.full_sort_predict(next(iter(valid))[0]).numpy()
    np.testing.assert_allclose(users[: len(first_batch)] @ items.T, first_batch, rtol=1e-4, atol=1e-4)
    recall, ndcg = recall_ndcg(exact_top_k(items, users, 10), targets, 10)
    valid_metrics = evaluate_checkpoint(trained_t2diff["saved_model_file"], "valid")
    assert recall == pytest.approx(valid_metrics["recall@10"], abs=1e-4)
    assert ndcg == pytest.approx(valid_metrics["ndcg@10"], abs=1e-4)
    assert '"split": "valid"' in open(paths["ids"]).read()


def test_export_writes_what_it_returns_and_can_write_again(trained_t2diff, tmp_path, workdir):
    for _ in range(2):  # a second export into the same folder overwrites the first
        paths, items, users, targets = export_embeddings(trained_t2diff["saved_model_file"], str(tmp_path))
    assert set(paths) == {"items", "users", "targets", "ids"}
    for name, array, dtype in (("items", items, np.float32), ("users", users, np.float32), ("targets", targets, np.int64)):
        assert paths[name] == str(tmp_path / f"{name}.npy")
        stored = np.load(paths[name])
        assert stored.dtype == dtype and np.array_equal(stored, array)
    ids = json.load(open(paths["ids"]))
    assert paths["ids"] == str(tmp_path / "ids.json")
    assert {key: ids[key] for key in ("model", "dataset", "split")} == {"model": "T2Diff", "dataset": "tiny", "split": "test"}
    assert len(ids["item_tokens"]) == len(items) and ids["item_tokens"][0] == "[PAD]"
    assert set(ids) == {"model", "dataset", "split", "item_tokens", "note"}


def test_a_builtin_model_exports(tiny_path, workdir, tmp_path):
    result = run(
        "SASRec",
        "tiny",
        config_dict={
            "data_path": tiny_path,
            "hidden_size": 8,
            "inner_size": 16,
            "n_layers": 1,
            "n_heads": 1,
            "epochs": 1,
            "show_progress": False,
            "state": "WARNING",
        },
    )
    paths, items, users, targets = export_embeddings(result["saved_model_file"], str(tmp_path / "export"))
    _, model, *_ = load_data_and_model(result["saved_model_file"])
    np.testing.assert_array_equal(items, model.item_embedding.weight.detach().numpy())
    assert users.shape == (len(targets), 8) and len(json.load(open(paths["ids"]))["item_tokens"]) == len(items)


def test_a_builtin_model_exports_its_item_embedding_and_sequence_vectors(tiny_path, tmp_path, workdir):
    result = run(
        "SASRec",
        "tiny",
        config_dict={"data_path": tiny_path, "epochs": 1, "hidden_size": 16, "inner_size": 32, "n_layers": 1, "show_progress": False, "state": "WARNING"},
    )
    _, items, users, targets = export_embeddings(result["saved_model_file"], str(tmp_path), split="valid")
    _, model, _, _, valid, _ = load_data_and_model(result["saved_model_file"])
    torch.testing.assert_close(torch.from_numpy(items), model.item_embedding.weight.detach())
    model.eval()
    batch = next(iter(valid))[0]
    with torch.no_grad():
        scores = model.full_sort_predict(batch).numpy()
    np.testing.assert_allclose(users[: len(scores)] @ items.T, scores, rtol=1e-4, atol=1e-4)
    assert np.array_equal(targets, split_targets(valid))


# SparCode's two-tower reduction on the tiny data (docs/SPARCODE.md §11): quantized tokens, dot interaction, no ReLU.
# A non-zero bias: the constant K_u·b it adds to every score must change no ranking the export serves.
SPARCODE_DOT = {
    "token_size": 8,
    "n_layers": 1,
    "inner_size": 16,
    "n_query_tokens": 2,
    "codebook_size": 8,
    "softmax_negatives": 10,
    "interaction": "dot",
    "score_relu": False,
    "score_bias": -0.5,
}


@pytest.fixture(scope="module")
def sparcode_dot(tiny_path, tmp_path_factory):
    with scratch_run(tmp_path_factory.mktemp("sparcode_dot_run")):
        return run("SparCode", "tiny", config_dict={"data_path": tiny_path, **TINY_MODEL, **SPARCODE_DOT})


def test_sparcode_two_tower_reduction_exports_its_scores(sparcode_dot, tmp_path, workdir):
    _, items, users, targets = export_embeddings(sparcode_dot["saved_model_file"], str(tmp_path))
    _, model, _, _, _, test = load_data_and_model(sparcode_dot["saved_model_file"])
    model.eval()
    interaction = next(iter(test))[0]
    with torch.no_grad():
        full = model.full_sort_predict(interaction).numpy()
        tokens = model.query_values(interaction)
    assert items.shape[1] == users.shape[1] == 8 and len(torch.unique(model.query_keys(interaction))) > 1
    # Σ_k (q̃_k · v_i + b) = (Σ_k q̃_k) · v_i + K_u·b, with q̃ the codewords the model scores with.
    np.testing.assert_allclose(users[: len(full)] @ items.T + 2 * -0.5, full, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(users[: len(full)], tokens.sum(1).numpy(), rtol=1e-6, atol=1e-6)
    # faiss's exact index returns the full-sort top-k, and its metrics are RecBole's.
    found, _ = search(build_index(items, "flat"), users, 10)
    assert np.array_equal(found, exact_top_k(items, users, 10))
    recall, ndcg = recall_ndcg(found, targets, 10)
    assert recall == pytest.approx(sparcode_dot["test_result"]["recall@10"], abs=1e-4)
    assert ndcg == pytest.approx(sparcode_dot["test_result"]["ndcg@10"], abs=1e-4)
