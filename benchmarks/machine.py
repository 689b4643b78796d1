"""The machine line every benchmark writes next to its numbers."""
import os
import platform

import torch


def describe():
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {device}"
