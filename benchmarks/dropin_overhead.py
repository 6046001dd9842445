"""What the drop-in diagnostics cost in an ordinary Lightning project: whole ``Trainer.fit`` wall time with
ActivationSaturationMonitor, ConditionNumberProbe and GradientFlowMonitor at their defaults (no argument given),
divided by the same fit without them.

    python benchmarks/dropin_overhead.py                 # both models, short and long fits, 3 interleaved pairs each
    python benchmarks/dropin_overhead.py --case mlp-120  # one case (mlp-120, mlp-1000, resnet18-60, resnet18-500)
    python benchmarks/dropin_overhead.py --repeats 5

The models are what users drop the callbacks into first: a plain LightningModule around an MLP of three
2,048-unit layers on 28x28 inputs, and around torchvision's ResNet-18 on 32x32 images; batch 64, SGD, random
data, TensorBoard logging, no validation, no checkpoints. The two sides run interleaved and each case reports
the median of its paired ratios with every pair, and what each callback measured and spent. Ends with one
``dropin_overhead_<case>=<ratio>`` line per case.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from _util import default_diagnostics, machine

CASES = {"mlp-120": ("mlp", 120), "mlp-1000": ("mlp", 1000), "resnet18-60": ("resnet18", 60),
         "resnet18-500": ("resnet18", 500)}


def module_and_data(model: str, steps: int):
    import lightning as L
    import torch
    import torch.nn.functional as F
    import torchvision
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    class Classifier(L.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    L.seed_everything(0, verbose=False)
    if model == "mlp":
        net = nn.Sequential(nn.Flatten(), nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                            nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))
        shape = (1, 28, 28)
    else:
        net, shape = torchvision.models.resnet18(num_classes=10), (3, 32, 32)
    n = 64 * min(steps, 200)  # the data repeats over epochs; only its shape matters to the cost
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g))
    return Classifier(net), DataLoader(data, batch_size=64, shuffle=True)


def fit_once(model: str, steps: int, with_diagnostics: bool, logdir: str) -> tuple[float, list]:
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    module, loader = module_and_data(model, steps)
    callbacks = default_diagnostics() if with_diagnostics else []
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=TensorBoardLogger(logdir),
                        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(module, loader)
    return time.perf_counter() - start, callbacks


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=list(CASES), action="append", help="one case (repeatable); all by default")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import logging
    logging.getLogger("lightning").setLevel(logging.ERROR)
    print(f"machine: {machine()}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        fit_once("mlp", 5, True, tmp)  # warm-up: imports, allocator, thread pools
        for case in args.case or list(CASES):
            model, steps = CASES[case]
            ratios = []
            for i in range(args.repeats):
                without, _ = fit_once(model, steps, False, tmp)
                with_, callbacks = fit_once(model, steps, True, tmp)
                ratios.append(with_ / without)
                print(f"{case} pair {i + 1}: without {without:.2f} s, with {with_:.2f} s, ratio {ratios[-1]:.3f}",
                      flush=True)
            for cb in callbacks:
                print(f"  {type(cb).__name__}: {cb.samples_taken} samples, {cb.budget.spent:.2f} s spent "
                      f"({cb.budget.spent_optional:.2f} s optional, {cb.figure_seconds:.2f} s figures)")
            results[case] = statistics.median(ratios)
    for case, ratio in results.items():
        print(f"dropin_overhead_{case.replace('-', '_')}={ratio:.3f}")


if __name__ == "__main__":
    main()
