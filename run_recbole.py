"""Train and test T2Diff or any RecBole built-in model.

    python run_recbole.py --model=T2Diff --dataset=ml-100k
    python run_recbole.py --model=SASRec --dataset=ml-1m --data_path=../shared/data
    python run_recbole.py --model=T2Diff --dataset=ml-100k --config_files="my.yaml" --epochs=5
    python run_recbole.py --model=T2Diff --dataset=ml-100k --nproc=2            # 2 processes (gloo on CPU)

Every other --key=value reaches RecBole's Config and overrides the property files.
"""

import argparse
import sys

from recbole_t2diff.cli import exit_on_usage_error, parse_script_arguments
from recbole_t2diff.quick_start import run


def main(argv=None):
    """``argv``: the arguments (default: the command line's); the script's own options are read here, the
    rest are settings, handed to the Config as its command line."""
    # No abbreviations: every argument that is not exactly one of these options is a setting.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--model", "-m", default="T2Diff", help="T2Diff or a RecBole model name (default T2Diff)")
    parser.add_argument("--dataset", "-d", default="ml-100k", help="dataset name (default ml-100k)")
    parser.add_argument("--config_files", default=None, help="space-separated yaml files")
    parser.add_argument("--nproc", type=int, default=1, help="processes on this machine (distributed mode when > 1)")
    parser.add_argument("--world_size", type=int, default=-1, help="processes on all machines (default: nproc)")
    parser.add_argument("--ip", default="localhost", help="address of the rank-0 machine")
    parser.add_argument("--port", default="5678", help="port of the rank-0 machine")
    parser.add_argument("--group_offset", type=int, default=0, help="global rank of this machine's first process")
    with exit_on_usage_error():
        # a malformed or repeated argument fails here, before anything starts
        args, settings = parse_script_arguments(parser, sys.argv[1:] if argv is None else argv)
        config_files = args.config_files.split() if args.config_files else None
        run(
            args.model,
            args.dataset,
            config_file_list=config_files,
            argv=settings,
            nproc=args.nproc,
            world_size=args.world_size,
            ip=args.ip,
            port=args.port,
            group_offset=args.group_offset,
        )


if __name__ == "__main__":
    sys.exit(main())
