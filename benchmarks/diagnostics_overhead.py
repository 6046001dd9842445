"""Wall time of N training steps with every diagnostic callback at its default cadence, divided by
the same N steps without them (same model, data and seed; runs interleaved, median of repeats).

    python benchmarks/diagnostics_overhead.py            # 100-layer PlainNet MLP (300 units), 2,001 steps
    python benchmarks/diagnostics_overhead.py --quick    # 20-layer MLP (128 units), 1,201 steps, under a minute

The step counts end just past a sampling step of every callback (every 200 steps; the condition
probe every 1,000), so each callback's samples, figures and probes are inside the timed window.

Ends with ``diagnostics_overhead=<ratio>``.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile

from _util import Timer, machine


def run_once(depth: int, width: int, steps: int, with_diagnostics: bool, logdir: str) -> tuple[float, float]:
    """(wall seconds of fit, seconds the callbacks themselves accounted for)."""
    import lightning as L
    import torch
    from deepplain.callbacks import ActivationSaturationMonitor, ConditionNumberProbe, GradientFlowMonitor
    from deepplain.datamodules import FakeDataModule
    from lightning.pytorch.loggers import TensorBoardLogger

    from deepplain.family_modules import PlainNetModule

    L.seed_everything(0, verbose=False)
    dm = FakeDataModule(input_shape=(1, 16, 16), num_classes=10, train_size=6400, test_size=256, batch_size=128,
                        val_split=0.0)
    dm.setup()
    module = PlainNetModule(model="plain", depth=depth, arch="mlp", input_shape=(1, 16, 16), num_classes=10,
                            model_options={"width": width, "activation": "lrelu"}, lr=0.01)
    callbacks = ([ActivationSaturationMonitor(), ConditionNumberProbe(), GradientFlowMonitor()]
                 if with_diagnostics else [])
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=TensorBoardLogger(logdir),
                        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=2, log_every_n_steps=50)
    torch.set_num_threads(torch.get_num_threads())
    with Timer() as t:
        trainer.fit(module, datamodule=dm)
    return t.seconds, sum(cb.budget.spent for cb in callbacks)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    depth, width, steps = (20, 128, 1201) if args.quick else (100, 300, 2001)
    repeats = args.repeats or (2 if args.quick else 4)
    print(f"machine: {machine()}")
    print(f"model: plain MLP depth {depth} width {width}, batch 128, {steps} steps, validation 2 batches/epoch; "
          f"{repeats} interleaved repeats")
    with tempfile.TemporaryDirectory() as tmp:
        run_once(depth, width, 20, True, tmp)  # warm-up: imports, allocator, matplotlib
        base, diag, accounted = [], [], []
        for i in range(repeats):
            base.append(run_once(depth, width, steps, False, tmp)[0])
            seconds, spent = run_once(depth, width, steps, True, tmp)
            diag.append(seconds)
            accounted.append(spent / seconds)
            print(f"  repeat {i + 1}: without {base[-1]:.2f} s, with diagnostics {diag[-1]:.2f} s "
                  f"(the callbacks' own measured work: {spent:.2f} s)")
    ratios = [d / b for d, b in zip(diag, base)]
    print(f"per-repeat ratios: {', '.join(f'{r:.3f}' for r in ratios)}; best-of ratio {min(diag) / min(base):.3f}")
    # Wall-time noise on a shared machine can exceed the effect; the callbacks' own timers are exact.
    print(f"time inside the callbacks: {100 * statistics.median(accounted):.2f}% of the diagnostics runs' wall time")
    # The median of paired (adjacent-in-time) ratios is robust to the other load this machine carries.
    print(f"diagnostics_overhead={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
