"""The machine and command lines every benchmark writes next to its numbers."""

import os
import platform
import shlex
import sys

import torch


def describe():
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {device}"


def load_average():
    """The 1-minute load average ("n/a" where the system has none): timings beside it say how busy the machine was,
    which the ratios to a reference measured in the same run are meant to cancel."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return "n/a"


def command_line(argv=None):
    """The running script's command (``python -m benchmarks.<script>`` with ``argv``, default this process's arguments),
    quoted so that it can be pasted back into a shell (--search holds a ";")."""
    script = os.path.splitext(os.path.basename(sys.argv[0]))[0]
    return f"python -m benchmarks.{script} " + shlex.join(sys.argv[1:] if argv is None else argv)
