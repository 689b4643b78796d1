"""Approximate nearest-neighbour retrieval over exported item vectors with faiss (inner product).

Row 0 of the item matrix is the padding id: it is left out of every index, so returned ids are
rows of the item matrix (1..n_items-1), exactly the candidates RecBole's full ranking uses.
"""

import time

import numpy as np

from recbole_t2diff.errors import UsageError

INDEXES = ("flat", "hnsw", "ivf")


def _faiss():
    try:
        import faiss
    except ImportError as err:
        raise UsageError("ANN retrieval needs faiss: pip install faiss-cpu") from err
    return faiss


def build_index(items, kind="hnsw", hnsw_m=32, ef_search=128, nlist=None, nprobe=16):
    """An inner-product index over ``items[1:]``: ``flat`` (exact), ``hnsw`` or ``ivf``."""
    faiss = _faiss()
    vectors = np.ascontiguousarray(items[1:], dtype=np.float32)
    dim = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
    elif kind == "ivf":
        nlist = nlist or max(1, int(np.sqrt(len(vectors))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(nprobe, nlist)
    else:
        raise UsageError(f"unknown index '{kind}': use one of {', '.join(INDEXES)}")
    index.add(vectors)
    return index


def search(index, users, k):
    """Top-``k`` item rows per user, best first, and the queries per second of the search."""
    queries = np.ascontiguousarray(users, dtype=np.float32)
    start = time.perf_counter()
    _, ids = index.search(queries, k)
    seconds = time.perf_counter() - start
    return ids + 1, len(queries) / max(seconds, 1e-9)


def exact_top_k(items, users, k):
    """Top-``k`` rows of ``users @ items[1:].T`` by brute force (the full-sort ranking)."""
    scores = users @ items[1:].T
    top = np.argpartition(-scores, kth=min(k, scores.shape[1] - 1), axis=1)[:, :k]
    order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, axis=1) + 1


def recall_ndcg(top_ids, targets, k=10):
    """Leave-one-out Recall@k and NDCG@k: one target per user."""
    hits = top_ids[:, :k] == np.asarray(targets)[:, None]
    rank = np.argmax(hits, axis=1)
    found = hits.any(axis=1)
    return float(found.mean()), float((found / np.log2(rank + 2)).mean())
