"""Convert a pickled (old-format) checkpoint to the safe format, for a file you trust.

    python -m recbole_t2diff.convert --trust_checkpoint saved/T2Diff-old.pth   # writes saved/T2Diff-old-safe.pth

The old file is unpickled, which runs any code it holds: only for files you trust. The new one
records the data files as they are now, so convert before changing them.
"""
import argparse
import sys

from recbole_t2diff.checkpoint import convert_checkpoint
from recbole_t2diff.cli import exit_on_usage_error


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="the old .pth file")
    parser.add_argument("--out", default=None, help="the new file (default: <name>-safe.pth beside the old one)")
    parser.add_argument("--trust_checkpoint", action="store_true", help="required: the old file is unpickled, which runs any code it holds")
    args = parser.parse_args(argv)
    with exit_on_usage_error():
        print(convert_checkpoint(args.checkpoint, args.out, args.trust_checkpoint))


if __name__ == "__main__":
    sys.exit(main())
