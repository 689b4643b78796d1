"""The command line every benchmark script reads: its own options, then RecBole settings as --key=value."""

import sys

from recbole_t2diff.cli import parse_script_arguments
from recbole_t2diff.settings import command_line_settings, parse_settings


def options_and_settings(parser, argv=None):
    """(the script's options, {key: value} of the --key=value settings after them), from ``argv`` (default: this
    process's command line). Settings are read as a Config reads them (literals only); anything else left over
    is a one-line UsageError."""
    args, rest = parse_script_arguments(parser, sys.argv[1:] if argv is None else argv)
    return args, settings_of(rest)


def settings_of(arguments):
    """{key: value} of ``--key=value`` arguments, each checked (one '=', each key once) and read as a literal."""
    return parse_settings(command_line_settings(arguments), "on the command line")


def one_thread_config(parser, argv=None, model=None):
    """(options, settings, Config) of a script that measures one model on one torch thread: the parser's
    --dataset (and --model unless ``model`` is given), with the --key=value settings on top of the property files."""
    import torch

    from recbole_t2diff.config import Config

    args, settings = options_and_settings(parser, argv)
    torch.set_num_threads(1)
    config = Config(model=model or args.model, dataset=args.dataset, config_dict={"show_progress": False, "state": "WARNING", **settings})
    return args, settings, config


def untrained(variant, dataset, settings):
    """(config, model, train, test) of ``variant`` on ``dataset``, untrained: its settings read as a benchmark run reads
    them (``variants.parse_variant``), ``settings`` (e.g. data_path) on top, RecBole's logging quiet. The cost
    benchmarks (``serving``, ``step_ratio``) build their models here."""
    from benchmarks.variants import parse_variant
    from recbole_t2diff.config import Config
    from recbole_t2diff.quick_start import build_model, prepare

    name, variant_settings = parse_variant(variant)
    config = Config(model=name, dataset=dataset, config_dict={**variant_settings, **settings, "state": "ERROR", "show_progress": False})
    _, train, _, test = prepare(config)
    return config, build_model(config, train), train, test
