"""Export round-trip, exact ANN retrieval, and evaluating a checkpoint with another sampler."""
import json

import numpy as np
import pytest
import torch

from recbole_t2diff.ann import build_index, exact_top_k, recall_ndcg, search
from recbole_t2diff.checkpoint import settings_digest
from recbole_t2diff.errors import UsageError
from recbole_t2diff.export import export_embeddings, user_matrix
from recbole_t2diff.quick_start import evaluate_checkpoint, load_data_and_model, run

from conftest import TINY_MODEL, scratch_run


@pytest.fixture(scope="module")
def trained(tiny_path, tmp_path_factory):
    with scratch_run(tmp_path_factory.mktemp("export_run")):
        return run("T2Diff", "tiny", config_dict={"data_path": tiny_path, **TINY_MODEL})


def test_exported_vectors_reproduce_full_sort_scores(trained, tmp_path):
    paths, items, users, targets = export_embeddings(trained["saved_model_file"], str(tmp_path))
    _, model, _, _, _, test = load_data_and_model(trained["saved_model_file"])
    model.eval()
    interaction = next(iter(test))[0]
    with torch.no_grad():
        full = model.full_sort_predict(interaction).numpy()
    np.testing.assert_allclose(users[: len(full)] @ items.T, full, rtol=1e-4, atol=1e-4)
    ids = json.load(open(paths["ids"]))
    assert len(ids["item_tokens"]) == len(items) and ids["item_tokens"][0] == "[PAD]"
    assert np.array_equal(np.load(paths["targets"]), targets) and targets.min() >= 1


def test_exported_metrics_match_recboles_evaluation(trained, tmp_path):
    _, items, users, targets = export_embeddings(trained["saved_model_file"], str(tmp_path))
    recall, ndcg = recall_ndcg(exact_top_k(items, users, 10), targets, 10)
    assert recall == pytest.approx(trained["test_result"]["recall@10"], abs=1e-4)
    assert ndcg == pytest.approx(trained["test_result"]["ndcg@10"], abs=1e-4)


def test_export_applies_its_overrides(trained, tmp_path):
    """The inference knobs passed to the export reach the exported user vectors (issue 16)."""
    overrides = {"sampler": "ddpm", "infer_steps": None}  # the checkpoint's default is ddim with one step
    _, items, users, _ = export_embeddings(trained["saved_model_file"], str(tmp_path / "ddpm"), overrides=overrides)
    _, _, default_users, _ = export_embeddings(trained["saved_model_file"], str(tmp_path / "default"))
    _, model, _, _, _, test = load_data_and_model(trained["saved_model_file"], overrides)
    expected, _ = user_matrix(model, test)
    np.testing.assert_allclose(users, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(users, default_users, atol=1e-4)  # the sampler changes x̂, hence the user tower
    recall, ndcg = recall_ndcg(exact_top_k(items, users, 10), np.load(tmp_path / "ddpm" / "targets.npy"), 10)
    metrics = evaluate_checkpoint(trained["saved_model_file"], "test", overrides)
    assert (recall, ndcg) == (pytest.approx(metrics["recall@10"], abs=1e-4), pytest.approx(metrics["ndcg@10"], abs=1e-4))


# SparCode's two-tower reduction on the tiny data (docs/SPARCODE.md §11): quantized tokens, dot interaction, no ReLU.
# A non-zero bias: the constant K_u·b it adds to every score must change no ranking the export serves.
SPARCODE_DOT = {"token_size": 8, "n_layers": 1, "inner_size": 16, "n_query_tokens": 2, "codebook_size": 8,
                "softmax_negatives": 10, "interaction": "dot", "score_relu": False, "score_bias": -0.5}


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


def test_flat_index_returns_the_exact_top_k():
    rng = np.random.default_rng(0)
    items, users = rng.normal(size=(200, 16)).astype(np.float32), rng.normal(size=(50, 16)).astype(np.float32)
    exact = exact_top_k(items, users, 10)
    found, qps = search(build_index(items, "flat"), users, 10)
    assert np.array_equal(found, exact) and qps > 0
    assert 0 not in found  # the padding row is never a candidate


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_mostly_agree_with_exact(kind):
    rng = np.random.default_rng(1)
    items, users = rng.normal(size=(500, 16)).astype(np.float32), rng.normal(size=(100, 16)).astype(np.float32)
    exact = exact_top_k(items, users, 10)
    found, _ = search(build_index(items, kind, nprobe=32), users, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])
    assert overlap > 0.9


def test_recall_ndcg_by_hand():
    top = np.array([[3, 5, 7], [1, 2, 4]])
    recall, ndcg = recall_ndcg(top, [5, 9], k=3)
    assert recall == 0.5 and ndcg == pytest.approx(0.5 / np.log2(3))


def test_unknown_index_is_rejected():
    with pytest.raises(UsageError, match="unknown index"):
        build_index(np.zeros((3, 2), dtype=np.float32), "lsh")


def test_a_checkpoint_can_be_evaluated_with_the_few_step_sampler(trained, workdir):
    ddim = evaluate_checkpoint(trained["saved_model_file"], "test", {"sampler": "ddim", "infer_steps": 2})
    assert set(ddim) == set(trained["test_result"])
    again = evaluate_checkpoint(trained["saved_model_file"], "test", {"sampler": "ddim", "infer_steps": 2})
    assert dict(ddim) == dict(again)
    with pytest.raises(UsageError, match="infer_steps=9"):
        evaluate_checkpoint(trained["saved_model_file"], "test", {"sampler": "ddim", "infer_steps": 9})


def test_checkpoints_from_before_a_new_knob_still_load(trained, tmp_path, workdir):
    checkpoint = torch.load(trained["saved_model_file"], weights_only=True)
    for knob in ("sampler", "diffusion_scale"):  # as written by a version without these knobs
        del checkpoint["config"]["settings"][knob]
    checkpoint["settings_sha256"] = settings_digest(checkpoint["config"])  # which signed the settings it had
    old = tmp_path / "old.pth"
    torch.save(checkpoint, old)
    assert dict(evaluate_checkpoint(str(old))) == dict(trained["test_result"])


def test_evaluating_with_several_processes_hands_the_checkpoint_to_each_rank(trained, monkeypatch):
    from recbole_t2diff import quick_start

    calls = []
    monkeypatch.setattr(quick_start, "spawn", lambda *args, **kwargs: calls.append((args, kwargs)) or "gathered")
    path = trained["saved_model_file"]
    assert quick_start.evaluate_checkpoint(path, "valid", {"infer_steps": 2}, nproc=2, port=1234) == "gathered"
    assert quick_start.evaluate_checkpoint(path, nproc=2) == "gathered"
    (function, nproc, settings, config, key), kwargs = calls[0]
    assert (function, nproc, settings, key) == (
        quick_start.evaluate_checkpoint, 2, quick_start.distributed_settings(2, port=1234), "overrides")
    assert config["model"] == "T2Diff" and config["checkpoint_dir"] is not None  # the checkpoint's own config
    assert kwargs == {"model_file": path, "split": "valid", "overrides": {"infer_steps": 2}}
    assert calls[1][0][2]["port"] == "5679" and calls[1][1] == {"model_file": path, "split": "test", "overrides": None}
    assert len(calls) == 2  # one process evaluates in place: no spawn
    assert set(quick_start.evaluate_checkpoint(path, "valid")) >= {"ndcg@10"} and len(calls) == 2
