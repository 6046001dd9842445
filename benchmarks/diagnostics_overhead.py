"""Wall time with every diagnostic callback at its default cadence, divided by the same work without them.

    python benchmarks/diagnostics_overhead.py --quick       # 20-layer MLP (128 units), 1,201 steps, in-process
    python benchmarks/diagnostics_overhead.py --usps        # the 4-epoch USPS run of the 100-layer MLP, through
                                                           # train.py --preset oyedotun-mlp-100 (whole processes)
    python benchmarks/diagnostics_overhead.py               # 100-layer PlainNet MLP (300 units), 2,001 steps
    python benchmarks/diagnostics_overhead.py --per-sample  # ms per sample of each callback: the 100-layer MLP
                                                           # and VAN-26 conv

The two sides run interleaved (without, with, without, ...) and the median of the paired ratios is
reported, with each pair. Ends with ``diagnostics_overhead=<ratio>``; ``--per-sample`` prints a table.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _util import default_diagnostics, machine, plain_mlp_module

REPO = Path(__file__).resolve().parents[1]


def usps_or_fake():
    """USPS (real data: the diagnostics' cost depends on the representations) when $DEEPPLAIN_DATA has it, else
    seeded fake data of USPS's shape."""
    from deepplain.datamodules import FakeDataModule, USPSDataModule

    from deepplain.errors import DatasetError
    dm = USPSDataModule(batch_size=128, val_split=0.0)
    try:
        dm.setup()
        return dm, "USPS (7,291 training images)"
    except DatasetError:
        dm = FakeDataModule(input_shape=(1, 16, 16), num_classes=10, train_size=6400, test_size=256, batch_size=128,
                            val_split=0.0)
        dm.setup()
        return dm, "fake 1x16x16 data (USPS not found)"


def fit_once(depth: int, width: int, steps: int, with_diagnostics: bool, logdir: str) -> tuple[float, list]:
    """(wall seconds of trainer.fit, the callbacks) for one in-process run."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    L.seed_everything(0, verbose=False)
    dm, _ = usps_or_fake()
    module = plain_mlp_module(depth, width)
    callbacks = default_diagnostics() if with_diagnostics else []
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=TensorBoardLogger(logdir),
                        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=2, log_every_n_steps=50)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    return time.perf_counter() - start, callbacks


USPS_RUN = ["--preset", "oyedotun-mlp-100", "--dataset", "usps", "--epochs", "4", "--val-split", "0", "--no-progress"]


SPENT = re.compile(r"^(\w+): (\d+) samples at steps .*; ([\d.]+) s spent \(([\d.]+)% of training", re.M)


def process_once(with_diagnostics: bool, logdir: str) -> float:
    """Wall seconds of a whole ``train.py`` process (start-up, data, training, test, report); with the diagnostics,
    also prints what each callback's own timer counted (these do not drift with the VM as whole runs do)."""
    argv = [sys.executable, str(REPO / "train.py"), *USPS_RUN, "--diagnostics", "all" if with_diagnostics else "none",
            "--logdir", logdir]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"train.py failed: {proc.stderr[-1500:]}")
    timers = SPENT.findall(proc.stderr + proc.stdout)
    if with_diagnostics and timers:
        total = sum(float(spent) for _, _, spent, _ in timers)
        print("    the callbacks' own timers: " + ", ".join(f"{name} {samples} samples {float(spent):.2f} s"
                                                        for name, samples, spent, _ in timers)
              + f"; {total:.2f} s in all, {sum(float(share) for *_, share in timers):.1f}% of training", flush=True)
    return seconds


def paired(measure, repeats: int) -> list[float]:
    ratios = []
    for i in range(repeats):
        without, with_ = measure(False), measure(True)
        ratios.append(with_ / without)
        print(f"  repeat {i + 1}: without {without:.2f} s, with diagnostics {with_:.2f} s, ratio {ratios[-1]:.3f}",
              flush=True)
    return ratios


def per_sample():
    """Median seconds per sample of each callback, on the 100-layer MLP and VAN-26 conv."""
    import lightning as L
    from deepplain.callbacks import ActivationSaturationMonitor, ConditionNumberProbe, GradientFlowMonitor
    from deepplain.datamodules import FakeDataModule
    from lightning.pytorch.loggers import TensorBoardLogger

    from deepplain.family_modules import PlainNetModule, VANModule
    cases = [("100-layer MLP (300 units, USPS)", PlainNetModule,
              dict(model="plain", depth=100, arch="mlp", input_shape=(1, 16, 16),
                   model_options={"width": 300, "activation": "lrelu"}), (1, 16, 16)),
             ("VAN-26 conv (CIFAR shapes)", VANModule,
              dict(model="van", depth=26, arch="conv", input_shape=(3, 32, 32), alpha_mode="off"), (3, 32, 32))]
    print("| model | saturation (train batch) | saturation (probe) | condition | gradient flow | figures, once |")
    print("|---|---|---|---|---|---|")
    for label, cls, kwargs, shape in cases:
        L.seed_everything(0, verbose=False)
        dm = usps_or_fake()[0] if shape[0] == 1 else FakeDataModule(
            input_shape=shape, num_classes=10, train_size=1280, test_size=512, batch_size=128, val_split=0.0)
        callbacks = [ActivationSaturationMonitor(every_n_steps=1, max_overhead=None),
                     ConditionNumberProbe(every_n_steps=1, max_overhead=None,
                                          probe_size=600 if shape[0] == 1 else None),
                     GradientFlowMonitor(every_n_steps=1, max_overhead=None)]
        with tempfile.TemporaryDirectory() as tmp:
            trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=TensorBoardLogger(tmp),
                                callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                                enable_checkpointing=False, limit_val_batches=1, val_check_interval=2)
            trainer.fit(cls(num_classes=10, lr=0.01, **kwargs), datamodule=dm)
        saturation, condition, grads = callbacks

        def ms(values):  # the first sample carries one-off costs (allocations, imports); it is left out
            return f"{1000 * statistics.median(values[1:] or values):.1f} ms"
        figures = sum(cb.figure_seconds for cb in callbacks)
        print(f"| {label} | {ms(saturation.sample_seconds)} | {ms(saturation.probe_seconds)} | "
              f"{ms(condition.sample_seconds)} | {ms(grads.sample_seconds)} | {1000 * figures:.0f} ms |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true")
    group.add_argument("--usps", action="store_true")
    group.add_argument("--per-sample", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    if args.per_sample:
        per_sample()
        return
    repeats = args.repeats or 3
    with tempfile.TemporaryDirectory() as tmp:
        if args.usps:
            print(f"run: train.py {' '.join(USPS_RUN)} with --diagnostics all / none; {repeats} interleaved repeats")
            process_once(False, tmp)  # warm-up: page cache, compiled bytecode
            ratios = paired(lambda on: process_once(on, tmp), repeats)
        else:
            depth, width, steps = (20, 128, 1201) if args.quick else (100, 300, 2001)
            print(f"model: plain MLP depth {depth} width {width}, batch 128, {steps} steps on {usps_or_fake()[1]}, "
                  f"validation 2 batches per epoch (52 steps); {repeats} interleaved repeats")
            fit_once(depth, width, 20, True, tmp)  # warm-up: imports, allocator, matplotlib
            runs = []

            def measure(on):
                seconds, callbacks = fit_once(depth, width, steps, on, tmp)
                if on:
                    runs.append(callbacks)
                return seconds
            ratios = paired(measure, repeats)
            for cb in runs[-1]:
                print(f"  {type(cb).__name__}: {cb.samples_taken} samples, {cb.postponed} due points postponed, "
                      f"{cb.budget.spent:.2f} s in all ({cb.budget.spent_optional:.2f} s optional, "
                      f"{cb.figure_seconds:.2f} s figures)")
    print(f"per-repeat ratios: {', '.join(f'{r:.3f}' for r in ratios)}")
    print(f"diagnostics_overhead={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
