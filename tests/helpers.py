"""Helpers shared by several test files: the tiny dataset and model settings, model builders, one-line error checks,
crafted pickles, SparCode's tiny preset. Fixtures built from them are in conftest.py."""

import contextlib
import math
import os
import pickle
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from recbole.data.interaction import Interaction

from recbole_t2diff.config import Config
from recbole_t2diff.errors import UsageError
from recbole_t2diff.quick_start import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small enough to train in a second, large enough to have users shorter than the session and
# users whose history overflows MAX_ITEM_LIST_LENGTH.
TINY_MODEL = {
    "embedding_size": 8,
    "n_steps": 4,
    "unet_levels": 2,
    "session_ffn_hidden": [8],
    "MAX_ITEM_LIST_LENGTH": 12,
    "session_len": 4,
    "epochs": 2,
    "train_batch_size": 64,
    "eval_batch_size": 64,
    "show_progress": False,
    "state": "WARNING",
}

# The tiny preset of docs/SPARCODE.md §15: d = d_t = 8, one layer, MLP [16, 16], K_u = 2, N = 8 (64 keys), L = 12.
TINY_SPARCODE = {
    "token_size": 8,
    "n_layers": 1,
    "inner_size": 16,
    "dnn_hidden": [16],
    "mlp_hidden": [16, 16],
    "n_query_tokens": 2,
    "codebook_size": 8,
    "softmax_negatives": 10,
}
QUIET = {"hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0, "mlp_dropout": 0.0}  # no dropout: losses recomputable

# A setting value that runs a shell command if anything eval()s it.
CODE = "__import__('os').system('touch {marker}') or 0.002"


def write_tiny_dataset(folder, name="tiny", n_users=40, n_items=30, seed=0):
    """Users walk through items mostly in order (next = previous + 1), so sequences carry signal."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    rows = []
    for user in range(1, n_users + 1):
        length = int(rng.integers(4, 30))
        item = int(rng.integers(1, n_items + 1))
        for t in range(length):
            rows.append(f"{user}\t{item}\t{t}")
            item = item % n_items + 1 if rng.random() < 0.8 else int(rng.integers(1, n_items + 1))
    with open(os.path.join(folder, name, f"{name}.inter"), "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n" + "\n".join(rows) + "\n")
    genres = ["a", "b", "c", "d"]
    with open(os.path.join(folder, name, f"{name}.item"), "w") as f:
        f.write("item_id:token\tgenre:token_seq\n")
        for item in range(1, n_items + 1):
            f.write(f"{item}\t{' '.join(genres[: 1 + item % 3])}\n")
    return folder


def tiny_config(tiny_path, model="T2Diff", **overrides):
    return Config(model=model, dataset="tiny", config_dict={"data_path": tiny_path, **TINY_MODEL, **overrides})


@contextlib.contextmanager
def scratch_run(folder):
    """For fixtures wider than a test: run RecBole in ``folder`` (it writes log/, saved/ and log_tensorboard/ into the cwd)."""
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(cwd)


def make_model(tiny_data, **overrides):
    """A fresh model on the tiny data (or another model's, e.g. ``sparcode_data``), with knobs overridden on a copy of the config."""
    config, train, _, _ = tiny_data
    saved = {key: config[key] for key in overrides}
    try:
        for key, value in overrides.items():
            config[key] = value
        torch.manual_seed(0)
        return build_model(config, train)
    finally:
        for key, value in saved.items():
            config[key] = value


def random_ranking_ndcg(n_items, k=10):
    """Expected NDCG@k of a uniformly random full ranking of ``n_items`` items with one relevant item:
    the floor a trained model on the tiny data must clear (it is ~0.15 for its 30 items)."""
    return sum(1 / math.log2(rank + 1) for rank in range(1, k + 1)) / n_items


def first_batch(loader):
    batch = next(iter(loader))
    return batch[0] if isinstance(batch, tuple) else batch


def scores(model, batch):
    """Full-sort scores in evaluation mode (which re-seeds T2Diff's chain: equal inputs give equal scores)."""
    model.eval()
    with torch.no_grad():
        return model.full_sort_predict(batch)


def record_calls(module):
    """Record the arguments of every call of ``module`` (its forward still runs): the positional ones, then a
    dict of the keyword ones if it had any."""
    calls, forward = [], module.forward
    module.forward = lambda *args, **kwargs: calls.append(args + ((kwargs,) if kwargs else ())) or forward(*args, **kwargs)
    return calls


def one_line_error(call, *args, match=None, **kwargs):
    """The call fails with a one-line UsageError (matching ``match``); returns the message."""
    with pytest.raises(UsageError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    if match is not None:
        assert re.search(match, message), message
    return message


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunsCommand:
    """Unpickling this object runs ``touch <marker>``: the shape of a malicious checkpoint or cache."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_crafted(path, marker, form):
    """A file that runs ``touch marker`` when unpickled: a torch zip checkpoint or a raw pickle."""
    if form == "torch-zip":
        torch.save({"config": RunsCommand(marker), "state_dict": {}}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(RunsCommand(marker), f)


# ---- SparCode on the tiny data ----------------------------------------------------------------------


def copy_batch(batch):
    """A shallow copy whose fields can be replaced without touching the loader's batch."""
    return Interaction(dict(batch.interaction))


def with_negatives(batch, n_items):
    """The batch with a BPR negative per row (the tiny loaders are built for CE and sample none)."""
    batch = copy_batch(batch)
    batch.interaction["neg_item_id"] = batch["item_id"] % (n_items - 1) + 1
    return batch


def trained_sparcode(sparcode_data, steps=3, **overrides):
    """A tiny SparCode after a few training batches, so its codebooks are seeded and have moved."""
    model = make_model(sparcode_data, **overrides)
    model.train()
    batches = iter(sparcode_data[1])
    for _ in range(steps):
        losses = model.calculate_loss(with_negatives(next(batches), model.n_items))
        sum(losses if isinstance(losses, tuple) else [losses]).backward()
    return model.eval()


def valid_batch(sparcode_data):
    return first_batch(sparcode_data[2])


def run_python(arguments, cwd, timeout=300, env=None):
    """(the finished process, its non-blank stderr lines) of ``python ARGUMENTS`` in ``cwd`` with this checkout importable
    (``env``: variables to add): a script's whole path from the command line to its exit code and one-line error."""
    environment = {**os.environ, "PYTHONPATH": REPO, **(env or {})}
    done = subprocess.run([sys.executable, *arguments], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)
    return done, [line for line in done.stderr.splitlines() if line.strip()]


def run_script(script, arguments, cwd, timeout=600, env=None):
    """The finished process of this checkout's ``script`` (run_recbole.py, run_hyper.py) run with ``arguments`` in ``cwd``."""
    return run_python([os.path.join(REPO, script), *arguments], cwd, timeout, env)[0]
