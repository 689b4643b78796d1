"""The machine and command lines every benchmark writes next to its numbers."""

import os
import platform
import re
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


# CPU features that change which matmul kernels run, widest first: bfloat16 steps cost 7x more without the first two
# (results/sparcode/step_ratio_avx2_ml-100k.md).
MATRIX_UNITS = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX512"), ("avx2", "AVX2"))


def cpu_model(cpuinfo="/proc/cpuinfo"):
    """The CPU's model name and its widest matrix unit (:data:`MATRIX_UNITS`), e.g. "AMD EPYC, AVX512-BF16": two
    sessions' machines of the same core count differed only there, and their timings may not be divided (2026-12-07:
    a CPU with AMX, then an EPYC without). ``platform.processor()`` where there is no ``cpuinfo`` to read."""
    try:
        with open(cpuinfo) as f:
            text = f.read()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    units = set(flags.group(1).split()) if flags else set()
    widest = next((label for flag, label in MATRIX_UNITS if flag in units), None)
    return ", ".join(part for part in ((name.group(1).strip() if name else platform.processor()), widest) if part) or "unknown CPU"


def describe():
    """The machine a timing came from: timings are compared only between equal descriptions (report.per_machine), so
    the CPU and the allocator, which change them, are part of it."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    allocator = ", heap-only malloc" if heap_only_malloc() else ""
    # Kernels held below what the CPU offers (to time what a CPU without, e.g., bfloat16 units would do) are named too.
    limits = " ".join(f"{name}={os.environ[name]}" for name in KERNEL_LIMITS if os.environ.get(name))
    kernels = f", kernels limited: {limits}" if limits else ""
    return f"{platform.machine()}, {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {device}{allocator}{kernels}"


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
