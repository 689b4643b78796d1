"""Retrieval over exported vectors (ann.py): the exact index is the full-sort top-k without the padding row,
approximate indexes mostly agree with it, and recall and NDCG by hand."""

import numpy as np
import pytest

from recbole_t2diff.ann import build_index, exact_top_k, recall_ndcg, search
from recbole_t2diff.errors import UsageError


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
