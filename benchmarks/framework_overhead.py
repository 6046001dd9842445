"""Steps per second of deepplain's training loop (ImageClassifier + Lightning Trainer + the
whole-tensor data path, TensorBoard logging on, diagnostics off) divided by a hand-written PyTorch
loop doing the same work: same model and initial weights, same batches, same optimizer (same
parameter groups), cross-entropy and a running accuracy. Timed after warm-up steps; the two are
run interleaved and the median of the paired ratios is reported.

    python benchmarks/framework_overhead.py           # VAN-26 on CIFAR-10 shapes, 30 timed steps
    python benchmarks/framework_overhead.py --quick   # 20-layer PlainNet MLP on MNIST shapes, under a minute

Ends with ``framework_ratio=<ratio>``.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from _util import machine

WARMUP = 10


def setup(quick: bool, steps: int):
    import lightning as L
    from deepplain.datamodules import FakeDataModule

    from deepplain.family_modules import module_class
    L.seed_everything(0, verbose=False)
    if quick:
        shape, model, depth, arch, options = (1, 28, 28), "plain", 20, "mlp", {"width": 512}
    else:
        shape, model, depth, arch, options = (3, 32, 32), "van", 26, "conv", {}
    dm = FakeDataModule(input_shape=shape, num_classes=10, train_size=128 * (steps + WARMUP), test_size=128,
                        batch_size=128, val_split=0.0)
    dm.setup()
    cls = module_class(model)
    kwargs = dict(model=model, depth=depth, arch=arch, input_shape=shape, num_classes=10, model_options=options,
                  lr=0.05, weight_decay=1e-4)
    if model == "van":
        kwargs["alpha_mode"] = "off"  # the hand loop has no AlphaScheduler either
    return dm, cls(**kwargs)


def ours(quick: bool, steps: int, logdir: str) -> float:
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    dm, module = setup(quick, steps)
    marks = {}

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == WARMUP:
                marks["start"] = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            marks["end"] = time.perf_counter()
    trainer = L.Trainer(max_steps=steps + WARMUP, accelerator="cpu", devices=1, logger=TensorBoardLogger(logdir),
                        callbacks=[Clock()], enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0, log_every_n_steps=50)
    trainer.fit(module, datamodule=dm)
    return steps / (marks["end"] - marks["start"])


def hand_written(quick: bool, steps: int) -> float:
    import torch
    import torch.nn.functional as F

    from deepplain.optim import make_optimizer
    dm, module = setup(quick, steps)
    model = module.model.train()
    optimizer = make_optimizer(model, "sgd", 0.05, 0.9, False, 1e-4)
    correct = torch.zeros(())
    seen = 0
    for i, (x, y) in enumerate(dm.train_dataloader()):
        if i == WARMUP:
            start = time.perf_counter()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        correct += (logits.detach().argmax(1) == y).sum()
        seen += y.numel()
        if i + 1 == steps + WARMUP:
            break
    float(correct) / seen  # the accuracy is read once, as the epoch-end metric would be
    return steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    steps = 300 if args.quick else 30
    what = "20-layer PlainNet MLP (512 units), MNIST shapes" if args.quick else "VAN-26, CIFAR-10 shapes"
    print(f"machine: {machine()}")
    print(f"model: {what}, batch 128, SGD; {steps} timed steps after {WARMUP} warm-up steps, {args.repeats} repeats")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            hand = hand_written(args.quick, steps)
            ours_sps = ours(args.quick, steps, tmp)
            ratios.append(ours_sps / hand)
            print(f"  repeat {i + 1}: deepplain {ours_sps:.2f} steps/s, hand-written {hand:.2f} steps/s, "
                  f"ratio {ratios[-1]:.3f}")
    print(f"framework_ratio={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
