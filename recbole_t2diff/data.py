"""Make sure a dataset's atomic files are there before RecBole looks for them.

RecBole downloads a missing dataset itself, but offline that fails with a long traceback, and in a
single process it fails even online (``torch.distributed.barrier`` without a process group,
RECBOLE_NOTES §8 row 6). Here a missing dataset is downloaded from RecBole's own URL list where a
network exists, and otherwise reported in one line that says where the files were expected.
"""
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import yaml

import recbole
from recbole.utils.url import extract_zip, rename_atomic_files

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
        raise UsageError(
            f"dataset '{name}' not found: {inter_file} does not exist and downloading it from {url} failed ({reason}); {fix}"
        ) from err
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
