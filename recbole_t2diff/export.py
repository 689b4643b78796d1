"""Two-tower export: item matrix and user vectors from a trained checkpoint, ready for an ANN index.

T2Diff scores are inner products ``e_u · e_i``, so the item tower can be computed once and served
from an index while only the user tower runs per request. Built-in RecBole models that score with
``forward(seq, len) @ item_embedding.weight.T`` (SASRec, GRU4Rec, NARM, ...) export the same way, and
so does SparCode's two-tower reduction (``interaction: dot, score_relu: false``: users Σ_k q̃_k, items
v_i; its scores add the constant K_u·score_bias, which changes no ranking). Any other SparCode is
refused: its scores are sums of ReLU'd MLP outputs, served by ``recbole_t2diff.sparse_index``.
"""

import json
import os

import numpy as np
import torch

from recbole_t2diff.errors import UsageError
from recbole_t2diff.quick_start import load_data_and_model


def item_matrix(model):
    """[n_items, D] item vectors; row 0 is the padding id, which is never recommended."""
    with torch.no_grad():
        if hasattr(model, "check_two_tower"):  # SparCode: its two-tower reduction only
            model.check_two_tower()
        if hasattr(model, "item_vectors"):
            return model.item_vectors()
        if hasattr(model, "item_embedding"):  # a Parameter: no_grad does not detach what it returns
            return model.item_embedding.weight.detach()
    raise UsageError(f"{type(model).__name__} has no item tower to export: export supports T2Diff and models scored by item_embedding")


def user_matrix(model, loader):
    """User vectors and targets for every sequence of an evaluation loader, as evaluation sees them.

    ``model.eval()`` first, as RecBole's evaluation does: T2Diff re-seeds its reverse chain there,
    so the vectors are those behind the reported metrics.
    """
    model.eval()
    users, targets = [], []
    with torch.no_grad():
        for interaction, _, _, positive_items in loader:
            interaction = interaction.to(model.device)
            if hasattr(model, "user_vectors"):
                users.append(model.user_vectors(interaction))
            elif hasattr(model, "item_vectors"):
                users.append(model.forward(interaction))
            else:
                users.append(model.forward(interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN]))
            targets.append(positive_items)
    return torch.cat(users), torch.cat(targets)


def export_embeddings(model_file, out_dir, split="test", overrides=None):
    """Write ``items.npy``, ``users.npy``, ``targets.npy`` and ``ids.json`` (raw tokens) to ``out_dir``.

    ``overrides`` change inference knobs of the stored config (e.g. ``{"sampler": "ddim"}``).
    Returns the paths and the arrays.
    """
    config, model, dataset, _, valid, test = load_data_and_model(model_file, overrides)
    loader = {"valid": valid, "test": test}[split]
    items = item_matrix(model).float().cpu().numpy()
    users, targets = (t.cpu().numpy() for t in user_matrix(model, loader))
    if users.ndim != 2 or items.ndim != 2 or users.shape[1] != items.shape[1]:
        raise UsageError(
            f"{config['model']} does not score by the inner product of one user vector and one item vector "
            f"(users {users.shape[1:]}, items {items.shape[1:]}): it has no two-tower export"
        )
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, f"{name}.npy") for name in ("items", "users", "targets")}
    np.save(paths["items"], items)
    np.save(paths["users"], users.astype(np.float32))
    np.save(paths["targets"], targets.astype(np.int64))
    ids = {
        "model": config["model"],
        "dataset": config["dataset"],
        "split": split,
        "item_tokens": dataset.id2token(dataset.iid_field, np.arange(len(items))).tolist(),
        "note": "row i of items.npy is item_tokens[i] (row 0 is padding); targets.npy holds row indices",
    }
    paths["ids"] = os.path.join(out_dir, "ids.json")
    with open(paths["ids"], "w") as f:
        json.dump(ids, f)
    return paths, items, users, targets
