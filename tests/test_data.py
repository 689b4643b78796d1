"""Datasets (data.py): a failed download named in one line, RecBole's pickle caches never read, malformed and
duplicate lines reported, unusable files refused in one line."""

import logging
import os
import urllib.error

import pytest

from recbole_t2diff import data
from recbole_t2diff.config import Config
from recbole_t2diff.errors import UsageError
from recbole_t2diff.quick_start import prepare, run

from helpers import TINY_MODEL, one_line_error, write_crafted, write_tiny_dataset


def test_a_failed_download_names_the_missing_files(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(UsageError, match=r"ml-1m/ml-1m.inter does not exist and downloading it from https://.*ml-1m.zip failed"):
        data.ensure_dataset({"dataset": "ml-1m", "data_path": str(tmp_path / "ml-1m")})
    assert data.dataset_url("ml-1m").endswith("ml-1m.zip")


def test_a_dropped_cache_file_is_never_unpickled(tmp_path, workdir):
    data = write_tiny_dataset(str(tmp_path / "data"))
    marker = tmp_path / "marker"
    os.makedirs("saved")
    for name in ("tiny-SequentialDataset.pth", "tiny-for-T2Diff-dataloader.pth"):  # the files RecBole reads when present
        write_crafted(os.path.join("saved", name), marker, "raw-pickle")
    result = run("T2Diff", "tiny", config_dict={"data_path": data, **TINY_MODEL, "epochs": 1})
    assert result["test_result"] and not marker.exists()


HEADER = "user_id:token\titem_id:token\ttimestamp:float"


@pytest.mark.parametrize(
    "case,lines,message",
    [
        ("header only", [HEADER], "has a header but no interaction lines"),
        ("no timestamp column", ["user_id:token\titem_id:token"] + [f"{u}\t{i}" for u in range(1, 9) for i in range(1, 9)], "no loaded column 'timestamp'"),
        (
            "one interaction per user",
            [HEADER] + [f"{u}\t{u % 7 + 1}\t{u}" for u in range(1, 40)],
            "no user with the 4 interactions.*39 of 39 users have one interaction only",
        ),
        (
            "non-numeric timestamps",
            [HEADER] + [f"{u}\t{i}\tday{i}" for u in range(1, 9) for i in range(1, 9)],
            "64 malformed line.*timestamp='day1' is not a valid value.*more than max_malformed_lines=10",
        ),
    ],
)
def test_unusable_data_files_get_one_line(tmp_path, workdir, case, lines, message):
    os.makedirs(tmp_path / "data" / "bad")
    (tmp_path / "data" / "bad" / "bad.inter").write_text("\n".join(lines) + "\n")
    one_line_error(run, "T2Diff", "bad", config_dict={"data_path": str(tmp_path / "data"), **TINY_MODEL}, match=message)


def tiny_with_extra_lines(tmp_path, extra):
    data = write_tiny_dataset(str(tmp_path / "data"))
    with open(os.path.join(data, "tiny", "tiny.inter"), "a") as f:
        f.write("\n".join(extra) + "\n")
    return data


def test_malformed_lines_are_dropped_and_reported_not_ingested(tmp_path, workdir, caplog):
    data = tiny_with_extra_lines(tmp_path, ["5\tBROKEN", "6\t7\t8\t9"])
    with caplog.at_level(logging.WARNING):
        dataset, *_ = prepare(Config(model="T2Diff", dataset="tiny", config_dict={"data_path": data, **TINY_MODEL}))
    assert "2 malformed line(s) (line " in caplog.text and "2 fields, the header has 3" in caplog.text
    assert "4 fields, the header has 3" in caplog.text
    clean, *_ = prepare(Config(model="T2Diff", dataset="tiny", config_dict={"data_path": write_tiny_dataset(str(tmp_path / "clean")), **TINY_MODEL}))
    assert len(dataset.inter_feat) == len(clean.inter_feat) and "BROKEN" not in dataset.field2id_token["item_id"]
    assert list(dataset.field2id_token["item_id"]) == list(clean.field2id_token["item_id"])
    one_line_error(
        prepare,
        Config(model="T2Diff", dataset="tiny", config_dict={"data_path": data, **TINY_MODEL, "max_malformed_lines": 1}),
        match="2 malformed line.*more than max_malformed_lines=1",
    )


def test_duplicate_lines_are_counted(tmp_path, workdir, caplog):
    first, second = open(os.path.join(write_tiny_dataset(str(tmp_path / "rows")), "tiny", "tiny.inter")).read().splitlines()[1:3]
    data = tiny_with_extra_lines(tmp_path, [first, second])
    with caplog.at_level(logging.WARNING):
        prepare(Config(model="T2Diff", dataset="tiny", config_dict={"data_path": data, **TINY_MODEL}))
    assert "2 duplicate interaction line(s)" in caplog.text
