"""run_hyper.py --tool=ray: two trials in parallel on a local Ray cluster, the result file, and the
one-line errors (Ray missing, an unreachable --address, options without --tool=ray, bad settings)."""

import os
import re
import subprocess
import sys
import time

import pytest

from recbole_t2diff.errors import UsageError
from recbole_t2diff.hyper import Search
from recbole_t2diff.ray_progress import _last_error_line
from recbole_t2diff.ray_search import RaySearch, _check_reachable

from helpers import REPO, free_port, run_script


FIXED = "data_path: {data}\nepochs: 2\nshow_progress: False\nstate: WARNING\nMAX_ITEM_LIST_LENGTH: 12\n"


# The ray CLI of this Python (ray start), whether or not its bin folder is on PATH.
RAY_CLI = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())"]


def run_hyper(args, cwd, env=None, timeout=600):
    return run_script("run_hyper.py", args, cwd, timeout, env)


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.fixture
def space(tmp_path, tiny_path):
    (tmp_path / "space.hyper").write_text("hidden_size choice [8,16]\n")
    (tmp_path / "fixed.yaml").write_text(FIXED.format(data=tiny_path))
    return tmp_path


@pytest.mark.spawns
@pytest.mark.slow
def test_two_trials_run_in_parallel_on_a_local_ray_cluster(space):
    """`ray start --head` on 127.0.0.1 with 2 CPUs, as a user's cluster; the search connects with --address."""
    home = space / "home"  # Ray's auth token and any default folder would land here, not in the real home
    home.mkdir()
    port = free_port()
    # A single-machine Ray listens on 127.0.0.1 only (see ray_search.import_ray).
    env = {**os.environ, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    # --block keeps the cluster's processes under this one process: terminating it stops exactly this
    # cluster (`ray stop` would stop every Ray instance on the machine).
    head = subprocess.Popen(
        [
            *RAY_CLI,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=2",
            "--num-gpus=0",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        env=env,
        cwd=space,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    common = ["--tool=ray", f"--address=127.0.0.1:{port}", "--model=GRU4Rec", "--dataset=tiny", "--config_files=fixed.yaml", "--cpus_per_trial=1"]
    (space / "rates.hyper").write_text("learning_rate choice [0.01,0.000001]\n")
    try:
        result = run_hyper([*common, "--params_file=space.hyper", "--output_file=out.result", "--storage_path=tune"], space, env={"HOME": str(home)})
        # One at a time, so ASHA's one rung (epoch 1) is deterministic: the second trial is stopped when
        # its epoch-1 score is below the first's, as a learning rate of 1e-6 leaves it.
        asha = run_hyper(
            [
                *common,
                "--params_file=rates.hyper",
                "--output_file=asha.result",
                "--max_concurrent=1",
                "--scheduler=asha",
                "--grace_period=1",
                "--reduction_factor=2",
                "--checkpoint_dir=saved_asha",
            ],
            space,
            env={"HOME": str(home)},
        )
    finally:
        head.terminate()
        head.wait(timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    events = re.findall(r"^\[ray\] trial (\d) (?:of at most 2 )?(started|valid score)", result.stdout, re.M)
    # Both trials started before either finished: they ran side by side on the cluster's 2 CPUs.
    assert [event for _, event in events] == ["started", "started", "valid score", "valid score"], result.stdout
    assert "none stopped early" in result.stdout
    text = (space / "out.result").read_text()
    assert text.startswith("# GRU4Rec on tiny: 2 trials, algo exhaustive on Ray Tune, selected on the validation metric")
    trials = re.findall(r"^trial (\d): hidden_size:(\d+)\n  valid score: (\S+)\n  valid: .*\n  test: ", text, re.M)
    assert sorted(int(size) for _, size, _ in trials) == [8, 16]
    number, size, score = max(trials, key=lambda trial: float(trial[2]))
    assert re.search(rf"^best trial {number}: hidden_size:{size}\n  valid score: {score}$", text, re.M)
    # Ray Tune's folders where --storage_path said, the checkpoints in saved/ of the search's folder,
    # nothing in Ray's default ~/ray_results.
    assert (space / "tune" / "GRU4Rec-tiny").is_dir() and not (home / "ray_results").exists()
    assert len(list((space / "saved").glob("GRU4Rec-*"))) == 2

    assert asha.returncode == 0, asha.stdout[-3000:] + asha.stderr[-3000:]
    # The searcher is seeded with the settings' seed (2020): 0.01 runs first, 1e-6 second.
    assert re.findall(r"^\[ray\] trial \d of at most 2 started: learning_rate:(\S+)$", asha.stdout, re.M) == ["0.01", "1e-06"]
    assert re.search(r"^\[ray\] trial 2 stopped by asha after epoch 1, ", asha.stdout, re.M), asha.stdout
    assert "the asha scheduler stopped 1: trial 2 after epoch 1" in asha.stdout
    text = (space / "asha.result").read_text()
    assert text.startswith("# GRU4Rec on tiny: 2 trials, algo exhaustive on Ray Tune, asha scheduler,")
    assert re.search(r"^trial 2: learning_rate:1e-06\n.*\n.*\n  stopped by the scheduler after epoch 1: not tested$", text, re.M), text
    assert re.search(r"^best trial 1: learning_rate:0.01$", text, re.M)


@pytest.mark.spawns
@pytest.mark.slow
def test_an_unreachable_address_gives_one_line(space):
    started = time.monotonic()
    result = run_hyper(
        [
            "--tool=ray",
            f"--address=127.0.0.1:{free_port()}",
            "--model=GRU4Rec",
            "--dataset=tiny",
            "--params_file=space.hyper",
            "--config_files=fixed.yaml",
            "--output_file=out.result",
        ],
        space,
    )
    lines = error_lines(result)
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: cannot reach a Ray cluster at --address=127.0.0.1:") and "ray start --head" in lines[0]
    assert time.monotonic() - started < 300


@pytest.mark.spawns
@pytest.mark.slow
def test_without_ray_the_tool_says_how_to_install_it(space):
    # A None entry in sys.modules makes `import ray` fail as if ray were not installed.
    probe = (
        "import runpy, sys; sys.modules['ray'] = None; sys.argv = ['run_hyper.py', *sys.argv[1:]]; "
        f"runpy.run_path({os.path.join(REPO, 'run_hyper.py')!r}, run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, "--tool=ray", "--model=GRU4Rec", "--params_file=space.hyper"],
        cwd=space,
        env={**os.environ, "PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = error_lines(result)
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
    assert "--tool=ray needs Ray Tune" in lines[0] and '-e ".[ray]"' in lines[0]


@pytest.mark.spawns
@pytest.mark.slow
def test_ray_options_without_tool_ray_are_refused(space):
    result = run_hyper(["--scheduler=asha", "--params_file=space.hyper"], space)
    lines = error_lines(result)
    assert result.returncode == 1 and lines == ["error: --scheduler applies to --tool=ray only: add --tool=ray or drop it"]


def test_settings_are_checked_before_ray_starts(space):
    args = ("GRU4Rec", "tiny", str(space / "space.hyper"), [str(space / "fixed.yaml")])
    with pytest.raises(UsageError, match="unknown setting 'learning_rat'.*did you mean 'learning_rate'"):
        RaySearch(*args, argv=["--learning_rat=0.1"])
    (space / "typo.hyper").write_text("hiden_size choice [8,16]\n")
    with pytest.raises(UsageError, match="unknown setting 'hiden_size' \\(in .*typo.hyper\\)"):
        RaySearch("GRU4Rec", "tiny", str(space / "typo.hyper"), [str(space / "fixed.yaml")], argv=[])
    (space / "bad.hyper").write_text("hidden_size choice 8,16\n")
    with pytest.raises(UsageError, match="bad.hyper:1: .*choice needs a Python list"):
        RaySearch("GRU4Rec", "tiny", str(space / "bad.hyper"), [str(space / "fixed.yaml")], argv=[])
    # What a trial would load by pickle (RecBole's dataset caches) is refused before any trial runs.
    (space / "cache.yaml").write_text("save_dataset: True\n")
    with pytest.raises(UsageError, match="save_dataset=True is not supported: RecBole's dataset caches are pickles"):
        RaySearch("GRU4Rec", "tiny", str(space / "space.hyper"), [str(space / "fixed.yaml"), str(space / "cache.yaml")], argv=[])
    with pytest.raises(UsageError, match="gpu_id is Ray's to choose"):
        RaySearch(*args, argv=["--gpu_id=1"])
    with pytest.raises(UsageError, match="unknown --scheduler=hyperband: use one of none, asha, median"):
        RaySearch(*args, argv=[], scheduler="hyperband")
    with pytest.raises(UsageError, match="--cpus_per_trial=-1: it must be a number >= 0"):
        RaySearch(*args, argv=[], cpus_per_trial=-1)
    with pytest.raises(UsageError, match="--address=cluster: give the cluster's host:port"):
        _check_reachable("cluster")
    with pytest.raises(UsageError, match="--num_cpus sizes a local Ray instance"):
        RaySearch(*args, argv=[], address="127.0.0.1:6379", num_cpus=2)
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    search = RaySearch(*args, argv=[], scheduler="asha")
    # The scheduler's horizon is the epochs setting; the metric's direction is the valid metric's.
    assert (search.max_t, search.bigger, search.max_evals) == (2, True, 2)
    # The fixed settings' Config (gpu_id "0" by default) leaves the GPUs Ray will see as they were.
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == devices


def test_a_stopped_trial_is_listed_as_stopped_and_never_selected(tmp_path):
    (tmp_path / "space.hyper").write_text("learning_rate choice [0.1,0.2]\n")
    search = Search("GRU4Rec", "ml-100k", str(tmp_path / "space.hyper"), argv=[])
    valid = {"ndcg@10": 0.5}
    search.trials = [
        ({"learning_rate": 0.1}, {"best_valid_score": 0.3, "valid_score_bigger": True, "best_valid_result": valid, "test_result": {"ndcg@10": 0.25}}),
        # A stopped trial's best score so far can exceed a tested one's; it has no test and is never the pick.
        (
            {"learning_rate": 0.2},
            {"best_valid_score": 0.4, "valid_score_bigger": True, "best_valid_result": valid, "test_result": None, "stopped_after_epoch": 2},
        ),
    ]
    assert search.best_trial() == search.trials[0]
    search.export_result(str(tmp_path / "out.result"))
    text = (tmp_path / "out.result").read_text()
    assert "trial 2: learning_rate:0.2\n  valid score: 0.400000\n  valid: ndcg@10 : 0.5\n  stopped by the scheduler after epoch 2: not tested\n" in text
    assert text.endswith("best trial 1: learning_rate:0.1\n  valid score: 0.300000\n  test: ndcg@10 : 0.25\n")


def test_a_failed_trial_is_named_by_its_exception_line(tmp_path):
    error = tmp_path / "error.txt"
    error.write_text(
        'Failure # 1\nTraceback (most recent call last):\n  File "x.py", line 1\n'
        "ray.exceptions.RayTaskError(UsageError): ray::ImplicitFunc.train()\n"
        "recbole_t2diff.errors.UsageError: invalid setting epochs=0: it must be a whole number >= 1\n"
    )
    assert _last_error_line(str(error)) == (
        f"recbole_t2diff.errors.UsageError: invalid setting epochs=0: it must be a whole number >= 1 (traceback in {error})"
    )
    assert "see the trial's error.txt" in _last_error_line(str(tmp_path / "missing.txt"))


def test_progress_keeps_tested_stopped_and_cut_trials_apart(space, capsys):
    """The Tune callback's bookkeeping, fed trials as Tune hands them over: a tested trial, one the
    scheduler stopped (better so far, yet never the best: untested), and one cut short when
    --early_stop ends the search (not a trial of the result)."""
    from types import SimpleNamespace

    from ray import tune

    from recbole_t2diff.ray_progress import progress_callback

    search = RaySearch("GRU4Rec", "tiny", str(space / "space.hyper"), [str(space / "fixed.yaml")], argv=[], early_stop=1, scheduler="asha")
    progress = progress_callback(tune, search)
    stopper = progress.stopper()
    tested = {"best_valid_score": 0.3, "valid_score_bigger": True, "best_valid_result": {}, "test_result": {}}
    trials = [
        SimpleNamespace(trial_id="a", config={"hidden_size": 8}, last_result={"epoch": 2, "cpu_s": 5.0, "result": tested}),
        SimpleNamespace(
            trial_id="b",
            config={"hidden_size": 16},
            last_result={"epoch": 1, "valid_score": 0.4, "best_valid_score": 0.4, "cpu_s": 2.0, "best_valid_result": {"ndcg@10": 0.4}},
        ),
        SimpleNamespace(trial_id="c", config={"hidden_size": 32}, last_result={"epoch": 1, "valid_score": 0.1, "cpu_s": 1.0}),
    ]
    for trial in trials:
        progress.on_trial_start(0, trials, trial)
    progress.on_trial_complete(0, trials, trials[0])
    assert not stopper.stop_all()
    progress.on_trial_complete(0, trials, trials[1])
    assert stopper.stop_all()  # one trial (the stopped one) without improvement: --early_stop=1
    progress.on_trial_complete(0, trials, trials[2])
    assert [(number, params, result["best_valid_score"]) for number, params, result in progress.finished] == [
        (1, {"hidden_size": 8}, 0.3),
        (2, {"hidden_size": 16}, 0.4),
    ]
    assert progress.finished[1][2]["stopped_after_epoch"] == 1 and progress.stopped == [(2, {"hidden_size": 16}, 1)]
    assert progress.cpu_s == 7.0
    out = capsys.readouterr().out
    assert "[ray] trial 2 stopped by asha after epoch 1, valid score 0.4000 (best 0.4000), 2 CPU-s; best so far 0.3000 (trial 1: hidden_size:8)" in out
    assert "[ray] trial 3 cut short after epoch 1: the search stopped after 1 trials without improvement (--early_stop)" in out


def test_the_ray_extra_and_uvs_override_name_the_same_ray():
    """uv's override replaces every requirement on ray, the ray extra's too: it must keep the extra's
    version range and apply only to the extra (RecBole's own ray<=2.6.3 is dropped)."""
    import configparser

    metadata = configparser.ConfigParser()
    metadata.read(os.path.join(REPO, "setup.cfg"))
    extra = [line.strip() for line in metadata["options.extras_require"]["ray"].splitlines() if line.strip()]
    with open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8") as f:
        overrides = re.search(r"^override-dependencies = \[(.*)\]$", f.read(), re.M).group(1)
    assert len(extra) == 1 and extra[0].startswith("ray[tune]")
    assert re.findall(r'"([^"]*)"', overrides) == [f"{extra[0]}; extra == 'ray'"]
