"""Helpers shared by the benchmark scripts (not a test module)."""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")


def machine() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.system()} {platform.machine()} ({cpu}), {os.cpu_count()} CPU threads, torch "
            f"{torch.__version__}, {torch.get_num_threads()} torch threads, {gpu}")


def median_ratio(a_times: list[float], b_times: list[float]) -> float:
    return statistics.median(a_times) / statistics.median(b_times)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
