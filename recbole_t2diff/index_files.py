"""A sparse index's settings and files: the knobs in canonical form, and ``index.npz`` + ``meta.json`` written and read
back, each refused in one line when it cannot be trusted (``sparse_index.py`` builds and serves the index).

``index.npz`` holds plain arrays only and is read with ``allow_pickle=False`` (an object array would be unpickled,
and code would run); ``meta.json`` holds the settings, the code layout and the fingerprint of the weights.
"""

import json
import os
import zipfile

import numpy as np

from recbole_t2diff.errors import UsageError

FORMAT_VERSION = 1
DTYPES = {"float32": np.float32, "float16": np.float16}
KEY_MODES = ("all", "used")
MISS_MODES = ("compute", "empty")
ARRAYS = ("indptr", "indices", "values")
META_FIELDS = (
    "format",
    "keys",
    "miss",
    "threshold",
    "max_postings",
    "dtype",
    "n_codebooks",
    "codebook_size",
    "n_query_tokens",
    "score_bias",
    "n_items",
    "fingerprint",
)


def refuse_setting(name, value, why):
    raise UsageError(f"invalid sparse index setting {name}={value!r}: {why}")


def is_number(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def index_settings(keys, miss, threshold, max_postings, dtype):
    """The index knobs in one canonical form (the fingerprint hashes it); a bad one is refused in one line."""
    if keys not in KEY_MODES:
        refuse_setting("keys", keys, "use all (every code key) or used (the keys the training split tokenizes to)")
    if miss not in MISS_MODES:
        refuse_setting("miss", miss, "use compute (score a key without a list on the fly) or empty (drop it)")
    if not is_number(threshold) or not float(threshold) >= 0:  # "not >=" also refuses NaN
        refuse_setting("threshold", threshold, "give a number >= 0 (0 keeps every positive entry)")
    if max_postings is not None and (not is_number(max_postings) or max_postings != int(max_postings) or max_postings < 1):
        refuse_setting("max_postings", max_postings, "give an integer >= 1, or None for no cap")
    if dtype not in DTYPES:
        refuse_setting("dtype", dtype, f"use one of {', '.join(DTYPES)}")
    return {"keys": keys, "miss": miss, "threshold": float(threshold), "max_postings": None if max_postings is None else int(max_postings), "dtype": dtype}


def write_index_files(folder, arrays, keys, meta):
    """``index.npz`` (the CSR ``arrays``, plus ``keys`` with ``keys: used``) and ``meta.json`` in ``folder``; returns it."""
    os.makedirs(folder, exist_ok=True)
    np.savez(os.path.join(folder, "index.npz"), **arrays, **({} if keys is None else {"keys": keys}))
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return folder


def read_index_files(folder):
    """(CSR arrays, keys or None, meta) of the index ``write_index_files`` wrote to ``folder``; anything else is
    refused in one line naming the fault."""
    if not os.path.isdir(folder):
        what = "is a file" if os.path.exists(folder) else "does not exist"
        raise UsageError(
            f"'{folder}' {what}: give the folder SparseIndex.save wrote (index.npz and meta.json), e.g. SparseIndex.build(model).save('saved/sparcode_index')"
        )
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
        raise UsageError(
            f"'{path}' holds pickled objects, not the plain arrays an index is made of; it is not read: rebuild it with SparseIndex.build(model)"
        ) from err
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        raise UsageError(
            f"'{path}' cannot be read ({type(err).__name__}: {err}): it is truncated or damaged; rebuild it with SparseIndex.build(model)"
        ) from err
    _check_arrays(path, meta, arrays, keys)
    return arrays, keys, meta


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
    bad = [
        name
        for name in ("n_codebooks", "codebook_size", "n_query_tokens", "n_items")
        if not isinstance(meta[name], int) or isinstance(meta[name], bool) or meta[name] < 1
    ]
    if bad:
        refuse(f"{', '.join(bad)} not a positive integer")
    if not is_number(meta["score_bias"]) or not isinstance(meta["fingerprint"], str):
        refuse("score_bias not a number or fingerprint not a string")
    return meta


def _check_arrays(path, meta, arrays, keys):
    """The CSR arrays agree with each other and with meta.json, so scoring cannot index out of range."""
    indptr, indices, values = arrays["indptr"], arrays["indices"], arrays["values"]
    expected = {"indptr": np.int64, "indices": np.int32, "values": DTYPES[meta["dtype"]], "keys": np.int64}
    faults = [
        f"{name} is no array" for name, array in (*arrays.items(), ("keys", keys)) if array is not None and not isinstance(array, np.ndarray)
    ]  # np.load hands back a member without the .npy header as bytes
    faults = faults or [
        f"{name} is {array.dtype}[{array.ndim}-d], not 1-d {np.dtype(expected[name])}"
        for name, array in (*arrays.items(), ("keys", keys))
        if array is not None and (array.dtype != expected[name] or array.ndim != 1)
    ]
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
