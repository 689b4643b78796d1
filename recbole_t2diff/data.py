"""Datasets: present before RecBole looks, built without RecBole's pickle caches, checked line by line.

- RecBole downloads a missing dataset itself, but offline that fails with a long traceback, and in
  a single process it fails even online (``torch.distributed.barrier`` without a process group,
  docs/RECBOLE.md §8.6). Here a missing dataset is downloaded from RecBole's own URL list where a
  network exists, and otherwise reported in one line that says where the files were expected.
- RecBole's ``create_dataset`` and ``data_preparation`` unpickle ``saved/<dataset>-*.pth`` cache
  files whenever they exist, so a file dropped there ran code on the next run: :func:`create_dataset`
  never reads one, RecBole's dataloader cache reader is replaced by one that reads nothing
  (``compat.install``), and the settings that write them are rejected (``settings.check_no_pickle_caches``).
- pandas reads a line with too few fields as missing values (RecBole then fills them in: a line
  ``5<TAB>BROKEN`` became an item with a made-up timestamp) and cuts a line with too many. Every
  atomic file is checked first: malformed lines are counted, reported and dropped, and above
  ``max_malformed_lines`` the file is refused; duplicate interaction lines are reported.
"""

import importlib
import logging
import math
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import yaml

import recbole
from recbole.utils import FeatureSource, FeatureType, ModelType
from recbole.utils.url import extract_zip, rename_atomic_files

from recbole_t2diff.checkpoint import data_identity
from recbole_t2diff.errors import UsageError

DOWNLOAD_TIMEOUT_S = 30


def dataset_url(name):
    url_file = Path(recbole.__file__).parent / "properties" / "dataset" / "url.yaml"
    return yaml.safe_load(url_file.read_text()).get(name)


def ensure_dataset(config):
    """Return the dataset folder, downloading it first when it is missing and RecBole knows its URL."""
    name, folder = config["dataset"], config["data_path"]
    inter_file = os.path.join(folder, f"{name}.inter")
    if os.path.isfile(inter_file):
        return folder
    fix = f"pass --data_path=DIR where DIR/{name}/{name}.inter exists (this project's copies: --data_path=../shared/data)"
    url = dataset_url(name)
    if url is None:
        raise UsageError(f"dataset '{name}' not found: {inter_file} does not exist and RecBole has no download for it; {fix}")
    try:
        _download(url, folder, name)
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UsageError(f"dataset '{name}' not found: {inter_file} does not exist and downloading it from {url} failed ({reason}); {fix}") from err
    if not os.path.isfile(inter_file):
        raise UsageError(f"dataset '{name}': the download from {url} holds no {name}.inter; {fix}")
    return folder


def _download(url, folder, name):
    """Fetch RecBole's zip into a scratch folder, then move the renamed atomic files into ``folder``."""
    with tempfile.TemporaryDirectory() as scratch:
        archive = os.path.join(scratch, url.rpartition("/")[2])
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(archive, "wb") as out:
            shutil.copyfileobj(response, out)
        extract_zip(archive, scratch)
        os.unlink(archive)
        rename_atomic_files(scratch, os.path.splitext(os.path.basename(archive))[0], name)
        os.makedirs(folder, exist_ok=True)
        for file in os.listdir(scratch):
            shutil.move(os.path.join(scratch, file), os.path.join(folder, file))


_DATASET_CLASSES = {
    ModelType.GENERAL: "Dataset",
    ModelType.SEQUENTIAL: "SequentialDataset",
    ModelType.CONTEXT: "Dataset",
    ModelType.KNOWLEDGE: "KnowledgeBasedDataset",
    ModelType.TRADITIONAL: "Dataset",
    ModelType.DECISIONTREE: "Dataset",
}
_SHOWN_LINES = 3  # malformed lines quoted in a report


def create_dataset(config):
    """RecBole's dataset for the model (its own class choice), built from the checked atomic files."""
    module = importlib.import_module("recbole.data.dataset")
    name = config["model"] + "Dataset"
    dataset_class = getattr(module, name) if hasattr(module, name) else getattr(module, _DATASET_CLASSES[config["MODEL_TYPE"]])
    return _checked_class(dataset_class)(config)


_CHECKED_CLASSES = {}


def _checked_class(dataset_class):
    if dataset_class not in _CHECKED_CLASSES:
        _CHECKED_CLASSES[dataset_class] = type(dataset_class.__name__, (_CheckedAtomicFiles, dataset_class), {})
    return _CHECKED_CLASSES[dataset_class]


class _CheckedAtomicFiles:
    """Mixed into RecBole's dataset class: every atomic file is checked before pandas reads it, and
    the loaded data's ``identity`` (token maps and fingerprint, see checkpoint.py) is kept."""

    def __init__(self, config):
        super().__init__(config)
        self.identity = data_identity(self)

    def _load_feat(self, filepath, source):
        with open(filepath, encoding=self.config["encoding"]) as f:
            header, *lines = f.read().split("\n")
        load_col, unload_col = self._get_load_and_unload_col(source)
        kept, malformed, columns = check_lines(filepath, header.rstrip("\r"), lines, self.config, load_col, unload_col)
        limit = self.config["max_malformed_lines"]
        if malformed:
            shown = "; ".join(f"line {number}: {why}" for number, why in malformed[:_SHOWN_LINES])
            message = f"'{filepath}': {len(malformed)} malformed line(s) ({shown})"
            if len(malformed) > limit:
                raise UsageError(f"{message}, more than max_malformed_lines={limit}: fix the file, or raise max_malformed_lines to drop them")
            logging.getLogger().warning(f"{message}: dropped, not read (max_malformed_lines={limit})")
        if source == FeatureSource.INTERACTION:
            self._check_interactions(filepath, columns, kept)
        if malformed:
            with tempfile.TemporaryDirectory() as scratch:
                cleaned = os.path.join(scratch, os.path.basename(filepath))
                with open(cleaned, "w", encoding=self.config["encoding"]) as f:
                    f.write("\n".join([header] + kept) + "\n")
                return super()._load_feat(cleaned, source)
        return super()._load_feat(filepath, source)

    def _check_interactions(self, filepath, columns, kept):
        if not kept:
            raise UsageError(f"'{filepath}' has a header but no interaction lines: add lines of {self.config['field_separator']!r}-separated values")
        required = [self.config["USER_ID_FIELD"], self.config["ITEM_ID_FIELD"]]
        if (self.config["eval_args"] or {}).get("order") == "TO":  # the split orders each user's lines by time
            required.append(self.config["TIME_FIELD"])
        for field in required:
            if field not in columns:
                raise UsageError(
                    f"'{filepath}' has no loaded column '{field}' (header: {', '.join(columns) or 'none'}): "
                    f"add it, or name the column that holds it (USER_ID_FIELD, ITEM_ID_FIELD, TIME_FIELD) and list it in load_col"
                )
        duplicates = len(kept) - len(set(kept))
        if duplicates:
            logging.getLogger().warning(f"'{filepath}': {duplicates} duplicate interaction line(s) (each is read as another interaction)")


def check_lines(filepath, header, lines, config, load_col=None, unload_col=None):
    """Split an atomic file's lines into well-formed ones and ``(line number, reason)`` for the rest.

    A line is malformed when its field count differs from the header's, when a loaded float field
    is not a finite number, or when a loaded token field is empty where an id is expected (the user
    and item columns). Blank lines are skipped, as pandas does. Returns ``(kept, malformed, loaded
    column names)``.
    """
    separator = config["field_separator"]
    fields = header.split(separator)
    names, checks = [], []
    for index, field_type in enumerate(fields):
        name, _, kind = field_type.partition(":")
        try:
            kind = FeatureType(kind)
        except ValueError:
            raise UsageError(f"'{filepath}': header field '{field_type}' is not name:type with type one of {', '.join(t.value for t in FeatureType)}") from None
        if (load_col is not None and name not in load_col) or (unload_col is not None and name in unload_col):
            continue
        names.append(name)
        if kind == FeatureType.FLOAT:
            checks.append((index, name, _finite))
        elif name in (config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]):
            checks.append((index, name, bool))
    kept, malformed = [], []
    for number, line in enumerate(lines, 2):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        values = line.split(separator)
        if len(values) != len(fields):
            malformed.append((number, f"{len(values)} fields, the header has {len(fields)}"))
            continue
        bad = next(((name, values[index]) for index, name, ok in checks if not ok(values[index].strip())), None)
        if bad is not None:
            malformed.append((number, f"{bad[0]}={bad[1]!r} is not a valid value"))
            continue
        kept.append(line)
    return kept, malformed, names


def _finite(text):
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def check_dataset(config, dataset):
    """What RecBole would otherwise fail on deep inside its splitting or evaluation, in one line."""
    name = config["dataset"]
    if config["MODEL_TYPE"] == ModelType.SEQUENTIAL and (config["eval_args"] or {}).get("split") == {"LS": "valid_and_test"}:
        # Each user's n interactions give n - 1 next-item samples: the last tests, the one before
        # validates, the rest train. Users with a single interaction give none.
        counts = dataset.inter_feat[dataset.uid_field].value_counts()
        single = int((counts == 1).sum())
        if single:
            logging.getLogger().warning(f"dataset '{name}': {single} user(s) with one interaction only give no sample and are left out")
        if not (counts >= 4).any():
            raise UsageError(
                f"dataset '{name}' has no user with the 4 interactions leave-one-out needs (3 samples: train, valid, test; "
                f"{single} of {len(counts)} users have one interaction only): add interactions"
            )
    topk = max(config["topk"])
    if topk >= dataset.item_num:
        raise UsageError(f"topk={config['topk']}: {topk} is not below the {dataset.item_num - 1} items of dataset '{name}'; use smaller topk values")
