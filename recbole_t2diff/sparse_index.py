"""SparCode's code-keyed sparse inverted index: precomputed cross-interaction scores, served by addition.

A quantized query token is named by a key (its code tuple). For every key x, the index stores the
posting list r_x(i) = ReLU(s(c(x), i) + b) of items i = 1..I with r > ``threshold`` (at most the
best ``max_postings`` of them). Serving tokenizes the history into K_u keys and adds their posting
lists; the interaction network never runs at query time (docs/SPARCODE.md §10-11). With threshold 0, no cap
and no missed keys, index scores equal exact scores up to summation order.

Storage is CSR over rows = keys: ``indptr`` int64 [U+1], ``indices`` int32 [nnz] (item id − 1),
``values`` float32 or float16 [nnz] and, with ``keys: used``, the sorted int64 ``keys`` [U].
``save`` writes them to ``index.npz`` (plain arrays, read back with ``allow_pickle=False``) and the
settings to ``meta.json``. scipy.sparse is not used: it cannot hold float16 values, picks its own
index dtypes (so the bytes stored would not be the ones chosen here), and the batched scatter-add
below runs unchanged on a GPU.

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
import hashlib
import json
import os
import zipfile

import numpy as np
import torch

from recbole_t2diff.errors import UsageError

FORMAT_VERSION = 1
DTYPES = {"float32": np.float32, "float16": np.float16}
KEY_MODES = ("all", "used")
MISS_MODES = ("compute", "empty")
ARRAYS = ("indptr", "indices", "values")
# What the index calls on a model (SparCode's): its code rows, the keys of histories and of the training split, and
# the layout and tensors the rows depend on.
MODEL_METHODS = ("code_row_scores", "query_keys", "training_keys", "code_layout", "code_row_state")
META_FIELDS = ("format", "keys", "miss", "threshold", "max_postings", "dtype", "n_codebooks", "codebook_size",
               "n_query_tokens", "score_bias", "n_items", "fingerprint")


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


def current_index(model):
    """The index of ``model``'s current weights with its ``index_settings`` (what ``score_mode: index`` scores
    with): kept on the model as ``sparse_index`` and rebuilt when stale."""
    settings = model.index_settings
    if model.sparse_index is None or model.sparse_index.meta["fingerprint"] != fingerprint(model, settings):
        model.sparse_index = SparseIndex.build(model, **settings)
    return model.sparse_index


def _refuse(name, value, why):
    raise UsageError(f"invalid sparse index setting {name}={value!r}: {why}")


def _is_number(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def index_settings(keys, miss, threshold, max_postings, dtype):
    """The index knobs in one canonical form (the fingerprint hashes it); a bad one is refused in one line."""
    if keys not in KEY_MODES:
        _refuse("keys", keys, "use all (every code key) or used (the keys the training split tokenizes to)")
    if miss not in MISS_MODES:
        _refuse("miss", miss, "use compute (score a key without a list on the fly) or empty (drop it)")
    if not _is_number(threshold) or not float(threshold) >= 0:  # "not >=" also refuses NaN
        _refuse("threshold", threshold, "give a number >= 0 (0 keeps every positive entry)")
    if max_postings is not None and (not _is_number(max_postings) or max_postings != int(max_postings) or max_postings < 1):
        _refuse("max_postings", max_postings, "give an integer >= 1, or None for no cap")
    if dtype not in DTYPES:
        _refuse("dtype", dtype, f"use one of {', '.join(DTYPES)}")
    return {"keys": keys, "miss": miss, "threshold": float(threshold),
            "max_postings": None if max_postings is None else int(max_postings), "dtype": dtype}


def top_items(scores, k):
    """Item ids [B, k] (1..I) best first, ties broken by ascending id; column 0 (padding) excluded."""
    order = torch.sort(scores[:, 1:], dim=1, descending=True, stable=True).indices[:, :k]
    return order + 1


class SparseIndex:
    """CSR posting lists keyed by code; build from a trained SparCode, save, load and search."""

    def __init__(self, indptr, indices, values, keys, meta):
        self.indptr, self.indices, self.values, self.keys, self.meta = indptr, indices, values, keys, meta

    # ---- building -------------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def build(cls, model, keys="all", miss="compute", threshold=0.0, max_postings=None, dtype="float32", block_keys=None):
        """The index of ``model``'s current weights. ``keys``: ``all`` N^M keys, or ``used``: the
        keys the training split's histories tokenize to (eval mode). ``block_keys`` rows are scored
        at a time (default: as many as ``score_chunk_rows`` pairs allow, at least 1)."""
        _check_model(model)
        settings = index_settings(keys, miss, threshold, max_postings, dtype)
        if block_keys is not None and (not _is_number(block_keys) or block_keys != int(block_keys) or block_keys < 1):
            _refuse("block_keys", block_keys, "give an integer >= 1, or None for as many keys as score_chunk_rows allows")
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
            "format": FORMAT_VERSION, **settings, "n_codebooks": layout["n_codebooks"], "codebook_size": layout["codebook_size"],
            "n_query_tokens": layout["n_query_tokens"], "score_bias": layout["score_bias"], "n_items": layout["n_items"],
            "fingerprint": fingerprint(model, settings),
        }
        return cls(
            np.concatenate(indptr), np.concatenate(indices) if indices else np.zeros(0, np.int32),
            np.concatenate(values) if values else np.zeros(0, DTYPES[dtype]),
            None if used is None else used.cpu().numpy(), meta,
        )

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
        os.makedirs(folder, exist_ok=True)
        arrays = {"indptr": self.indptr, "indices": self.indices, "values": self.values}
        if self.keys is not None:
            arrays["keys"] = self.keys
        np.savez(os.path.join(folder, "index.npz"), **arrays)
        with open(os.path.join(folder, "meta.json"), "w") as f:
            json.dump(self.meta, f, indent=1)
        return folder

    @classmethod
    def load(cls, folder):
        """The index ``save`` wrote to ``folder``; anything else is refused in one line naming the fault."""
        if not os.path.isdir(folder):
            what = "is a file" if os.path.exists(folder) else "does not exist"
            raise UsageError(f"'{folder}' {what}: give the folder SparseIndex.save wrote (index.npz and meta.json), "
                             "e.g. SparseIndex.build(model).save('saved/sparcode_index')")
        meta = _read_meta(os.path.join(folder, "meta.json"))
        path = os.path.join(folder, "index.npz")
        if not os.path.isfile(path):
            raise UsageError(f"'{folder}' has meta.json but no index.npz: rebuild the index with SparseIndex.build(model).save('{folder}')")
        try:
            with np.load(path, allow_pickle=False) as stored:  # an object array would be unpickled: code would run
                lacking = [name for name in ARRAYS + (("keys",) if meta["keys"] == "used" else ()) if name not in stored.files]
                if lacking:
                    raise UsageError(f"'{path}' lacks the array(s) {', '.join(lacking)}: it is incomplete; rebuild it with SparseIndex.build(model)")
                arrays = {name: stored[name] for name in ARRAYS}
                keys = stored["keys"] if meta["keys"] == "used" else None
        except ValueError as err:
            if "allow_pickle" not in str(err):  # numpy's words for an object array; anything else is another fault
                raise UsageError(f"'{path}' cannot be read ({err}): it is damaged; rebuild it with SparseIndex.build(model)") from err
            raise UsageError(f"'{path}' holds pickled objects, not the plain arrays an index is made of; it is not read: "
                             "rebuild it with SparseIndex.build(model)") from err
        except (zipfile.BadZipFile, EOFError, OSError) as err:
            raise UsageError(f"'{path}' cannot be read ({type(err).__name__}: {err}): it is truncated or damaged; "
                             "rebuild it with SparseIndex.build(model)") from err
        _check_arrays(path, meta, arrays, keys)
        return cls(arrays["indptr"], arrays["indices"], arrays["values"], keys, meta)

    # ---- retrieval ------------------------------------------------------------------------------

    def check(self, model):
        _check_model(model)
        settings = {name: self.meta[name] for name in ("keys", "miss", "threshold", "max_postings", "dtype")}
        if self.meta["fingerprint"] != fingerprint(model, settings):
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
        if self.keys is None:
            rows, found = flat, torch.ones_like(flat, dtype=torch.bool)
        else:
            stored = torch.as_tensor(self.keys, device=device)
            rows = torch.searchsorted(stored, flat).clamp(max=max(len(stored) - 1, 0))
            found = stored[rows] == flat if len(stored) else torch.zeros_like(flat, dtype=torch.bool)
        indptr = torch.as_tensor(self.indptr, device=device)
        starts, ends = indptr[rows[found]], indptr[rows[found] + 1]
        lengths = ends - starts
        # Positions of every posting of every found token, without a Python loop.
        offsets = torch.arange(int(lengths.sum()), device=device) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
        positions = torch.repeat_interleave(starts, lengths) + offsets
        items = torch.as_tensor(self.indices, device=device)[positions].long() + 1
        values = torch.as_tensor(self.values, device=device)[positions].float()
        scores = torch.zeros(batch, self.meta["n_items"], device=device)
        scores.index_put_((torch.repeat_interleave(users[found], lengths), items), values, accumulate=True)
        missed = ~found
        if missed.any() and self.meta["miss"] == "compute":  # the rows a fresh build would have stored
            computed = torch.cat(list(model.code_row_scores(flat[missed])))
            scores[:, 1:].index_add_(0, users[missed], computed)
        return scores, int(missed.sum())

    def scores(self, model, interaction):
        """[B, n_items] index scores for ``interaction``'s histories (what ``score_mode: index`` returns)."""
        self.check(model)
        return self.accumulate(model, self.query_keys(model, interaction))[0]

    def search(self, model, interaction, k=10):
        """(scores [B, k], item ids [B, k]) best first; untouched items (score 0) fill a short list by id."""
        scores = self.scores(model, interaction)
        items = top_items(scores, k)
        return scores.gather(1, items), items


def _check_model(model):
    """The index reads a model through SparCode's code-row methods only (SparCode imports this module, not the reverse)."""
    if not all(callable(getattr(model, name, None)) for name in MODEL_METHODS):
        raise UsageError(f"a sparse index belongs to a SparCode model, not {type(model).__name__}: load a SparCode checkpoint "
                         "(two-tower models such as T2Diff export through recbole_t2diff.export and ann.py)")
    if model.code_layout() is None:
        raise UsageError("the sparse index needs a quantized SparCode (quantize: true); quantize: false has no codes to key it by")


def _read_meta(path):
    """meta.json as ``save`` wrote it, or a one-line refusal."""
    def refuse(why):
        raise UsageError(f"'{path}' is not an index's meta.json ({why}): rebuild the index with SparseIndex.build(model).save(folder)")

    if not os.path.isfile(path):
        refuse("no such file")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        refuse(f"not JSON: {err}")
    if not isinstance(meta, dict):
        refuse(f"a JSON {type(meta).__name__}, not an object")
    lacking = [name for name in META_FIELDS if name not in meta]
    if lacking:
        refuse(f"no {', '.join(lacking)}")
    if meta["format"] != FORMAT_VERSION:
        raise UsageError(f"index in '{os.path.dirname(path)}' has format {meta['format']}, this package reads {FORMAT_VERSION}: rebuild it")
    try:
        index_settings(**{name: meta[name] for name in ("keys", "miss", "threshold", "max_postings", "dtype")})
    except UsageError as err:
        refuse(str(err))
    bad = [name for name in ("n_codebooks", "codebook_size", "n_query_tokens", "n_items")
           if not isinstance(meta[name], int) or isinstance(meta[name], bool) or meta[name] < 1]
    if bad:
        refuse(f"{', '.join(bad)} not a positive integer")
    if not _is_number(meta["score_bias"]) or not isinstance(meta["fingerprint"], str):
        refuse("score_bias not a number or fingerprint not a string")
    return meta


def _check_arrays(path, meta, arrays, keys):
    """The CSR arrays agree with each other and with meta.json, so scoring cannot index out of range."""
    indptr, indices, values = arrays["indptr"], arrays["indices"], arrays["values"]
    expected = {"indptr": np.int64, "indices": np.int32, "values": DTYPES[meta["dtype"]], "keys": np.int64}
    faults = [f"{name} is no array" for name, array in (*arrays.items(), ("keys", keys))
              if array is not None and not isinstance(array, np.ndarray)]  # np.load hands back a member without the .npy header as bytes
    faults = faults or [f"{name} is {array.dtype}[{array.ndim}-d], not 1-d {np.dtype(expected[name])}"
                        for name, array in (*arrays.items(), ("keys", keys)) if array is not None and (array.dtype != expected[name] or array.ndim != 1)]
    if not faults:
        n_rows = len(keys) if keys is not None else int(meta["codebook_size"]) ** int(meta["n_codebooks"])
        if len(indptr) != n_rows + 1:
            faults.append(f"indptr has {len(indptr)} entries for {n_rows} keys")
        elif indptr[0] != 0 or (np.diff(indptr) < 0).any() or indptr[-1] != len(indices):
            faults.append("indptr is not 0, non-decreasing, ending at the number of postings")
        if len(values) != len(indices):
            faults.append(f"{len(indices)} item indices but {len(values)} values")
        if len(indices) and (indices.min() < 0 or indices.max() >= int(meta["n_items"]) - 1):
            faults.append(f"item indices outside [0, {int(meta['n_items']) - 1})")
        if keys is not None and len(keys) > 1 and (np.diff(keys) <= 0).any():
            faults.append("keys are not sorted and distinct")
    if faults:
        raise UsageError(f"'{path}' does not hold a consistent index ({'; '.join(faults)}): rebuild it with SparseIndex.build(model)")


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
