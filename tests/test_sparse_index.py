"""SparCode's sparse inverted index (sparse_index.py, docs/SPARCODE.md §10, §12): exact at threshold 0, pruning and
posting caps as documented, saving and loading (never unpickling), staleness, and score_mode: index giving RecBole's metrics.
"""

import io
import json
import os
import zipfile

import numpy as np
import pytest
import torch

from recbole_t2diff.errors import UsageError
from recbole_t2diff.quick_start import make_trainer
from recbole_t2diff.sparse_index import SparseIndex, top_items

from helpers import RunsCommand, make_model, scores, trained_sparcode, valid_batch


def exact_rows(model, keys):
    with torch.no_grad():
        rows = model.code_scores(model.quantizer.lookup(model.quantizer.codes(keys)))
    rows[:, 0] = 0
    return rows


def test_index_at_threshold_zero_reproduces_exact_scores(sparcode_data):
    model = trained_sparcode(sparcode_data)
    batch = valid_batch(sparcode_data)
    index = SparseIndex.build(model)
    assert index.n_rows == 64 and 0 < index.nnz < 64 * 30, "the ReLU must make the index sparse but not empty"
    exact = scores(model, batch)
    torch.testing.assert_close(index.scores(model, batch)[:, 1:], exact[:, 1:])
    # A key used twice by the same query adds its list twice.
    twice, _ = index.accumulate(model, torch.tensor([[5, 5], [5, 9]]))
    torch.testing.assert_close(twice, torch.stack([2 * exact_rows(model, torch.tensor([5]))[0], exact_rows(model, torch.tensor([5, 9])).sum(0)]))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_cpus_sparse_product_adds_the_posting_lists_as_the_scatter_add_does(sparcode_data, monkeypatch, dtype):
    model = trained_sparcode(sparcode_data)
    index = SparseIndex.build(model, dtype=dtype)
    a, b, c, d = (int(row) for row in np.argsort(-np.diff(index.indptr), kind="stable")[:4])  # rows with postings
    users, rows = torch.tensor([0, 0, 0, 2, 2, 3]), torch.tensor([a, a, b, c, d, b])  # user 1 has no rows, user 0 one twice
    product, scattered = index._sparse_product(users, rows, 4), index._scatter_add(users, rows, 4)
    torch.testing.assert_close(product, scattered)
    assert product[1].abs().sum() == 0 and product[:, 0].abs().sum() == 0 and product[0].abs().sum() > 0
    monkeypatch.setattr(SparseIndex, "_scatter_add", lambda *args: pytest.fail("the CPU sums by the sparse product"))
    torch.testing.assert_close(index.accumulate(model, torch.tensor([[a, a, b], [c, d, b]]))[0][0], product[0])


def test_threshold_and_posting_cap_prune_as_documented(sparcode_data):
    model = trained_sparcode(sparcode_data)
    keys = torch.arange(64)
    rows = exact_rows(model, keys)
    stored = rows[rows > 0].sort().values
    tau = float(stored[len(stored) // 2 : len(stored) // 2 + 2].mean())  # between two stored values: no entry sits on it
    thresholded = SparseIndex.build(model, threshold=tau)
    got, _ = thresholded.accumulate(model, keys[:, None])
    torch.testing.assert_close(got, rows * (rows > tau))
    capped = SparseIndex.build(model, max_postings=3)
    assert capped.posting_lengths().max() <= 3
    full = SparseIndex.build(model)  # pruning the τ = 0 index gives what a fresh build gives
    for fresh, derived in ((thresholded, full.pruned(model, threshold=tau)), (capped, full.pruned(model, max_postings=3))):
        for name in ("indptr", "indices", "values"):
            assert np.array_equal(getattr(fresh, name), getattr(derived, name)), name
        assert fresh.meta == derived.meta
    got, _ = capped.accumulate(model, keys[:, None])
    best = torch.sort(rows[:, 1:], dim=1, descending=True, stable=True)
    for key in range(64):
        kept = best.indices[key, :3][best.values[key, :3] > 0] + 1
        assert set(torch.nonzero(got[key]).flatten().tolist()) == set(kept.tolist())


def test_index_size_save_load_and_stale_weights(sparcode_data, tmp_path):
    model = trained_sparcode(sparcode_data)
    for dtype in ("float32", "float16"):
        index = SparseIndex.build(model, keys="used", dtype=dtype)
        assert index.nbytes() == index.predicted_bytes()
        loaded = SparseIndex.load(index.save(str(tmp_path / dtype)))
        for name in ("indptr", "indices", "values", "keys"):
            assert (getattr(loaded, name) == getattr(index, name)).all() and getattr(loaded, name).dtype == getattr(index, name).dtype
        assert loaded.meta == index.meta
    batch = valid_batch(sparcode_data)
    loaded.scores(model, batch)
    with torch.no_grad():
        model.mlp_tail[-1].bias.add_(0.1)
    with pytest.raises(UsageError, match="stale"):
        loaded.scores(model, batch)


def test_missed_keys_are_computed_or_dropped(sparcode_data):
    model = trained_sparcode(sparcode_data)
    index = SparseIndex.build(model, keys="used")
    stored = set(index.keys.tolist())
    missing = next(key for key in range(64) if key not in stored)
    present = int(index.keys[0])
    queries = torch.tensor([[present, missing], [present, present]])
    computed, misses = index.accumulate(model, queries)
    assert misses == 1
    index.meta["miss"] = "empty"
    dropped, _ = index.accumulate(model, queries)
    torch.testing.assert_close(computed[1], dropped[1])
    torch.testing.assert_close(computed[0] - dropped[0], exact_rows(model, torch.tensor([missing]))[0])
    index.meta["miss"] = "compute"  # scores() of histories whose keys miss: computed with the model
    index.query_keys = lambda model, interaction: queries
    torch.testing.assert_close(index.scores(model, valid_batch(sparcode_data)), computed)


def test_top_items_are_the_best_scores_ties_by_ascending_id_and_never_padding():
    scores = torch.tensor([[9.0, 0.5, 2.0, 2.0, 0.0, 1.0], [9.0, 0.0, 0.0, 3.0, 0.0, 0.0]])  # column 0: padding
    assert top_items(scores, 3).tolist() == [[2, 3, 5], [3, 1, 2]]
    assert top_items(scores, 5).tolist() == [[2, 3, 5, 1, 4], [3, 1, 2, 4, 5]]
    ties = torch.ones(2, 301)  # wide enough that an unstable sort (torch's from ~100 columns) would shuffle the ties
    assert top_items(ties, 50).tolist() == [list(range(1, 51))] * 2


def test_search_returns_the_index_scores_best_first(sparcode_data):
    model, batch = trained_sparcode(sparcode_data), valid_batch(sparcode_data)
    index = SparseIndex.build(model)
    full = index.scores(model, batch)
    found, items = index.search(model, batch)
    assert items.shape == (len(full), 10) and (items > 0).all()
    torch.testing.assert_close(found, full.gather(1, items))
    assert torch.equal(found, full[:, 1:].sort(dim=1, descending=True).values[:, :10])
    assert index.search(model, batch, k=3)[1].tolist() == items[:, :3].tolist()


def test_pruning_keeps_the_dtype_the_keys_and_only_entries_above_the_threshold(sparcode_data):
    model = trained_sparcode(sparcode_data)
    half = SparseIndex.build(model, keys="used", dtype="float16")
    on_an_entry = float(np.median(half.values.astype(np.float32)))  # a stored value: "> threshold" drops it
    pruned = half.pruned(model, threshold=on_an_entry)
    assert pruned.values.dtype == np.float16 and pruned.meta["dtype"] == "float16" and pruned.indptr.dtype == np.int64
    assert np.array_equal(pruned.keys, half.keys) and pruned.nnz == int((half.values.astype(np.float32) > on_an_entry).sum())
    assert half.pruned(model, dtype="float32").values.dtype == np.float32
    # Both rules at once, as a fresh build applies them (in float32: float16 rounding can tie two values a build still tells apart).
    both = SparseIndex.build(model, keys="used", threshold=on_an_entry, max_postings=2)
    derived = SparseIndex.build(model, keys="used").pruned(model, threshold=on_an_entry, max_postings=2)
    for name in ("indptr", "indices", "values", "keys"):
        assert np.array_equal(getattr(both, name), getattr(derived, name)) and getattr(both, name).dtype == getattr(derived, name).dtype, name
    assert both.meta == derived.meta and 0 < derived.nnz < pruned.nnz
    # A threshold a hair below a stored value is that value in float32, as the build compares: pruning agrees.
    full = SparseIndex.build(model)
    below = float(np.nextafter(np.float64(full.values[0]), -np.inf))
    assert below < float(full.values[0]) and np.array_equal(full.pruned(model, threshold=below).values, SparseIndex.build(model, threshold=below).values)


def test_an_index_of_all_keys_saves_into_an_existing_folder_and_loads_without_keys(sparcode_data, tmp_path):
    model = trained_sparcode(sparcode_data)
    index = SparseIndex.build(model)
    assert index.keys is None and index.nbytes() == index.predicted_bytes() == index.nnz * 8 + 8 * (64 + 1)
    loaded = SparseIndex.load(index.save(str(tmp_path)))  # the folder exists already
    assert loaded.keys is None and np.array_equal(loaded.values, index.values) and loaded.meta == index.meta


def test_an_index_file_with_pickled_objects_is_refused_without_unpickling(sparcode_data, tmp_path):
    model = trained_sparcode(sparcode_data)
    folder = SparseIndex.build(model).save(str(tmp_path / "index"))
    marker = tmp_path / "marker"
    arrays = dict(np.load(os.path.join(folder, "index.npz")))
    np.savez(os.path.join(folder, "index.npz"), **{**arrays, "values": np.array([RunsCommand(marker)], dtype=object)})
    with pytest.raises(UsageError, match="pickled objects") as raised:
        SparseIndex.load(folder)
    assert "\n" not in str(raised.value) and not marker.exists()


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"keys": "bogus"}, "keys='bogus': use all"),
        ({"miss": "bogus"}, "miss='bogus': use compute"),
        ({"threshold": -1}, "threshold=-1: give a number >= 0"),
        ({"threshold": float("nan")}, "threshold=nan"),
        ({"threshold": "0.1"}, "threshold='0.1'"),
        ({"max_postings": 0}, "max_postings=0: give an integer >= 1, or None"),
        ({"max_postings": 2.5}, "max_postings=2.5"),
        ({"max_postings": True}, "max_postings=True"),
        ({"dtype": "int8"}, "dtype='int8': use one of float32, float16"),
        ({"block_keys": 0}, "block_keys=0"),
    ],
)
def test_bad_index_settings_are_refused_in_one_line(sparcode_data, settings, message):
    model = trained_sparcode(sparcode_data, steps=1)
    calls = [lambda: SparseIndex.build(model, **settings)]
    if "block_keys" not in settings and "keys" not in settings and "miss" not in settings:
        full = SparseIndex.build(model)
        calls.append(lambda: full.pruned(model, **settings))
    for call in calls:
        with pytest.raises(UsageError) as raised:
            call()
        assert f"invalid sparse index setting {message}" in str(raised.value) and "\n" not in str(raised.value)
    SparseIndex.build(model, threshold=0, max_postings=1, block_keys=1)  # the edges themselves are accepted


def test_an_index_refuses_a_model_without_codes(sparcode_data, tiny_data):
    sparcode = trained_sparcode(sparcode_data, steps=1)
    index = SparseIndex.build(sparcode)
    t2diff = make_model(tiny_data)
    for call in (lambda: SparseIndex.build(t2diff), lambda: index.scores(t2diff, valid_batch(sparcode_data)), lambda: index.pruned(t2diff, threshold=0.1)):
        with pytest.raises(UsageError, match="belongs to a SparCode model, not T2Diff") as raised:
            call()
        assert "\n" not in str(raised.value)
    with pytest.raises(UsageError, match="quantize: true"):
        SparseIndex.build(make_model(sparcode_data, quantize=False))


def damage(folder, what):
    """Break a saved index one way; returns the path to load."""
    meta_path, npz_path = os.path.join(folder, "meta.json"), os.path.join(folder, "index.npz")
    meta = json.load(open(meta_path))
    arrays = dict(np.load(npz_path))
    if what == "missing folder":
        return os.path.join(folder, "absent")
    if what == "a checkpoint file":
        torch.save({"state_dict": {}}, os.path.join(folder, "T2Diff-1.pth"))
        return os.path.join(folder, "T2Diff-1.pth")
    if what == "no meta.json":
        os.remove(meta_path)
    elif what == "meta not JSON":
        open(meta_path, "w").write("{not json")
    elif what == "meta a list":
        json.dump([meta], open(meta_path, "w"))
    elif what == "meta without a field":
        json.dump({k: v for k, v in meta.items() if k != "n_items"}, open(meta_path, "w"))
    elif what == "meta with a bad setting":
        json.dump({**meta, "dtype": "int8"}, open(meta_path, "w"))
    elif what == "meta with a count of items as text":
        json.dump({**meta, "n_items": "31"}, open(meta_path, "w"))
    elif what == "meta with a fingerprint as a number":
        json.dump({**meta, "fingerprint": 7}, open(meta_path, "w"))
    elif what == "garbage array":
        with zipfile.ZipFile(npz_path, "w") as archive:
            for name in ("indptr", "indices", "values", "keys"):
                archive.writestr(f"{name}.npy", b"not an array")
    elif what == "array cut short":
        with zipfile.ZipFile(npz_path, "w") as archive:
            for name, array in arrays.items():
                stored = io.BytesIO()
                np.save(stored, array)
                archive.writestr(f"{name}.npy", stored.getvalue()[:-8] if name == "values" else stored.getvalue())
    elif what == "meta of another format":
        json.dump({**meta, "format": 99}, open(meta_path, "w"))
    elif what == "no index.npz":
        os.remove(npz_path)
    elif what.startswith("truncated"):
        raw = open(npz_path, "rb").read()
        open(npz_path, "wb").write(raw[: {"truncated": len(raw) // 2, "truncated to nothing": 0}[what]])
    elif what == "flipped byte":
        raw = bytearray(open(npz_path, "rb").read())
        raw[len(raw) // 3] ^= 0xFF
        open(npz_path, "wb").write(bytes(raw))
    elif what == "no keys array":
        np.savez(npz_path, **{k: v for k, v in arrays.items() if k != "keys"})
    elif what == "no values array":
        np.savez(npz_path, **{k: v for k, v in arrays.items() if k != "values"})
    elif what == "short indptr":
        np.savez(npz_path, **{**arrays, "indptr": arrays["indptr"][:-1]})
    elif what == "item out of range":
        np.savez(npz_path, **{**arrays, "indices": arrays["indices"] + 1000})
    elif what == "values of another dtype":
        np.savez(npz_path, **{**arrays, "values": arrays["values"].astype(np.float64)})
    elif what == "fewer values":
        np.savez(npz_path, **{**arrays, "values": arrays["values"][:-1]})
    elif what == "unsorted keys":
        np.savez(npz_path, **{**arrays, "keys": arrays["keys"][::-1].copy()})
    return folder


@pytest.mark.parametrize(
    "what,message",
    [
        ("missing folder", "does not exist: give the folder SparseIndex.save wrote"),
        ("a checkpoint file", "is a file: give the folder SparseIndex.save wrote"),
        ("no meta.json", "is not an index's meta.json (no such file)"),
        ("meta not JSON", "is not an index's meta.json (not JSON"),
        ("meta a list", "(a JSON list, not an object)"),
        ("meta without a field", "(no n_items)"),
        ("meta with a bad setting", "dtype='int8'"),
        ("meta with a count of items as text", "(n_items not a positive integer)"),
        ("meta with a fingerprint as a number", "fingerprint not a string"),
        ("garbage array", "indptr is no array"),
        ("array cut short", "cannot be read (EOF: reading array data"),
        ("meta of another format", "has format 99"),
        ("no index.npz", "has meta.json but no index.npz"),
        ("truncated", "it is truncated or damaged"),
        ("truncated to nothing", "it is truncated or damaged"),
        ("flipped byte", "it is truncated or damaged"),
        ("no keys array", "lacks the array(s) keys"),
        ("no values array", "lacks the array(s) values"),
        ("short indptr", "indptr has"),
        ("item out of range", "item indices outside"),
        ("values of another dtype", "values is float64"),
        ("fewer values", "item indices but"),
        ("unsorted keys", "keys are not sorted"),
    ],
)
def test_loading_anything_but_a_saved_index_is_refused_in_one_line(sparcode_data, tmp_path, what, message):
    model = trained_sparcode(sparcode_data, steps=1)
    folder = SparseIndex.build(model, keys="used").save(str(tmp_path / "index"))
    with pytest.raises(UsageError) as raised:
        SparseIndex.load(damage(folder, what))
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_index_scoring_hashes_the_weights_only_when_they_may_have_changed(sparcode_data, monkeypatch):
    import copy

    from recbole_t2diff import sparse_index

    model, batch = trained_sparcode(sparcode_data), valid_batch(sparcode_data)
    model.score_mode = "index"
    hashed = []
    real = sparse_index.fingerprint
    monkeypatch.setattr(sparse_index, "fingerprint", lambda *args: hashed.append(1) or real(*args))
    first = scores(model, batch)  # builds the index: one hash, stored with it
    index = model.sparse_index
    for _ in range(2):
        torch.testing.assert_close(scores(model, batch), first)
    torch.testing.assert_close(index.scores(model, batch), first)
    assert len(hashed) == 1, "weights unchanged since they were hashed are not hashed again"
    with torch.no_grad():
        model.mlp_tail[-1].weight.mul_(1.0)  # written in place (the same values): hashed again, still current
    torch.testing.assert_close(scores(model, batch), first)
    assert len(hashed) == 2 and model.sparse_index is index
    # another model object on the very same tensors (as a new model could land on a freed one's memory): hashed
    index.check(copy.copy(model))
    assert len(hashed) == 3
    twin = copy.deepcopy(model)  # another model with the same weights: hashed, and current
    index.check(twin)
    index.check(twin)
    assert len(hashed) == 4


def test_the_index_is_stale_once_any_part_its_rows_depend_on_changes(sparcode_data):
    """Codebooks, item side, interaction network and bias make the rows; the tokenizer only picks keys."""
    model, batch = trained_sparcode(sparcode_data), valid_batch(sparcode_data)
    index = SparseIndex.build(model)
    for part in ("quantizer", "item_embedding", "item_heads", "query_layer", "item_layer", "mlp_tail", "trm_encoder"):
        name, tensor = next((n, t) for n, t in model.state_dict().items() if n.split(".")[0] == part and t.is_floating_point())
        original = tensor.clone()
        with torch.no_grad():
            tensor.add_(0.5)
        if part == "trm_encoder":
            index.check(model)
        else:
            with pytest.raises(UsageError, match="stale"):
                index.check(model)
        with torch.no_grad():
            tensor.copy_(original)
    index.check(model)
    model.score_bias += 0.5
    with pytest.raises(UsageError, match="stale"):
        index.scores(model, batch)


def test_posting_caps_keep_the_largest_scores_ties_by_ascending_id():
    from recbole_t2diff.sparse_index import _prune

    rows = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5], [0.0, 3.0, 0.0, 1.0, 1.0]])
    indptr, items, values = _prune(rows, 0.0, 2)
    assert indptr.tolist() == [0, 2, 4] and items.tolist() == [1, 2, 1, 3] and values.tolist() == [2.0, 2.0, 3.0, 1.0]
    wide = torch.ones(2, 300)  # ties across a row wide enough for an unstable sort to shuffle them
    assert _prune(wide, 0.0, 5)[1].tolist() == [0, 1, 2, 3, 4] * 2
    indptr, items, _ = _prune(rows, 0.0, 5)  # a cap at the row length keeps every positive entry
    assert indptr.tolist() == [0, 5, 8] and items.tolist() == [0, 1, 2, 3, 4, 1, 3, 4]


def test_score_mode_index_gives_recbole_the_exact_metrics(sparcode_data):
    config, _, _, test = sparcode_data
    model = trained_sparcode(sparcode_data)
    trainer = make_trainer(config, model)
    exact = trainer.evaluate(test, load_best_model=False, show_progress=False)
    model.score_mode = "index"
    assert dict(trainer.evaluate(test, load_best_model=False, show_progress=False)) == dict(exact)
    built = model.sparse_index
    trainer.evaluate(test, load_best_model=False, show_progress=False)
    assert model.sparse_index is built, "an index of unchanged weights is reused"
    model.index_settings = {**model.index_settings, "max_postings": 2, "keys": "used"}  # as the index_* knobs set them
    capped = model.index()
    assert capped is not built and capped.meta["max_postings"] == 2 and capped.meta["keys"] == "used"
    assert capped.posting_lengths().max() <= 2 < built.posting_lengths().max()
