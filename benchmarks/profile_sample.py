"""Where the time of a diagnostic sample goes: cProfile of the first sampling step of the 100-layer MLP.

    python benchmarks/profile_sample.py            # this checkout's callbacks
    python benchmarks/profile_sample.py --top 20

One training step of the 100-layer PlainNet MLP (300 units, USPS, batch 128) with the saturation,
condition and gradient-flow callbacks sampling it (step 0, then the final sample and the figures),
against the same step without them. Prints the callbacks' total, and the functions that take the most
time inside it. The script also runs against the callbacks of an older checkout (``PYTHONPATH=<old>``),
whose API it recognises, which is how docs/BENCHMARKS.md compares before and after.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
import warnings

from _util import machine


def callbacks():
    try:  # this checkout: deepplain.callbacks; older ones: a top-level callbacks package
        from deepplain.callbacks import ActivationSaturationMonitor, ConditionNumberProbe, GradientFlowMonitor
        extra = {"max_overhead": None}
        return [ActivationSaturationMonitor(every_n_steps=1, **extra), ConditionNumberProbe(every_n_steps=1, **extra),
                GradientFlowMonitor(every_n_steps=1, **extra)]
    except ImportError:
        from callbacks import ActivationSaturationMonitor, ConditionNumberProbe, GradientFlowMonitor
        return [ActivationSaturationMonitor(every_n_steps=1, max_overhead=None, figure_every_n_samples=1),
                ConditionNumberProbe(every_n_steps=1, max_overhead=None),
                GradientFlowMonitor(every_n_steps=1, max_overhead=None, figure_every_n_samples=1)]


def one_step(with_callbacks: bool, profiler=None) -> float:
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    try:
        from deepplain.datamodules import USPSDataModule
    except ImportError:
        from datamodules import USPSDataModule
    from deepplain.family_modules import PlainNetModule
    L.seed_everything(0, verbose=False)
    dm = USPSDataModule(batch_size=128, val_split=0.1)
    module = PlainNetModule(model="plain", depth=100, arch="mlp", input_shape=(1, 16, 16), num_classes=10, lr=0.01,
                            model_options={"width": 300, "activation": "lrelu"})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=TensorBoardLogger(tmp),
                            callbacks=callbacks() if with_callbacks else [], enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
        start = time.perf_counter()
        if profiler:
            profiler.enable()
        trainer.fit(module, datamodule=dm)
        if profiler:
            profiler.disable()
        return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(f"machine: {machine()}")
    one_step(True)  # warm-up: imports, matplotlib's font cache, allocators
    bare = min(one_step(False) for _ in range(2))
    profiler = cProfile.Profile()
    with_cb = one_step(True, profiler)
    print(f"one step with the three callbacks sampling: {with_cb:.2f} s; without: {bare:.2f} s; "
          f"the callbacks' share: {with_cb - bare:.2f} s")
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.top)
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("ncalls"))
    print("\n".join(lines[start:]))


if __name__ == "__main__":
    main()
