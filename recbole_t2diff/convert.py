"""Convert a pickled (old-format) checkpoint to the safe format, for a file you trust.

    python -m recbole_t2diff.convert --trust_checkpoint saved/T2Diff-old.pth   # writes saved/T2Diff-old-safe.pth
    python -m recbole_t2diff.convert saved/T2Diff-unsigned.pth                 # safe format, settings not yet checksummed

The old file is unpickled, which runs any code it holds: only for files you trust. The new one
records the data files as they are now, so convert before changing them. A file already in the
safe format but written before its settings were checksummed is never unpickled: it gets the
SHA-256 of its settings as they are now, without --trust_checkpoint.
"""

import argparse
import os
import sys

import torch

from recbole_t2diff.checkpoint import FORMAT, check_digests, config_from_plain, save_checkpoint, settings_digest, write_atomically
from recbole_t2diff.cli import exit_on_usage_error
from recbole_t2diff.errors import UsageError
from recbole_t2diff.quick_start import build_model, prepare


def convert_checkpoint(path, out_path=None, trust_checkpoint=False):
    """Rewrite a pickled checkpoint (RecBole's, or this package's before the safe format) safely.

    Unpickling runs whatever code the file holds, so this needs ``trust_checkpoint=True``. The
    data identity is taken from the data files as they are now: convert before changing them.
    A file already in the safe format is never unpickled: one written before settings were
    checksummed gets the SHA-256 of its settings as they are now (no trust needed); any other is
    refused, as there is nothing to convert.
    Returns the new file's path (default: ``<name>-safe.pth`` beside the old one).
    """
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint '{path}' does not exist")
    out_path = out_path or f"{os.path.splitext(path)[0]}-safe.pth"
    try:
        safe = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # needs unpickling (or is no torch file): the trusted path below
        safe = None
    if isinstance(safe, dict) and safe.get("format") == FORMAT:
        return _add_settings_digest(path, safe, out_path)
    if not trust_checkpoint:
        raise UsageError(
            f"converting '{path}' unpickles it, which runs any code it holds: pass trust_checkpoint=True (--trust_checkpoint) only for a file you trust"
        )
    old = torch.load(path, map_location="cpu", weights_only=False)  # the caller vouched for this file
    if not isinstance(old, dict) or not hasattr(old.get("config"), "final_config_dict") or "state_dict" not in old:
        raise UsageError(f"'{path}' is not a RecBole checkpoint (no pickled Config and state_dict): nothing to convert")
    config = old["config"]
    config["single_spec"], config["local_rank"] = True, 0
    dataset, train_data, _, _ = prepare(config)
    model = build_model(config, train_data)
    model.load_state_dict(old["state_dict"])
    model.load_other_parameter(old.get("other_parameter"))
    save_checkpoint(out_path, config, model, dataset.identity, converted_from=os.path.abspath(path))
    return out_path


def _add_settings_digest(path, payload, out_path):
    """A safe-format checkpoint written before settings were checksummed, with the SHA-256 of its
    settings as they are now; one that has it already is refused (nothing to convert)."""
    if "settings_sha256" in payload:
        raise UsageError(f"checkpoint '{path}' is already in the safe format, settings checksummed: nothing to convert; load it as it is")
    try:
        payload["settings_sha256"] = settings_digest(payload["config"])
        check_digests(path, payload)
        config_from_plain(payload["config"])  # the settings must make a config: refused now rather than at every load
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UsageError(f"checkpoint '{path}' is damaged: its {type(err).__name__} ({err}) shows a part missing or malformed; use an intact copy") from None
    write_atomically(payload, out_path)
    return out_path


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
