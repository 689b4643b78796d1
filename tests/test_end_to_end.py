"""The runner in a subprocess on ml-100k, the error cases, checkpoint reload and determinism."""
import os
import re
import subprocess
import sys
import urllib.error

import pytest

from recbole_t2diff import data
from recbole_t2diff.errors import UsageError
from recbole_t2diff.quick_start import evaluate_checkpoint, run

from conftest import REPO, TINY_MODEL

# ml-100k, shortened so that one epoch takes seconds on two cores.
FAST_ML100K = ["--epochs=1", "--MAX_ITEM_LIST_LENGTH=20", "--train_batch_size=2048", "--show_progress=False"]
FAST_T2DIFF = ["--embedding_size=16", "--n_steps=3", "--unet_levels=2", "--session_len=5"]


def run_script(args, cwd):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "run_recbole.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("model,extra", [("T2Diff", FAST_T2DIFF), ("SASRec", ["--hidden_size=16", "--inner_size=32", "--n_layers=1"])])
@pytest.mark.slow
def test_runner_trains_and_tests_on_ml100k(tmp_path, model, extra):
    result = run_script([f"--model={model}", "--dataset=ml-100k", *FAST_ML100K, *extra], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    logged = re.search(r"test result.*?ndcg@10 : ([0-9.]+)", log)
    assert logged, log[-3000:]
    checkpoints = list((tmp_path / "saved").glob(f"{model}-*.pth"))
    assert len(checkpoints) == 1, "the best checkpoint must be saved"
    # A new process that only loads the checkpoint gets the same test metric.
    code = f"from recbole_t2diff import evaluate_checkpoint; print('NDCG', evaluate_checkpoint({str(checkpoints[0])!r})['ndcg@10'])"
    reload = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": REPO},
                            capture_output=True, text=True, timeout=600)
    assert reload.returncode == 0, reload.stderr[-3000:]
    assert float(re.search(r"NDCG ([0-9.]+)", reload.stdout).group(1)) == float(logged.group(1))


@pytest.mark.slow
def test_runner_reads_config_files(tmp_path):
    (tmp_path / "mine.yaml").write_text("session_len: 60\n")
    result = run_script(["--model=T2Diff", "--dataset=ml-100k", "--config_files=mine.yaml"], tmp_path)
    assert result.returncode == 1 and "session_len=60" in result.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model=NoSuchModel"], "unknown model 'NoSuchModel'"),
        (["--dataset=my-own-data", "--data_path=/nowhere"], "/nowhere/my-own-data/my-own-data.inter does not exist"),
        (["--session_len=50"], "session_len=50"),
        (["--n_steps=0"], "n_steps=0"),
        (["--beta_schedule=cosine"], "unknown beta_schedule 'cosine'"),
        (["--config_files=missing.yaml"], "config file 'missing.yaml' does not exist"),
    ],
)
@pytest.mark.slow
def test_bad_input_gives_one_line_and_exit_code_1(tmp_path, args, message):
    result = run_script(args, tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_a_failed_download_names_the_missing_files(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(UsageError, match=r"ml-1m/ml-1m.inter does not exist and downloading it from https://.*ml-1m.zip failed"):
        data.ensure_dataset({"dataset": "ml-1m", "data_path": str(tmp_path / "ml-1m")})
    assert data.dataset_url("ml-1m").endswith("ml-1m.zip")


def tiny_run(tiny_path, **overrides):
    return run("T2Diff", "tiny", config_dict={"data_path": tiny_path, **TINY_MODEL, **overrides})


def test_checkpoint_reload_gives_the_same_test_metrics(tiny_path, workdir):
    result = tiny_run(tiny_path)
    assert result["saved_model_file"] and os.path.isfile(result["saved_model_file"])
    assert dict(evaluate_checkpoint(result["saved_model_file"], "test")) == dict(result["test_result"])
    assert dict(evaluate_checkpoint(result["saved_model_file"], "valid")) == dict(result["best_valid_result"])


def test_same_seed_same_metrics_other_seed_other_metrics(tiny_path, workdir):
    first, second = tiny_run(tiny_path), tiny_run(tiny_path)
    assert dict(first["test_result"]) == dict(second["test_result"])
    assert dict(first["best_valid_result"]) == dict(second["best_valid_result"])
    assert dict(tiny_run(tiny_path, seed=7)["test_result"]) != dict(first["test_result"])


def test_builtin_models_run_through_the_same_function(tiny_path, workdir):
    result = run("GRU4Rec", "tiny", config_dict={"data_path": tiny_path, "epochs": 1, "show_progress": False, "state": "WARNING"})
    assert result["model"] == "GRU4Rec"
    assert set(result["test_result"]) == {f"{m}@{k}" for m in ("recall", "mrr", "ndcg", "hit") for k in (2, 10, 20)}  # the protocol
    assert dict(evaluate_checkpoint(result["saved_model_file"])) == dict(result["test_result"])



@pytest.mark.parametrize("rel_error, warned", [(0.985, True), (1.02, True), (0.975, False), (1.03, False)])
def test_a_run_warns_when_the_diffusion_module_learned_to_copy_the_last_item(tiny_path, workdir, monkeypatch, rel_error, warned):
    import logging

    from recbole_t2diff.model.t2diff import T2Diff

    measured, warnings = [], []
    quality = T2Diff.xhat_quality
    monkeypatch.setattr(T2Diff, "xhat_quality", lambda self, loader: measured.append(quality(self, loader)) or {**measured[0], "xhat_rel_error": rel_error})
    monkeypatch.setattr(logging.Logger, "warning", lambda self, message, *args, **kwargs: warnings.append(message))
    result = run("T2Diff", "tiny", config_dict={"data_path": tiny_path, **TINY_MODEL, "epochs": 1}, saved=False)
    assert 0 < measured[0]["xhat_rel_error"] and 0 <= measured[0]["xhat_hit@1"] <= measured[0]["xhat_hit@10"] <= 1
    assert result["xhat_quality"]["xhat_rel_error"] == rel_error
    assert any("learned to copy the last item" in w for w in warnings) == warned


def test_a_run_without_a_generated_item_reports_no_xhat_quality_and_never_warns(tiny_path, workdir):
    result = run("T2Diff", "tiny", config_dict={"data_path": tiny_path, **TINY_MODEL, "epochs": 1, "x_hat_source": "copy_last"}, saved=False)
    assert result["xhat_quality"]["xhat_rel_error"] == 1.0  # the copy is the unit; a control is not warned about
    assert run("SASRec", "tiny", config_dict={"data_path": tiny_path, "epochs": 1, "show_progress": False, "state": "WARNING"},
               saved=False)["xhat_quality"] is None
