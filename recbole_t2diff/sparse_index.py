"""SparCode's code-keyed sparse inverted index: precomputed cross-interaction scores, served by addition.

A quantized query token is named by a key (its code tuple). For every key x, the index stores the
posting list r_x(i) = ReLU(s(c(x), i) + b) of items i = 1..I with r > ``threshold`` (at most the
best ``max_postings`` of them). Serving tokenizes the history into K_u keys and adds their posting
lists; the interaction network never runs at query time (docs/SPARCODE.md §10-11). With threshold 0, no cap
and no missed keys, index scores equal exact scores up to summation order.

Storage is CSR over rows = keys: ``indptr`` int64 [U+1], ``indices`` int32 [nnz] (item id − 1),
``values`` float32 or float16 [nnz] and, with ``keys: used``, the sorted int64 ``keys`` [U].
``save`` writes them to ``index.npz`` (plain arrays, read back with ``allow_pickle=False``; ``index_files.py``) and the
settings to ``meta.json``. scipy.sparse does not store them: it cannot hold float16 values and picks its own index
dtypes (so the bytes stored would not be the ones chosen here). It sums the posting lists on the CPU, where its
sparse product is faster than torch's scatter-add; other devices use the scatter-add.

A fingerprint (sha256 of the weights the rows depend on and of the index settings) is stored with
the index; scoring with a model whose weights have changed raises a one-line ``UsageError``.

The index reads a model only through SparCode's methods named in ``MODEL_METHODS`` (its code rows, the keys of
histories, the layout and tensors the rows depend on) and never imports the model: SparCode imports this module
for ``score_mode: index``.

    from recbole_t2diff.quick_start import load_data_and_model
    from recbole_t2diff.sparse_index import SparseIndex
    config, model, dataset, train, valid, test = load_data_and_model("saved/SparCode-....pth")
    index = SparseIndex.build(model, keys="used", threshold=0.0)
    index.save("saved/sparcode_index")
    index = SparseIndex.load("saved/sparcode_index")
    scores, items = index.search(model, next(iter(test))[0], k=10)   # item ids, best first
"""

import functools
import hashlib
import json
import weakref

import numpy as np
import torch

from recbole_t2diff.errors import UsageError
from recbole_t2diff.index_files import DTYPES, FORMAT_VERSION, index_settings, is_number, read_index_files, refuse_setting, write_index_files
from recbole_t2diff.tensor_state import tensor_state

# What the index calls on a model (SparCode's): its code rows, the keys of histories and of the training split, and
# the layout and tensors the rows depend on.
MODEL_METHODS = ("code_row_scores", "query_keys", "training_keys", "code_layout", "code_row_state")


def fingerprint(model, settings):
    """sha256 of the tensors posting lists depend on (codebooks, item side, interaction network) and
    of the index settings; the tokenizer and query heads are left out, they only choose keys."""
    digest = hashlib.sha256(json.dumps(index_settings(**settings), sort_keys=True).encode())
    layout = model.code_layout()
    digest.update(repr((layout["score_bias"], layout["n_items"])).encode())
    for name, tensor in model.code_row_state():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def weights_state(model):
    """What identifies the current values of what posting lists depend on without reading the tensors: the score bias
    and item count the fingerprint hashes, and each tensor's storage and version (:mod:`recbole_t2diff.tensor_state`)."""
    layout = model.code_layout()
    names, tensors = zip(*model.code_row_state())
    return layout["score_bias"], layout["n_items"], names, tensor_state(tensors)


def current_index(model):
    """The index of ``model``'s current weights with its ``index_settings`` (what ``score_mode: index`` scores
    with): kept on the model as ``sparse_index`` and rebuilt when stale."""
    settings = model.index_settings
    if model.sparse_index is None or not model.sparse_index.built_from(model, settings):
        model.sparse_index = SparseIndex.build(model, **settings)
    return model.sparse_index


def top_items(scores, k):
    """Item ids [B, k] (1..I) best first, ties broken by ascending id; column 0 (padding) excluded."""
    order = torch.sort(scores[:, 1:], dim=1, descending=True, stable=True).indices[:, :k]
    return order + 1


class SparseIndex:
    """CSR posting lists keyed by code; build from a trained SparCode, save, load and search."""

    def __init__(self, indptr, indices, values, keys, meta):
        self.indptr, self.indices, self.values, self.keys, self.meta = indptr, indices, values, keys, meta
        self._matched = None  # (the live model, its weights_state, the settings) the fingerprint last matched

    def built_from(self, model, settings):
        """Whether this index holds ``model``'s current weights with ``settings``. The weights are hashed (the
        fingerprint) only when they may have changed since they last matched: another model object, or a tensor
        written in place or replaced since; a one-user query no longer pays a hash of every weight (a third of it)."""
        state = weights_state(model)
        if self._matched is not None and self._matched[0]() is model and self._matched[1:] == (state, settings):
            return True
        if self.meta["fingerprint"] != fingerprint(model, settings):
            return False
        self._matched = (weakref.ref(model), state, dict(settings))
        return True

    # ---- building -------------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def build(cls, model, keys="all", miss="compute", threshold=0.0, max_postings=None, dtype="float32", block_keys=None):
        """The index of ``model``'s current weights. ``keys``: ``all`` N^M keys, or ``used``: the
        keys the training split's histories tokenize to (eval mode). ``block_keys`` rows are scored
        at a time (default: as many as ``score_chunk_rows`` pairs allow, at least 1)."""
        _check_model(model)
        settings = index_settings(keys, miss, threshold, max_postings, dtype)
        if block_keys is not None and (not is_number(block_keys) or block_keys != int(block_keys) or block_keys < 1):
            refuse_setting("block_keys", block_keys, "give an integer >= 1, or None for as many keys as score_chunk_rows allows")
        was_training = model.training
        model.eval()
        try:
            used = model.training_keys() if keys == "used" else None
            indptr, indices, values = [np.zeros(1, dtype=np.int64)], [], []
            for rows in model.code_row_scores(used, block_keys):
                row_ptr, row_items, row_values = _prune(rows, settings["threshold"], settings["max_postings"])
                indptr.append(row_ptr[1:] + indptr[-1][-1])
                indices.append(row_items)
                values.append(row_values.astype(DTYPES[dtype]))
        finally:
            model.train(was_training)
        layout = model.code_layout()
        meta = {
            "format": FORMAT_VERSION,
            **settings,
            "n_codebooks": layout["n_codebooks"],
            "codebook_size": layout["codebook_size"],
            "n_query_tokens": layout["n_query_tokens"],
            "score_bias": layout["score_bias"],
            "n_items": layout["n_items"],
            "fingerprint": fingerprint(model, settings),
        }
        index = cls(
            np.concatenate(indptr),
            np.concatenate(indices) if indices else np.zeros(0, np.int32),
            np.concatenate(values) if values else np.zeros(0, DTYPES[dtype]),
            None if used is None else used.cpu().numpy(),
            meta,
        )
        index._matched = (weakref.ref(model), weights_state(model), dict(settings))  # the weights its fingerprint hashed
        return index

    def pruned(self, model, threshold=0.0, max_postings=None, dtype=None):
        """A smaller index from this one without re-running the network: entries > ``threshold``, at
        most ``max_postings`` per key (ties by ascending item id), values stored as ``dtype``. Only
        as exact as a fresh build when this index keeps at least as much (lower τ, larger P)."""
        _check_model(model)
        settings = index_settings(self.meta["keys"], self.meta["miss"], threshold, max_postings, dtype or self.meta["dtype"])
        lengths = self.posting_lengths()
        rows = np.repeat(np.arange(self.n_rows), lengths)
        keep = self.values.astype(np.float32) > settings["threshold"]
        if settings["max_postings"] is not None:
            order = np.lexsort((self.indices, -self.values.astype(np.float32), rows))
            rank = np.arange(self.nnz) - self.indptr[rows[order]]
            within = np.zeros(self.nnz, dtype=bool)
            within[order] = rank < settings["max_postings"]
            keep &= within
        counts = np.bincount(rows[keep], minlength=self.n_rows)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        meta = {**self.meta, **settings, "fingerprint": fingerprint(model, settings)}
        return SparseIndex(indptr, self.indices[keep], self.values[keep].astype(DTYPES[settings["dtype"]]), self.keys, meta)

    # ---- size -----------------------------------------------------------------------------------

    @property
    def n_rows(self):
        return len(self.indptr) - 1

    @property
    def nnz(self):
        return len(self.indices)

    def nbytes(self):
        """Bytes of the arrays held: indptr, indices, values (and keys)."""
        return sum(a.nbytes for a in (self.indptr, self.indices, self.values) + ((self.keys,) if self.keys is not None else ()))

    def predicted_bytes(self):
        """The formula of docs/SPARCODE.md §10: nnz·(4 + b_s) + 8(U + 1) (+ 8U with used keys)."""
        value_bytes = np.dtype(DTYPES[self.meta["dtype"]]).itemsize
        return self.nnz * (4 + value_bytes) + 8 * (self.n_rows + 1) + (8 * self.n_rows if self.keys is not None else 0)

    def posting_lengths(self):
        return np.diff(self.indptr)

    # ---- persistence ----------------------------------------------------------------------------

    def save(self, folder):
        arrays = {"indptr": self.indptr, "indices": self.indices, "values": self.values}
        return write_index_files(folder, arrays, self.keys, self.meta)

    @classmethod
    def load(cls, folder):
        """The index ``save`` wrote to ``folder``; anything else is refused in one line naming the fault."""
        arrays, keys, meta = read_index_files(folder)
        return cls(arrays["indptr"], arrays["indices"], arrays["values"], keys, meta)

    # ---- retrieval ------------------------------------------------------------------------------

    def check(self, model):
        _check_model(model)
        settings = {name: self.meta[name] for name in ("keys", "miss", "threshold", "max_postings", "dtype")}
        if not self.built_from(model, settings):
            raise UsageError("the sparse index is stale: it was built from other weights or settings; rebuild it with SparseIndex.build(model)")

    @torch.no_grad()
    def query_keys(self, model, interaction):
        """Keys [B, K_u] of the histories in ``interaction`` (eval mode: no buffer changes)."""
        return model.query_keys(interaction)

    @torch.no_grad()
    def accumulate(self, model, keys):
        """Scores [B, n_items] from query keys [B, K_u]: the sum of their posting lists, column 0 = 0.

        Also returns the number of query tokens whose key has no posting list (``keys: used``): with
        ``miss: compute`` those rows are scored on the fly (exact), with ``empty`` dropped.
        """
        device = keys.device
        batch, n_tokens = keys.shape
        flat = keys.reshape(-1)
        users = torch.arange(batch, device=device).repeat_interleave(n_tokens)
        rows, found = self.rows_of(flat)
        add_postings = self._sparse_product if device.type == "cpu" else self._scatter_add
        scores = add_postings(users[found], rows[found], batch)
        missed = ~found
        if missed.any() and self.meta["miss"] == "compute":  # the rows a fresh build would have stored
            computed = torch.cat(list(model.code_row_scores(flat[missed])))
            scores[:, 1:].index_add_(0, users[missed], computed)
        return scores, int(missed.sum())

    def rows_of(self, keys):
        """(rows, found), both shaped like ``keys``: the posting-list row of each key and whether it has one (with
        ``keys: used`` a key the training split never produced has none; its row is then meaningless)."""
        if self.keys is None:
            return keys, torch.ones_like(keys, dtype=torch.bool)
        stored = torch.as_tensor(self.keys, device=keys.device)
        if not len(stored):
            return torch.zeros_like(keys), torch.zeros_like(keys, dtype=torch.bool)
        rows = torch.searchsorted(stored, keys.contiguous()).clamp(max=len(stored) - 1)
        return rows, stored[rows] == keys

    def _scatter_add(self, users, rows, batch):
        """[batch, n_items] scores: user ``users[t]`` gets the posting list of row ``rows[t]``, gathered and scatter-added
        by torch on the tensors' device (column 0, the padding item, stays 0)."""
        device = rows.device
        indptr = torch.as_tensor(self.indptr, device=device)
        starts, ends = indptr[rows], indptr[rows + 1]
        lengths = ends - starts
        # Positions of every posting of every token, without a Python loop.
        offsets = torch.arange(int(lengths.sum()), device=device) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
        positions = torch.repeat_interleave(starts, lengths) + offsets
        items = torch.as_tensor(self.indices, device=device)[positions].long() + 1
        values = torch.as_tensor(self.values, device=device)[positions].float()
        scores = torch.zeros(batch, self.meta["n_items"], device=device)
        scores.index_put_((torch.repeat_interleave(users, lengths), items), values, accumulate=True)
        return scores

    def _sparse_product(self, users, rows, batch):
        """What :meth:`_scatter_add` computes, as scipy's sparse product C·R on the CPU: C [batch, keys] counts each user's
        rows (a key a user holds twice adds twice), R is the index's CSR. On one thread it took 8-9 ms against the
        scatter-add's 44 for 256 users at an unpruned index's density (0.69), 2.5 against 4 at 0.1, level at 0.01."""
        import scipy.sparse

        counts = scipy.sparse.csr_matrix((np.ones(len(rows), dtype=np.float32), (users.numpy(), rows.numpy())), shape=(batch, self.n_rows))
        scores = torch.zeros(batch, self.meta["n_items"])
        scores[:, 1:] = torch.from_numpy((counts @ self._posting_matrix).toarray())
        return scores

    @functools.cached_property
    def _posting_matrix(self):
        """The posting lists as a float32 scipy CSR matrix [keys, items] (scipy holds no float16), built on the first CPU
        query and kept: an index never changes."""
        import scipy.sparse

        return scipy.sparse.csr_matrix((np.asarray(self.values, dtype=np.float32), self.indices, self.indptr), shape=(self.n_rows, self.meta["n_items"] - 1))

    def scores(self, model, interaction):
        """[B, n_items] index scores for ``interaction``'s histories (what ``score_mode: index`` returns)."""
        self.check(model)
        return self.accumulate(model, self.query_keys(model, interaction))[0]

    def search(self, model, interaction, k=10):
        """(scores [B, k], item ids [B, k]) best first; untouched items (score 0) fill a short list by id."""
        scores = self.scores(model, interaction)
        items = top_items(scores, k)
        return scores.gather(1, items), items


def reads_codes(model):
    """Whether ``model`` offers SparCode's code-row methods (``MODEL_METHODS``), the only way the index reads a model."""
    return all(callable(getattr(model, name, None)) for name in MODEL_METHODS)


def indexable(model):
    """Whether a sparse index can be built from ``model``: a SparCode with codes (quantize: true)."""
    return reads_codes(model) and model.code_layout() is not None


def _check_model(model):
    """:func:`indexable`, or a one-line refusal saying which part is missing (SparCode imports this module, not the reverse)."""
    if not reads_codes(model):
        raise UsageError(
            f"a sparse index belongs to a SparCode model, not {type(model).__name__}: load a SparCode checkpoint "
            "(two-tower models such as T2Diff export through recbole_t2diff.export and ann.py)"
        )
    if model.code_layout() is None:
        raise UsageError("the sparse index needs a quantized SparCode (quantize: true); quantize: false has no codes to key it by")


def _prune(rows, threshold, max_postings):
    """CSR pieces (indptr from 0, item indices = id − 1, values) of the entries > threshold, at most
    ``max_postings`` per row (the largest; ties by ascending item id)."""
    if max_postings is not None and max_postings < rows.size(1):
        order = torch.sort(rows, dim=1, descending=True, stable=True).indices[:, :max_postings]
        capped = torch.zeros_like(rows).scatter_(1, order, rows.gather(1, order))
        rows = capped
    kept = rows > threshold
    counts = kept.sum(1)
    row_ptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    _, columns = kept.nonzero(as_tuple=True)
    return row_ptr.cpu().numpy().astype(np.int64), columns.cpu().numpy().astype(np.int32), rows[kept].float().cpu().numpy()
