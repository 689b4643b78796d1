"""The machine and command lines every benchmark writes next to its numbers."""

import os
import platform
import shlex
import sys

import torch


# glibc's malloc serves every block of 32 MiB or more (SASRec's and SparCode's activations at batch 512 to 2048) by a
# fresh mmap and unmaps it when freed, so every training step faults those pages in again, in the kernel. Keeping
# freed memory in the heap (no mmap, no trim) changes no number, only where memory comes from. Eight training steps
# on one thread of the 2-core machine, 2026-12-07: SASRec at batch 2048 29.4 -> 22.1 s (kernel time 8.7 -> 0.1 s),
# SparCode at 512 8.0 -> 5.5-6.2 s, NARM at 512 3.1 -> 2.5 s, T2Diff at 512 10.4 and 11.1 s (no gain); peak memory
# 16-30 % higher (SASRec 3.3 -> 3.9 GiB). Benchmark workers run with it (worker.environment).
HEAP_ONLY_MALLOC = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295"


def heap_only_malloc():
    """Whether this process's malloc keeps freed memory (:data:`HEAP_ONLY_MALLOC` in GLIBC_TUNABLES, under glibc)."""
    return platform.libc_ver()[0] == "glibc" and "glibc.malloc.mmap_max=0" in os.environ.get("GLIBC_TUNABLES", "")


# oneDNN's and ATen's switches that keep their kernels to an older instruction set than the CPU has.
KERNEL_LIMITS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def describe():
    """The machine a timing came from: timings are compared only between equal descriptions (report.per_machine), so
    the allocator, which changes them, is part of it."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    allocator = ", heap-only malloc" if heap_only_malloc() else ""
    # Kernels held below what the CPU offers (to time what a CPU without, e.g., bfloat16 units would do) are named too.
    limits = " ".join(f"{name}={os.environ[name]}" for name in KERNEL_LIMITS if os.environ.get(name))
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {device}{allocator}" + (f", kernels limited: {limits}" if limits else "")


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
