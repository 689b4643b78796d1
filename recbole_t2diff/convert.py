"""Convert a pickled (old-format) checkpoint to the safe format, for a file you trust.

    python -m recbole_t2diff.convert --trust_checkpoint saved/T2Diff-old.pth   # writes saved/T2Diff-old-safe.pth
    python -m recbole_t2diff.convert saved/T2Diff-unsigned.pth                 # safe format, settings not yet checksummed

The old file is unpickled, which runs any code it holds: only for files you trust. The new one
records the data files as they are now, so convert before changing them. A file already in the
safe format but written before its settings were checksummed is never unpickled: it gets the
SHA-256 of its settings as they are now, without --trust_checkpoint.
"""
import argparse
import sys

from recbole_t2diff.checkpoint import convert_checkpoint
from recbole_t2diff.cli import exit_on_usage_error


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="the old .pth file")
    parser.add_argument("--out", default=None, help="the new file (default: <name>-safe.pth beside the old one)")
    parser.add_argument("--trust_checkpoint", action="store_true", help="required for a pickled file: it is unpickled, which runs any code it holds")
    args = parser.parse_args(argv)
    with exit_on_usage_error():
        print(convert_checkpoint(args.checkpoint, args.out, args.trust_checkpoint))


if __name__ == "__main__":
    sys.exit(main())
