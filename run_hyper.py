"""Hyperparameter search for T2Diff or any RecBole built-in model, with RecBole's HyperTuning or Ray Tune.

    python run_hyper.py --model=T2Diff --dataset=ml-100k --params_file=properties/hyper/T2Diff.hyper \
        --output_file=hyper_T2Diff.result --algo=random --max_evals=20 --epochs=30
    python run_hyper.py ... --tool=ray --cpus_per_trial=1 --scheduler=asha   # parallel trials, lagging ones stopped

Each trial trains with early stopping on the validation metric; the best trial is the one with the
best validation score. Fixed settings go in --config_files or as --key=value, but never a key that
the params file searches (it would override every trial: that is rejected).
"""

import argparse
import sys

from recbole_t2diff.cli import exit_on_usage_error, parse_script_arguments
from recbole_t2diff.errors import UsageError
from recbole_t2diff.hyper import ALGOS, Search, check_output_file
from recbole_t2diff.ray_search import SCHEDULERS, RaySearch


def main(argv=None):
    """``argv``: the arguments (default: the command line's); the script's own options are read here, the
    rest are settings, handed to the Config as its command line."""
    # No abbreviations: every argument that is not exactly one of these options is a setting.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--model", "-m", default="T2Diff")
    parser.add_argument("--dataset", "-d", default="ml-100k")
    parser.add_argument("--params_file", default="properties/hyper/T2Diff.hyper")
    parser.add_argument("--output_file", default="hyper_example.result")
    parser.add_argument("--config_files", default=None, help="space-separated yaml files with fixed settings")
    parser.add_argument("--algo", default="exhaustive", choices=ALGOS)
    parser.add_argument("--max_evals", type=int, default=10, help="trials for random/bayes (exhaustive runs the grid)")
    parser.add_argument("--early_stop", type=int, default=10, help="stop after this many trials without improvement")
    parser.add_argument(
        "--tool",
        default="hyperopt",
        type=str.lower,
        choices=("hyperopt", "ray"),
        help="hyperopt: trials one after another in this process; ray: Ray Tune trials (needs the ray extra)",
    )
    ray_options = parser.add_argument_group("with --tool=ray (recbole_t2diff/ray_search.py; defaults there)")
    ray_options.add_argument("--address", help="an existing Ray cluster (host:port); default: a local Ray on 127.0.0.1")
    ray_options.add_argument("--num_cpus", type=int, help="CPUs of the local Ray (default: all)")
    ray_options.add_argument("--cpus_per_trial", type=float, help="CPUs per trial (default 1)")
    ray_options.add_argument("--gpus_per_trial", type=float, help="GPUs per trial (default 0)")
    ray_options.add_argument("--max_concurrent", type=int, help="trials at once (default: as the resources allow)")
    ray_options.add_argument("--scheduler", choices=SCHEDULERS, help="stop lagging trials after an epoch (default none)")
    ray_options.add_argument("--grace_period", type=int, help="epochs before the scheduler may stop a trial (default 1)")
    ray_options.add_argument("--reduction_factor", type=float, help="ASHA's rung spacing (default 4)")
    ray_options.add_argument("--max_t", type=int, help="ASHA's last rung in epochs (default: the epochs setting)")
    ray_options.add_argument("--storage_path", help="Ray Tune's experiment folder (default ./ray_results)")
    with exit_on_usage_error():
        # a malformed or repeated argument fails here, before anything starts
        args, settings = parse_script_arguments(parser, sys.argv[1:] if argv is None else argv)
        given = {action.dest: getattr(args, action.dest) for action in ray_options._group_actions if getattr(args, action.dest) is not None}
        if given and args.tool != "ray":
            raise UsageError(f"--{next(iter(given))} applies to --tool=ray only: add --tool=ray or drop it")
        check_output_file(args.output_file)
        search = (RaySearch if args.tool == "ray" else Search)(
            args.model,
            args.dataset,
            args.params_file,
            args.config_files.split() if args.config_files else None,
            args.algo,
            args.max_evals,
            args.early_stop,
            argv=settings,
            **given,
        )
        search.run()
        search.export_result(args.output_file)
        best_params, best = search.best_trial()
        print(f"best params: {search.params2str(best_params)}")
        print(f"best valid score: {best['best_valid_score']:.4f}; test: {dict(best['test_result'])}")


if __name__ == "__main__":
    sys.exit(main())
