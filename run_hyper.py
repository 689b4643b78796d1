"""Hyperparameter search for T2Diff or any RecBole built-in model, with RecBole's HyperTuning.

    python run_hyper.py --model=T2Diff --dataset=ml-100k --params_file=properties/hyper/T2Diff.hyper \
        --output_file=hyper_T2Diff.result --algo=random --max_evals=20 --epochs=30

Each trial trains with early stopping on the validation metric; the best trial is the one with the
best validation score. Fixed settings go in --config_files or as --key=value, but never a key that
the params file searches (it would override every trial: that is rejected).
"""
import argparse
import sys

from recbole_t2diff.cli import check_settings_arguments, exit_on_usage_error
from recbole_t2diff.errors import UsageError
from recbole_t2diff.hyper import ALGOS, Search, check_output_file


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", default="T2Diff")
    parser.add_argument("--dataset", "-d", default="ml-100k")
    parser.add_argument("--params_file", default="properties/hyper/T2Diff.hyper")
    parser.add_argument("--output_file", default="hyper_example.result")
    parser.add_argument("--config_files", default=None, help="space-separated yaml files with fixed settings")
    parser.add_argument("--algo", default="exhaustive", choices=ALGOS)
    parser.add_argument("--max_evals", type=int, default=10, help="trials for random/bayes (exhaustive runs the grid)")
    parser.add_argument("--early_stop", type=int, default=10, help="stop after this many trials without improvement")
    parser.add_argument("--tool", default="Hyperopt", help="only Hyperopt is supported")
    args, settings = parser.parse_known_args()
    with exit_on_usage_error():
        check_settings_arguments(settings)
        if args.tool != "Hyperopt":
            raise UsageError(f"--tool={args.tool} is not supported, only Hyperopt: RecBole's Ray path works with no ray available here (its pin ray<=2.6.3 has no wheels past Python 3.11 and fails with numpy 2; current ray rejects its tune.run(local_dir=...) and tune.report(**result)); use --tool=Hyperopt")
        check_output_file(args.output_file)
        search = Search(
            args.model, args.dataset, args.params_file, args.config_files.split() if args.config_files else None,
            args.algo, args.max_evals, args.early_stop,
        )
        search.run()
        search.export_result(args.output_file)
        best_params, best = search.best_trial()
        print(f"best params: {search.params2str(best_params)}")
        print(f"best valid score: {best['best_valid_score']:.4f}; test: {dict(best['test_result'])}")


if __name__ == "__main__":
    sys.exit(main())
