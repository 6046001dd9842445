"""Helpers shared by the benchmark scripts (not a test module)."""
from __future__ import annotations

import os
import platform
import sys
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


def plain_mlp_module(depth: int = 100, width: int = 300, lr: float = 0.01):
    """The PlainNet MLP the diagnostics benchmarks time: BN + LeakyReLU 0.3, He-uniform, USPS-shaped input."""
    from deepplain.family_modules import PlainNetModule
    return PlainNetModule(model="plain", depth=depth, arch="mlp", input_shape=(1, 16, 16), num_classes=10, lr=lr,
                          model_options={"width": width, "activation": "lrelu"})


def default_diagnostics() -> list:
    """The three sampling diagnostics at their drop-in defaults."""
    from deepplain.callbacks import ActivationSaturationMonitor, ConditionNumberProbe, GradientFlowMonitor
    return [ActivationSaturationMonitor(), ConditionNumberProbe(), GradientFlowMonitor()]
