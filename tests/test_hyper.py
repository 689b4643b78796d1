"""Hyperparameter search (hyper.py, run_hyper.py): a real two-trial search, the trial picked on validation where
test disagrees, the params file read as literals and its errors named, command-line conflicts, the output file checked
before any trial."""

import inspect
import math
import os
import re
import sys

import pytest

from recbole.utils.utils import dict2str

from recbole_t2diff.checkpoint import load_checkpoint
from recbole_t2diff.errors import UsageError
from recbole_t2diff.hyper import Search, check_output_file, parse_params_file
from recbole_t2diff.settings import command_line_settings

from helpers import CODE, REPO, one_line_error, run_python, run_script


FIXED = """epochs: 1
MAX_ITEM_LIST_LENGTH: 20
train_batch_size: 2048
show_progress: False
embedding_size: 16
n_steps: 3
unet_levels: 2
session_len: 5
"""


def run_hyper(args, cwd):
    return run_script("run_hyper.py", args, cwd, timeout=900)


@pytest.mark.spawns
@pytest.mark.slow
def test_two_trial_search_on_ml100k_picks_the_better_validation_score(tmp_path):
    (tmp_path / "fixed.yaml").write_text(FIXED)
    (tmp_path / "space.hyper").write_text("learning_rate choice [0.00001,0.005]\n")
    result = run_hyper(["--model=T2Diff", "--dataset=ml-100k", "--params_file=space.hyper", "--config_files=fixed.yaml", "--output_file=out.result"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trial 1 of at most 2" in result.stdout and "trial 2 of at most 2" in result.stdout
    text = (tmp_path / "out.result").read_text()
    trials = re.findall(r"^trial (\d): learning_rate:(\S+)\n  valid score: (\S+)", text, re.M)
    assert sorted(float(lr) for _, lr, _ in trials) == [0.00001, 0.005]
    best_lr, best_score = max(((lr, float(score)) for _, lr, score in trials), key=lambda t: t[1])
    assert re.search(rf"^best trial \d: learning_rate:{re.escape(best_lr)}\n  valid score: {best_score:.6f}", text, re.M)
    assert "test: " in text


def test_builtin_models_can_be_searched(tmp_path, tiny_path, workdir, capsys):
    (tmp_path / "space.hyper").write_text("hidden_size choice [8,16]\n")
    (tmp_path / "fixed.yaml").write_text(f"data_path: {tiny_path}\nepochs: 1\nshow_progress: False\nstate: WARNING\n")
    search = Search("GRU4Rec", "tiny", str(tmp_path / "space.hyper"), [str(tmp_path / "fixed.yaml")], argv=[])
    search.run()
    assert len(search.trials) == 2
    # hyperopt's progress bar shares the line: each line's text after its last carriage return
    out = "\n".join(line.rsplit("\r", 1)[-1] for line in capsys.readouterr().out.splitlines())
    progress = re.findall(r"^\[hyper\] trial (\d) of at most (\d): hidden_size:(\d+)$", out, re.M)
    assert [(number, most) for number, most, _ in progress] == [("1", "2"), ("2", "2")]
    search.export_result(str(tmp_path / "out.result"))
    text = (tmp_path / "out.result").read_text()
    trials = re.findall(r"^trial (\d): hidden_size:(\d+)\n  valid score: (\S+)", text, re.M)
    assert sorted(int(size) for _, size, _ in trials) == [8, 16]
    number, size, score = max(trials, key=lambda trial: float(trial[2]))  # ties: the earliest, as the search
    assert re.search(rf"^best trial {number}: hidden_size:{size}\n  valid score: {score}$", text, re.M)
    assert search.best_trial()[0] == {"hidden_size": int(size)}
    assert text.endswith(f"  test: {dict2str(search.best_trial()[1]['test_result'])}\n")
    # Each trial trained with its own value and kept its checkpoint (the best one is what a user reloads).
    for params, result in search.trials:
        checkpoint = load_checkpoint(result["saved_model_file"])
        assert checkpoint["config"]["hidden_size"] == params["hidden_size"]
        assert checkpoint["state_dict"]["gru_layers.weight_hh_l0"].shape[1] == params["hidden_size"]


# ---- selection: the best validation score wins, whatever the test scores say ---------------------------------


def fake_result(valid, test):
    return {"model": "T2Diff", "best_valid_score": valid, "valid_score_bigger": True, "best_valid_result": {"ndcg@10": valid}, "test_result": {"ndcg@10": test}}


@pytest.mark.parametrize("bigger", [True, False])
def test_the_search_picks_the_best_validation_score_where_test_disagrees(tmp_path, bigger):
    (tmp_path / "space.hyper").write_text("learning_rate choice [0.001,0.002,0.003]\n")
    # learning rate -> (valid, test): validation ranks 0.002 first, test ranks it last.
    outcomes = {0.001: (0.30, 0.50), 0.002: (0.40, 0.10), 0.003: (0.20, 0.60)}
    if not bigger:  # a loss-like valid metric: the smallest wins (0.002 again)
        outcomes = {lr: (1 - valid, test) for lr, (valid, test) in outcomes.items()}
    search = Search("T2Diff", "tiny", str(tmp_path / "space.hyper"), argv=[])

    def objective(config_dict, config_file_list):
        return {**fake_result(*outcomes[config_dict["learning_rate"]]), "valid_score_bigger": bigger}

    search.objective_function = objective
    search.run()
    best_params, best = search.best_trial()
    assert len(search.trials) == 3 and best_params == {"learning_rate": 0.002}
    assert search.best_params == {"learning_rate": 0.002}  # RecBole's own bookkeeping agrees
    search.export_result(str(tmp_path / "out.result"))
    text = (tmp_path / "out.result").read_text()
    number = [params for params, _ in search.trials].index({"learning_rate": 0.002}) + 1
    assert f"best trial {number}: learning_rate:0.002\n  valid score: {outcomes[0.002][0]:.6f}\n" in text


def test_ties_on_validation_go_to_the_earliest_trial(tmp_path):
    (tmp_path / "space.hyper").write_text("learning_rate choice [0.001,0.002]\n")
    search = Search("T2Diff", "tiny", str(tmp_path / "space.hyper"), argv=[])
    search.objective_function = lambda config_dict, files: fake_result(0.5, config_dict["learning_rate"])
    search.run()
    assert search.best_trial()[0] == search.trials[0][0]


def test_a_one_trial_search_selects_its_trial(tmp_path):
    (tmp_path / "space.hyper").write_text("learning_rate choice [0.001]\n")
    search = Search("T2Diff", "tiny", str(tmp_path / "space.hyper"), argv=[])
    search.objective_function = lambda config_dict, files: fake_result(0.5, 0.4)
    search.run()
    assert search.best_trial() == search.trials[0]


# ---- the params file ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line,message",
    [
        ("learning_rate", "is not 'name type value'"),
        ("learning_rate range 1,2", "is not 'name type value'"),
        ("learning_rate choice 0.1,", "choice needs a Python list"),
        ("learning_rate choice [0.1", "choice needs a Python list"),
        ("learning_rate uniform 1", "uniform needs low,high numbers"),
        ("learning_rate uniform 2,1", "with low < high"),
        ("learning_rate uniform 1,1", "with low < high"),
        ("learning_rate loguniform a,b", "loguniform needs low,high numbers"),
        ("embedding_size quniform 8,64", "quniform needs low,high,step"),
    ],
)
def test_malformed_params_lines_are_named(tmp_path, line, message):
    path = tmp_path / "bad.hyper"
    path.write_text(f"# comment\nn_steps choice [10,20]\n{line}\n")
    with pytest.raises(UsageError, match=rf"bad.hyper:3: '{re.escape(line)}'.*{message}"):
        parse_params_file(str(path))


def test_integer_quniform_gives_ints(tmp_path):
    from hyperopt.pyll.stochastic import sample

    path = tmp_path / "space.hyper"
    path.write_text("embedding_size quniform 8,64,8\nlearning_rate loguniform -8,-5\n")
    drawn = sample(parse_params_file(str(path)))
    assert isinstance(drawn["embedding_size"], int) and drawn["embedding_size"] % 8 == 0
    assert 0.0003 < drawn["learning_rate"] < 0.007


def test_a_choice_is_read_as_literals_and_never_runs_code(tmp_path):
    path = tmp_path / "space.hyper"
    path.write_text(f"learning_rate choice [open({str(tmp_path / 'ran')!r}, 'w')]\n")
    with pytest.raises(UsageError, match="choice needs a Python list"):
        parse_params_file(str(path))
    assert not (tmp_path / "ran").exists()
    path.write_text("loss_type choice ['CE', 'a b']\n")
    from hyperopt.pyll.stochastic import sample

    assert {sample(parse_params_file(str(path)))["loss_type"] for _ in range(30)} == {"CE", "a b"}


def test_a_params_file_choice_runs_no_code(tmp_path):
    """Each trial handed the option to RecBole's eval(): the file is refused before any trial."""
    marker = tmp_path / "marker"
    (tmp_path / "space.hyper").write_text(f'learning_rate choice ["{CODE.format(marker=marker)}"]\n')
    one_line_error(
        Search, "T2Diff", "ml-100k", str(tmp_path / "space.hyper"), argv=[], match=r"learning_rate=.* \(a choice in .*space.hyper, line 1\) is Python code"
    )
    assert not marker.exists()


def test_every_type_with_comments_and_spaces_in_values(tmp_path):
    from hyperopt.pyll.stochastic import sample

    path = tmp_path / "space.hyper"
    path.write_text(
        "# a whole-line comment\n\n"
        "learning_rate choice [0.001, 0.01]  # a comment\n"
        "dropout_prob uniform 0.1, 0.2  # a comment # with two hashes\n"
        "embedding_size quniform 8, 64, 8\n"
        "step_emb_scale quniform 0.5,2.5,0.5\n"
        "weight_decay loguniform -8,-5\n"
    )
    space = parse_params_file(str(path))
    assert sorted(space) == ["dropout_prob", "embedding_size", "learning_rate", "step_emb_scale", "weight_decay"]
    draws = [sample(space) for _ in range(40)]
    assert {d["learning_rate"] for d in draws} == {0.001, 0.01}
    assert all(0.1 <= d["dropout_prob"] <= 0.2 for d in draws) and len({d["dropout_prob"] for d in draws}) > 30
    assert all(type(d["embedding_size"]) is int and d["embedding_size"] % 8 == 0 and 8 <= d["embedding_size"] <= 64 for d in draws)
    assert all(type(d["step_emb_scale"]) is float and d["step_emb_scale"] % 0.5 == 0 for d in draws)  # a fractional step: floats
    assert all(math.exp(-8) <= d["weight_decay"] <= math.exp(-5) for d in draws)


def test_shipped_search_spaces_parse():
    for name in ("T2Diff", "SASRec"):
        space = parse_params_file(os.path.join(REPO, "properties", "hyper", f"{name}.hyper"))
        assert "learning_rate" in space


def test_a_misspelt_key_in_a_params_file_fails_before_any_trial(tmp_path):
    (tmp_path / "space.hyper").write_text("lamda_diff choice [0.1,1.0]\n")
    one_line_error(Search, "T2Diff", "ml-100k", str(tmp_path / "space.hyper"), argv=[], match="did you mean 'lambda_diff'")


def test_a_searched_key_of_the_users_own_passes_when_a_config_file_lists_it(tmp_path):
    (tmp_path / "space.hyper").write_text("my_flag choice [1,2]\n")
    (tmp_path / "lists.yaml").write_text("extra_keys: [my_flag]\n")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "other.yaml").write_text("epochs: 1\n")
    (tmp_path / "broken.yaml").write_text("epochs: [1\n")  # reported when the first trial builds its Config
    files = [str(tmp_path / name) for name in ("lists.yaml", "empty.yaml", "other.yaml")]
    search = Search("SASRec", "ml-100k", str(tmp_path / "space.hyper"), files, algo="random", argv=[])  # listed in the first file
    stop_after = inspect.getclosurevars(search.early_stop_fn).nonlocals["iteration_stop_count"]  # hyperopt's closure
    assert (search.max_evals, stop_after) == (10, 10)  # the documented defaults, as run_hyper.py's
    assert Search("SASRec", "ml-100k", str(tmp_path / "space.hyper"), files, argv=[]).max_evals == 2  # exhaustive: the grid
    Search("SASRec", "ml-100k", str(tmp_path / "space.hyper"), files[::-1], argv=[])  # ... or the last
    Search("SASRec", "ml-100k", str(tmp_path / "space.hyper"), [str(tmp_path / "broken.yaml"), *files[::-1]], argv=[])
    with pytest.raises(UsageError, match="unknown setting 'my_flag' \\(in .*space.hyper\\).*extra_keys"):
        Search("SASRec", "ml-100k", str(tmp_path / "space.hyper"), files[1:], argv=[])


@pytest.mark.spawns
@pytest.mark.slow
def test_malformed_file_from_the_command_line_gives_one_line(tmp_path):
    (tmp_path / "bad.hyper").write_text("learning_rate uniform 0.1\n")
    result = run_hyper(["--params_file=bad.hyper"], tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and "uniform needs low,high" in lines[0]


# ---- the command line and the output file -------------------------------------------------------------------


def test_a_searched_key_on_the_command_line_is_rejected(tmp_path):
    (tmp_path / "space.hyper").write_text("learning_rate choice [0.001,0.01]\n")
    with pytest.raises(UsageError, match="--learning_rate is given on the command line and searched"):
        Search("T2Diff", "ml-100k", str(tmp_path / "space.hyper"), argv=["--learning_rate=0.1"])


@pytest.mark.spawns
@pytest.mark.slow
def test_run_hyper_rejects_a_searched_key_on_its_command_line(tmp_path):
    (tmp_path / "space.hyper").write_text("learning_rate choice [0.001,0.01]\n")
    result = run_hyper(["--params_file=space.hyper", "--learning_rate=0.1"], tmp_path)
    assert result.returncode == 1 and "searched in space.hyper" in result.stderr


def test_searched_keys_clash_only_with_the_command_line_passed_in(monkeypatch, tmp_path):
    """The search's command line is its argv (run_hyper.py passes its settings), never the process's own."""
    (tmp_path / "space.hyper").write_text("learning_rate choice [0.001,0.01]\n")
    monkeypatch.setattr(sys, "argv", ["run_hyper.py", "--learning_rate=0.1"])
    assert Search("T2Diff", "ml-100k", str(tmp_path / "space.hyper")).argv == []
    assert command_line_settings(["--learning_rate=0.1", "--epochs=1"]) == {"learning_rate": "0.1", "epochs": "1"}
    assert command_line_settings([]) == command_line_settings(None) == {}
    with pytest.raises(UsageError, match="unexpected argument '-m'"):  # a script's own options are parsed before
        command_line_settings(["--learning_rate=0.1", "-m", "x"])


def test_every_trial_gets_the_command_line_settings(monkeypatch, tmp_path):
    import recbole_t2diff.hyper as hyper_module

    (tmp_path / "space.hyper").write_text("learning_rate choice [0.001,0.01]\n")
    calls = []
    monkeypatch.setattr(hyper_module, "run", lambda *args, **kwargs: calls.append((args, kwargs)))
    search = Search("T2Diff", "ml-100k", str(tmp_path / "space.hyper"), argv=["--epochs=1"])
    search.objective_function({"learning_rate": 0.01}, None)
    ((args, kwargs),) = calls
    assert args == ("T2Diff", "ml-100k") and kwargs["argv"] == ["--epochs=1"] and kwargs["config_dict"] == {"learning_rate": 0.01}


def test_the_output_file_is_checked_before_any_trial(tmp_path, monkeypatch):
    check_output_file(str(tmp_path / "hyper.result"))  # a new file in a writable folder
    check_output_file("hyper.result")  # in the current folder
    with pytest.raises(UsageError, match="is a folder: name a file in it"):
        check_output_file(str(tmp_path))
    with pytest.raises(UsageError, match=f"folder {re.escape(str(tmp_path / 'missing'))} does not exist"):
        check_output_file(str(tmp_path / "missing" / "hyper.result"))
    asked = []
    monkeypatch.setattr(os, "access", lambda path, mode: asked.append((path, mode)) or False)  # as for a read-only folder
    with pytest.raises(UsageError, match=f"folder {re.escape(str(tmp_path))} is not writable"):
        check_output_file(str(tmp_path / "hyper.result"))
    assert asked == [(str(tmp_path), os.W_OK)]


@pytest.mark.spawns
@pytest.mark.slow
def test_run_hyper_rejects_an_unwritable_output_file_before_any_trial(tmp_path):
    (tmp_path / "space.hyper").write_text("learning_rate choice [0.001,0.01]\n")
    result, lines = run_python([os.path.join(REPO, "run_hyper.py"), "--params_file=space.hyper", f"--output_file={tmp_path}/missing/dir/x"], tmp_path)
    assert result.returncode == 1 and len(lines) == 1 and "missing/dir does not exist" in lines[0], result.stderr
    assert "trial" not in result.stdout
