"""The scripts (run_recbole.py, run_hyper.py; cli.py): run_recbole.py end to end in a child process, RecBole's
settings and the scripts' own options on one command line, a mistyped or repeated flag refused, bad input in one line
with exit code 1."""

import os
import re
import subprocess
import sys

import pytest

from recbole_t2diff.config import Config
from recbole_t2diff.settings import known_keys

from helpers import REPO, one_line_error, run_python, run_script


# ml-100k, shortened so that one epoch takes seconds on two cores.
FAST_ML100K = ["--epochs=1", "--MAX_ITEM_LIST_LENGTH=20", "--train_batch_size=2048", "--show_progress=False"]


FAST_T2DIFF = ["--embedding_size=16", "--n_steps=3", "--unet_levels=2", "--session_len=5"]


def load_script(name):
    """run_recbole.py or run_hyper.py as a module, so that main() runs in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name.replace(".py", ""), os.path.join(REPO, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script_error(module, argv, monkeypatch, capsys, code=1):
    """main() of a script module exits with ``code`` and one stderr line; returns that line."""
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as info:
        module.main()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert info.value.code == code and len(lines) == 1, lines
    return lines[0]


# ---- run_recbole.py in a child process ---------------------------------------------------------------------------


@pytest.mark.parametrize("model,extra", [("T2Diff", FAST_T2DIFF), ("SASRec", ["--hidden_size=16", "--inner_size=32", "--n_layers=1"])])
@pytest.mark.spawns
@pytest.mark.slow
def test_runner_trains_and_tests_on_ml100k(tmp_path, model, extra):
    result = run_script("run_recbole.py", [f"--model={model}", "--dataset=ml-100k", *FAST_ML100K, *extra], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    logged = re.search(r"test result.*?ndcg@10 : ([0-9.]+)", log)
    assert logged, log[-3000:]
    checkpoints = list((tmp_path / "saved").glob(f"{model}-*.pth"))
    assert len(checkpoints) == 1, "the best checkpoint must be saved"
    # A new process that only loads the checkpoint gets the same test metric.
    code = f"from recbole_t2diff import evaluate_checkpoint; print('NDCG', evaluate_checkpoint({str(checkpoints[0])!r})['ndcg@10'])"
    reload = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=600)
    assert reload.returncode == 0, reload.stderr[-3000:]
    assert float(re.search(r"NDCG ([0-9.]+)", reload.stdout).group(1)) == float(logged.group(1))


@pytest.mark.spawns
@pytest.mark.slow
def test_runner_reads_config_files(tmp_path):
    (tmp_path / "mine.yaml").write_text("session_len: 60\n")
    result = run_script("run_recbole.py", ["--model=T2Diff", "--dataset=ml-100k", "--config_files=mine.yaml"], tmp_path)
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
@pytest.mark.spawns
@pytest.mark.slow
def test_bad_input_gives_one_line_and_exit_code_1(tmp_path, args, message):
    result = run_script("run_recbole.py", args, tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


@pytest.mark.spawns
@pytest.mark.slow
def test_epochs_zero_leaves_no_checkpoint(tmp_path):
    result, lines = run_python([os.path.join(REPO, "run_recbole.py"), "--epochs=0"], tmp_path)
    assert result.returncode == 1 and len(lines) == 1 and "epochs=0" in lines[0], result.stderr
    assert not (tmp_path / "saved").exists()


# ---- the command line: RecBole's settings and the scripts' own options, each read once and as written -------------


def test_recboles_own_keys_are_known_and_the_scripts_options_are_no_settings(monkeypatch):
    assert {"learning_rate", "eval_args", "encoding", "world_size", "hidden_size", "dist_backend"} <= known_keys()
    module = load_script("run_recbole.py")
    runs = []
    monkeypatch.setattr(module, "run", lambda *args, **kwargs: runs.append((args, kwargs)))
    module.main(["--config_files=", "--nproc=1", "--group_offset=0", "--encoding=utf-8"])
    ((args, kwargs),) = runs
    assert kwargs["argv"] == ["--encoding=utf-8"] and (kwargs["config_file_list"], kwargs["nproc"], kwargs["group_offset"]) == (None, 1, 0)
    assert Config(model="T2Diff", dataset="ml-100k", argv=kwargs["argv"])["encoding"] == "utf-8"


def test_the_scripts_own_options_may_take_a_space(monkeypatch):
    module = load_script("run_recbole.py")
    started = []
    monkeypatch.setattr(module, "run", lambda *a, **k: started.append(a))
    monkeypatch.setattr(sys, "argv", ["run_recbole.py", "--dataset", "tiny", "--model", "SASRec", "--epochs=1"])
    module.main()
    assert started == [("SASRec", "tiny")]


def test_a_scripts_own_option_may_look_like_code(monkeypatch, workdir):
    """argparse reads run_hyper.py's --output_file, not RecBole: a file name such as report(1).txt is no setting."""
    module = load_script("run_hyper.py")
    searches = []

    class Searched(Exception):
        pass

    def search(*args, **kwargs):
        searches.append(kwargs["argv"])
        raise Searched

    monkeypatch.setattr(module, "Search", search)
    with pytest.raises(Searched):
        module.main(["--output_file=report(1).txt", "--epochs=1"])
    assert searches == [["--epochs=1"]]
    assert Config(model="T2Diff", dataset="ml-100k", argv=searches[0])["epochs"] == 1


def test_a_key_given_twice_on_the_command_line_gets_one_line(monkeypatch, capsys):
    one_line_error(Config, model="T2Diff", dataset="ml-100k", argv=["--epochs=1", "--epochs=2"], match="--epochs is given twice, as --epochs=1 and --epochs=2")
    module = load_script("run_recbole.py")  # ... and by the script, before anything starts
    monkeypatch.setattr(module, "run", lambda *a, **k: pytest.fail("run started"))
    line = script_error(module, ["run_recbole.py", "--epochs=1", "--epochs=2"], monkeypatch, capsys)
    assert line == "error: --epochs is given twice, as --epochs=1 and --epochs=2: give it once"


@pytest.mark.parametrize("script", ["run_recbole.py", "run_hyper.py"])
@pytest.mark.parametrize(
    "arguments,name",
    [
        (["--model=SASRec", "--model=GRU4Rec"], "--model"),
        (["-m", "SASRec", "--model=GRU4Rec"], "--model"),
        (["--dataset=ml-100k", "--epochs=1", "--dataset", "ml-1m"], "--dataset"),
    ],
)
def test_a_scripts_own_option_given_twice_gets_one_line(script, arguments, name, monkeypatch, capsys):
    """argparse alone keeps the last of a repeated option without a word: the script refuses it before anything starts."""
    module = load_script(script)
    monkeypatch.setattr(module, "run" if script == "run_recbole.py" else "Search", lambda *a, **k: pytest.fail("started"))
    line = script_error(module, [script, *arguments], monkeypatch, capsys)
    assert line.startswith(f"error: {name} is given twice") and line.endswith("give it once")


@pytest.mark.parametrize("script", ["run_recbole.py", "run_hyper.py"])
@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--epochs", "1"], "'--epochs' has no value: .*use --epochs=1"),
        (["--train_batch_size", "256", "--epochs=2"], "use --train_batch_size=256"),
        (["--epochs"], "use --epochs=VALUE"),
        (["--eval_args={'a'=1}"], "has more than one '='"),
        (["epochs=1"], "unexpected argument 'epochs=1'"),
    ],
)
def test_an_argument_recbole_would_not_read_is_refused(script, arguments, message, monkeypatch, capsys, tmp_path):
    module = load_script(script)
    started = []
    monkeypatch.setattr(module, "run" if script == "run_recbole.py" else "Search", lambda *a, **k: started.append(a))
    line = script_error(module, [script, f"--output_file={tmp_path}/out", *arguments], monkeypatch, capsys)
    assert line.startswith("error: ") and re.search(message, line), line
    assert not started
